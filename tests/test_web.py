"""The web gallery and its access rules, through Starlette's TestClient on a real history file:
admin by token (session or bearer), members by signed link, NSFW never outside an admin, CSRF."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from bot.cli.webui import gallery_links
from bot.commands import Actor, Commands, Reply, parse_imagine_text
from bot.settings import BotSettings
from engine import ConfigError, Engine, Gallery, GalleryQuery, Origin, thumbnail_path
from engine.history import SCHEMA_VERSION
from tests.conftest import REPO
from tests.webkit import ALICE, BOB, KEY, TOKEN, Site, add_job, plain_config, site
from web.links import LinkError, gallery_url, load_secret, sign_link, verify_link
from web.settings import load_web_settings


@pytest.fixture
def web(tmp_path: Path) -> Site:
    with site(tmp_path / "data") as s:
        s.ids = {  # type: ignore[attr-defined]
            "fox": s.run(add_job, s.history, "a red fox in the snow", ALICE, model="flux_dev", channel="c1"),
            "whale": s.run(add_job, s.history, "a blue whale", ALICE, model="sd3_medium", outcome="failed"),
            "adult": s.run(add_job, s.history, "adult only picture", ALICE, nsfw=True),
            "cat": s.run(add_job, s.history, "bob's cat", BOB, channel="c2"),
        }
        yield s


def link(who: tuple[str, str, str] = ALICE, ttl_s: float = 3600, **kw: float) -> str:
    return "/g/" + sign_link(KEY, who[0], who[1], who[2], ttl_s, **kw)


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, html
    return match[1]


def log_in(web: Site) -> str:
    page = web.client.get("/login")
    answer = web.client.post("/login", data={"token": TOKEN, "csrf": csrf_of(page.text)})
    assert answer.status_code == 303
    return csrf_of(web.client.get("/").text)


# -- nothing without the token or a link -------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/job/{fox}", "/image/{fox}.png", "/thumb/{fox}.jpg", "/queue", "/queue/events",
                                  "/stats", "/metrics", "/job/nosuch"])
def test_every_history_route_is_403_without_the_token(web: Site, path: str) -> None:
    answer = web.client.get(path.format(**web.ids))  # type: ignore[attr-defined]
    assert answer.status_code == 403
    assert "a red fox" not in answer.text


def test_a_wrong_bearer_token_is_403_and_the_right_one_opens_everything(web: Site) -> None:
    assert web.client.get("/", headers={"Authorization": "Bearer not-the-token-at-all"}).status_code == 403
    page = web.client.get("/", headers=web.bearer())
    assert page.status_code == 200
    for prompt in ("a red fox in the snow", "a blue whale", "adult only picture", "bob&#39;s cat"):
        assert prompt in page.text  # an admin sees everyone's jobs, adult ones included


def test_no_token_configured_means_no_admin_at_all(tmp_path: Path) -> None:
    with site(tmp_path / "data", token=None) as s:
        assert s.client.get("/", headers={"Authorization": "Bearer "}).status_code == 403
        assert "PROMPTPICS_WEB_TOKEN" in s.client.get("/login").text
        assert s.client.post("/login", data={"token": "anything-at-all-000"}).status_code == 403


def test_login_sets_a_session_and_logout_needs_its_csrf_token(web: Site) -> None:
    page = web.client.get("/login")
    assert web.client.post("/login", data={"token": TOKEN, "csrf": "forged"}).status_code == 403
    assert web.client.post("/login", data={"token": "wrong-token-000000000", "csrf": csrf_of(page.text)}).status_code == 403
    csrf = log_in(web)
    assert web.client.get("/").status_code == 200
    assert web.client.post("/logout", data={"csrf": "forged"}).status_code == 403
    assert web.client.get("/").status_code == 200
    assert web.client.post("/logout", data={"csrf": csrf}).status_code == 303
    assert web.client.get("/").status_code == 403


def test_an_admin_session_post_without_its_csrf_token_is_refused(web: Site) -> None:
    csrf = log_in(web)
    assert web.client.post("/actions/cancel", data={"target": "abc"}).status_code == 403
    assert web.client.post("/actions/cancel", data={"target": "abc", "csrf": csrf + "x"}).status_code == 403
    # with the token it gets past the check: this process runs no engine, so 409 says where the queue lives
    assert web.client.post("/actions/cancel", data={"target": "abc", "csrf": csrf}).status_code == 409


def test_a_session_lasts_only_while_the_token_stays_the_same(web: Site, tmp_path: Path) -> None:
    log_in(web)
    cookie = web.client.cookies.get("promptpics_session")
    with site(tmp_path / "other") as other:
        other.client.cookies.set("promptpics_session", cookie or "")
        # the same key (KEY) signs both, so the cookie carries over only with the same token and key
        assert other.client.get("/").status_code == 200
    with site(tmp_path / "third", token="a-different-token-0123456") as third:
        third.client.cookies.set("promptpics_session", cookie or "")
        assert third.client.get("/").status_code == 403  # a changed token ends every session


# -- members' signed links ---------------------------------------------------------------------------


def test_a_member_link_shows_only_their_own_jobs_and_never_adult_ones(web: Site) -> None:
    page = web.client.get(link())
    assert page.status_code == 200
    assert "a red fox in the snow" in page.text and "a blue whale" in page.text
    assert "adult only picture" not in page.text and "bob" not in page.text.split("<main>")[1]
    # and asking for someone else's with a filter changes nothing
    assert "bob&#39;s cat" not in web.client.get(link() + "?user=discord:222").text


def test_a_member_gets_404_for_another_users_job_an_adult_job_and_an_unknown_id(web: Site) -> None:
    ids = web.ids  # type: ignore[attr-defined]
    base = link()
    assert web.client.get(f"{base}/job/{ids['fox']}").status_code == 200
    for job_id in (ids["cat"], ids["adult"], "nosuch", "bad.id", "%2e%2e"):
        for path in (f"/job/{job_id}", f"/image/{job_id}.png", f"/thumb/{job_id}.jpg"):
            assert web.client.get(base + path).status_code == 404, path


def test_expired_and_tampered_links_are_403(web: Site) -> None:
    expired = link(ttl_s=10, now=time.time() - 60)
    answer = web.client.get(expired)
    assert answer.status_code == 403 and "expired" in answer.text
    good = link()[3:]
    payload, sig = good.split(".")
    forged_payload = sign_link(KEY, *BOB, 3600).split(".")[0]
    for bad in (f"{forged_payload}.{sig}", f"{payload}.{sig[:-2]}AA", f"{payload}", f"{payload}.", "x.y", "%00.%00"):
        assert web.client.get(f"/g/{bad}").status_code == 403, bad
        assert web.client.get(f"/g/{bad}/job/{web.ids['fox']}").status_code == 403  # type: ignore[attr-defined]
    other_key = sign_link(b"another key" * 3, *ALICE, 3600)
    assert web.client.get(f"/g/{other_key}").status_code == 403


def test_links_verify_then_parse_and_name_the_member(tmp_path: Path) -> None:
    token = sign_link(KEY, "slack", "U1", "Ünïcode name", 60, now=1000)
    member = verify_link(KEY, token, now=1001)
    assert (member.platform, member.user_id, member.name, member.expires_at) == ("slack", "U1", "Ünïcode name", 1060)
    with pytest.raises(LinkError, match="expired"):
        verify_link(KEY, token, now=1061)
    assert gallery_url("https://pics.example/", token) == f"https://pics.example/g/{token}"
    key = load_secret(tmp_path, {})
    assert load_secret(tmp_path, {}) == key and len(key) == 32  # made once, then read back
    assert (tmp_path / "web-secret.key").stat().st_mode & 0o777 == 0o600
    assert load_secret(tmp_path, {"PROMPTPICS_WEB_SECRET": "from the environment"}) != key


# -- pages ---------------------------------------------------------------------------------------


def test_the_job_page_shows_every_parameter_and_a_command_that_remakes_it(web: Site) -> None:
    page = web.client.get(f"/job/{web.ids['fox']}", headers=web.bearer())  # type: ignore[attr-defined]
    assert page.status_code == 200
    for text in ("a red fox in the snow", "blurry", "flux_dev", "chosen by the router: rule: photo", "1234",
                 "64×48", "nsfw: clear (0.02)", "Queue wait", "1.5 s", "Download PNG"):
        assert text in page.text, text
    command = re.search(r'<pre id="command">([^<]+)</pre>', page.text)
    assert command
    options = parse_imagine_text(command[1].removeprefix("/imagine "))
    assert (options.prompt, options.model, options.negative, options.steps, options.guidance, options.width,
            options.height, options.seed) == ("a red fox in the snow", "flux_dev", "blurry", 4, 3.5, 64, 48, 1234)


def test_the_png_downloads_with_its_bytes_and_the_thumbnail_is_cached_beside_it(web: Site) -> None:
    fox = web.ids["fox"]  # type: ignore[attr-defined]
    png = web.client.get(f"/image/{fox}.png?download", headers=web.bearer())
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    assert "attachment" in png.headers["content-disposition"]
    job = web.run(web.history.get_job, fox)
    assert png.content == job.image_path.read_bytes()
    thumb = web.client.get(f"/thumb/{fox}.jpg", headers=web.bearer())
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    cached = thumbnail_path(job.image_path)
    assert cached.read_bytes() == thumb.content
    made = cached.stat().st_mtime_ns
    web.client.get(f"/thumb/{fox}.jpg", headers=web.bearer())
    assert cached.stat().st_mtime_ns == made  # made once
    assert web.client.get(f"/image/{web.ids['whale']}.png", headers=web.bearer()).status_code == 404  # type: ignore[attr-defined]
    assert web.run(web.history.prune_images, 0, now=time.time() + 60) >= 1
    assert not job.image_path.exists() and not cached.exists()  # pruning takes the thumbnail too
    assert web.client.get(f"/thumb/{fox}.jpg", headers=web.bearer()).status_code == 404


def test_the_gallery_filters_by_user_model_channel_outcome_and_date(web: Site) -> None:
    def shown(query: str) -> set[str]:
        html = web.client.get("/?" + query, headers=web.bearer()).text
        return set(re.findall(r'data-job="([^"]+)"', html))

    ids = web.ids  # type: ignore[attr-defined]
    assert shown("") == set(ids.values())
    assert shown("user=discord:222") == {ids["cat"]}
    assert shown("model=sd3_medium") == {ids["whale"]}
    assert shown("channel=c2") == {ids["cat"]}
    assert shown("outcome=failed") == {ids["whale"]}
    assert shown("from=2000-01-01&to=2000-01-02") == set()
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert shown(f"from={today}&to={today}") == set(ids.values())
    assert web.client.get("/?outcome=exploded", headers=web.bearer()).status_code == 400
    assert web.client.get("/?from=yesterday", headers=web.bearer()).status_code == 400
    assert web.client.get("/?page=0", headers=web.bearer()).status_code == 400


def test_the_gallery_pages_newest_first(tmp_path: Path) -> None:
    with site(tmp_path / "data", web={"page_size": 2}) as s:
        made = [s.run(add_job, s.history, f"picture number {i}", created_at=1_000_000 + i) for i in range(5)]
        pages = []
        for n in (1, 2, 3):
            html = s.client.get(f"/?page={n}", headers=s.bearer()).text
            pages.append(re.findall(r'data-job="([^"]+)"', html))
        assert pages == [made[4:2:-1], made[2:0:-1], made[:1]]
        assert 'rel="next"' not in html


# -- search: FTS5 over every prompt ----------------------------------------------------------------


AWKWARD = {
    "quotes": 'she said "hello" and it\'s fine',
    "sql": "'; DROP TABLE jobs; -- robert",
    "fts": "NEAR(cat dog) AND OR * ^title",
    "emoji": "a fox 🦊 under the moon 🌙",
    "rtl": "قطة على السطح",
    "hebrew": "חתול על הגג",
}


@pytest.mark.parametrize(("name", "query"), [
    ("quotes", '"hello"'), ("quotes", "it's"), ("sql", "'; DROP TABLE"), ("sql", "--"), ("fts", "NEAR(cat"),
    ("fts", "*"), ("fts", "^title"), ("emoji", "🦊"), ("emoji", "fox 🌙"), ("rtl", "السطح"), ("rtl", "قطة"),
    ("hebrew", "הגג"), ("quotes", "HELLO"),
])
def test_search_finds_awkward_prompts_and_only_them(tmp_path: Path, name: str, query: str) -> None:
    with site(tmp_path / "data") as s:
        ids = {key: s.run(add_job, s.history, prompt) for key, prompt in AWKWARD.items()}
        answer = s.client.get("/", params={"q": query}, headers=s.bearer())
        assert answer.status_code == 200
        assert set(re.findall(r'data-job="([^"]+)"', answer.text)) == {ids[name]}
        assert s.run(s.history.get_job, ids["sql"]) is not None  # the table is still there


def test_search_on_a_member_link_stays_within_their_jobs(web: Site) -> None:
    html = web.client.get(link(BOB), params={"q": "cat"}).text
    assert re.findall(r'data-job="([^"]+)"', html) == [web.ids["cat"]]  # type: ignore[attr-defined]
    assert re.findall(r'data-job="([^"]+)"', web.client.get(link(), params={"q": "cat"}).text) == []


def test_the_search_index_follows_changed_prompts(web: Site) -> None:
    fox = web.ids["fox"]  # type: ignore[attr-defined]
    job = web.run(web.history.get_job, fox)
    web.run(web.history.update_params, fox, dataclasses.replace(job.params, prompt="a grey wolf"))
    gallery = Gallery(web.history)
    assert [j.id for j in web.run(gallery.page, GalleryQuery(text="wolf")).jobs] == [fox]
    assert web.run(gallery.page, GalleryQuery(text="red fox")).jobs == []


# -- settings --------------------------------------------------------------------------------------


def test_the_token_is_read_only_from_the_environment_and_never_shown(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="web.token") as caught:
        load_web_settings(plain_config(tmp_path, {"token": "secret-in-a-file-000000"}), {})
    assert "secret-in-a-file" not in str(caught.value)
    with pytest.raises(ConfigError, match="PROMPTPICS_WEB_TOKEN") as short:
        load_web_settings(plain_config(tmp_path), {"PROMPTPICS_WEB_TOKEN": "short"})
    assert "short" not in str(short.value).replace("shorter", "")
    settings = load_web_settings(plain_config(tmp_path), {"PROMPTPICS_WEB_TOKEN": TOKEN})
    assert TOKEN not in repr(settings)
    assert settings.host == "127.0.0.1" and settings.base_url == "http://127.0.0.1:8765"


def test_a_version_4_history_gains_the_search_index_with_its_old_jobs(tmp_path: Path) -> None:
    import sqlite3

    from engine.history import schema

    data = tmp_path / "data"
    data.mkdir()
    con = sqlite3.connect(data / "promptpics.sqlite3")
    old_version = SCHEMA_VERSION - 1  # the file as the previous release left it
    for script in schema.MIGRATIONS[:old_version]:
        con.executescript(script)
    con.execute(f"PRAGMA user_version = {old_version}")
    con.execute("INSERT INTO jobs (id, status, created_at, requester_platform, requester_user_id, requester_name,"
                " origin_platform, origin_channel_id, origin_thread_id, origin_message_ref, prompt, negative_prompt,"
                " model_used, route_reason, steps, guidance, width, height, seed) VALUES ('old1', 'failed', 1, 'cli',"
                " 'u', 'U', 'cli', '', '', '', 'an old lighthouse at dusk', '', 'flux_dev', '', 4, 3, 64, 64, 1)")
    con.commit()
    con.close()
    with site(data) as s:
        answer = s.client.get("/", params={"q": "lighthouse"}, headers=s.bearer())
        assert re.findall(r'data-job="([^"]+)"', answer.text) == ["old1"]
    con = sqlite3.connect(data / "promptpics.sqlite3")
    assert con.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


# -- /gallery in the bot, and `promptpics web` --------------------------------------------------------


async def _gallery_reply(config: Any, actor: Actor) -> Reply:
    commands = Commands(Engine(config), BotSettings(), {}, gallery_links=gallery_links(config))
    outcome = await commands.run_line(actor, "/gallery", Origin("discord", "c1"))
    assert isinstance(outcome, Reply)
    return outcome


def test_the_gallery_command_hands_out_a_link_the_site_honours(tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = plain_config(data, {"public_url": "https://pics.example", "link_ttl_days": 2.0})
    reply = asyncio.run(_gallery_reply(config, Actor(*ALICE)))
    assert reply.ok and "only your images" in reply.text
    url = re.search(r"https://pics\.example(/g/\S+)", reply.text)
    assert url
    with site(data, key=None) as s:  # the key the bot made in the data folder
        s.run(add_job, s.history, "alice's own picture", ALICE)
        s.run(add_job, s.history, "bob's own picture", BOB)
        page = s.client.get(url[1])
        assert page.status_code == 200
        assert "alice&#39;s own picture" in page.text and "bob&#39;s own picture" not in page.text
    plain = Commands(Engine(config), BotSettings(), {})
    off = asyncio.run(plain.run_line(Actor(*ALICE), "/gallery", Origin()))
    assert isinstance(off, Reply) and not off.ok


def test_promptpics_web_serves_the_gallery_on_localhost(cli_env: dict[str, str]) -> None:
    env = {**cli_env, "PROMPTPICS_WEB_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "bot", "--profile", "tiny", "web", "--port", "0"], cwd=REPO, env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # the first line says where it listens
        url = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert url, line
        assert httpx.get(url[0], timeout=10).status_code == 403
        answer = httpx.get(url[0], headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert answer.status_code == 200 and "Search prompts" in answer.text
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
