"""/compare, /sweep and /preset: the contact sheet's layout, groups admitted whole, presets kept
across restarts, end to end on tiny models through the terminal (piped and in-process)."""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.commands import Actor, AdminPolicy, Commands, Reply
from bot.commands.options import OptionError
from bot.commands.sweeps import parse_compare, parse_sweep
from bot.outlet import fit_image_blocking
from bot.settings import BotSettings
from bot.sheets import GAP, HEADER_HEIGHT, LABEL_HEIGHT, LABEL_STRIP, TILE_SIDE, SheetTile, contact_sheet_blocking, tile_of_emoji
from engine import Config, Engine, JobStatus, Origin, QueueFullError
from engine.core.admission import Admission
from engine.history import SCHEMA_VERSION, HistoryStore, PresetStore
from tests.conftest import make_tiny_config
from tests.fake_discord import ADMIN, BOB, GUILD_ID, FakeDiscord
from tests.test_console import promptpics, run_chat
from tests.test_discord import bot as discord_bot
from tests.test_discord import fake  # noqa: F401  (the fixture)

pytestmark = pytest.mark.timeout(240)

COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (240, 240, 240)]
SHEET_LINE = re.compile(r"^sheet (s[0-9a-f]{6}): (\S+)$", re.M)
DISCORD_UPLOAD_LIMIT = 10 * 1024 * 1024


def solid_png(colour: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def config(tiny_models: Any, tmp_path: Path) -> Config:
    return make_tiny_config(tiny_models, tmp_path / "data", max_image_side=64)


# -- the sheet ------------------------------------------------------------------------------------


def test_contact_sheet_is_two_by_two_in_reading_order_under_label_strips() -> None:
    tiles = [SheetTile(solid_png(c), f"{n} · Model {n}", f"{n}.0 s") for n, c in enumerate(COLOURS, start=1)]
    png = contact_sheet_blocking(tiles, header="a red fox · seed 1")
    sheet = Image.open(io.BytesIO(png)).convert("RGB")
    assert sheet.size == (GAP + 2 * (TILE_SIDE + GAP), HEADER_HEIGHT + GAP + 2 * (TILE_SIDE + LABEL_HEIGHT + GAP))
    for i, colour in enumerate(COLOURS):
        x = GAP + (i % 2) * (TILE_SIDE + GAP)
        y = HEADER_HEIGHT + GAP + (i // 2) * (TILE_SIDE + LABEL_HEIGHT + GAP)
        assert sheet.getpixel((x + TILE_SIDE // 2, y + LABEL_HEIGHT + TILE_SIDE // 2)) == colour  # tile order
        strip = sheet.crop((x, y, x + TILE_SIDE, y + LABEL_HEIGHT))
        assert strip.getpixel((TILE_SIDE - 2, 1)) == LABEL_STRIP  # the label strip is there ...
        assert len(strip.getcolors(maxcolors=1 << 16) or []) > 2  # ... with text drawn on it
    # the labels differ tile to tile: the strips are not the same picture
    strips = [sheet.crop((GAP + (i % 2) * (TILE_SIDE + GAP), HEADER_HEIGHT + GAP + (i // 2) * (TILE_SIDE + LABEL_HEIGHT + GAP),
                          GAP + (i % 2) * (TILE_SIDE + GAP) + TILE_SIDE,
                          HEADER_HEIGHT + GAP + (i // 2) * (TILE_SIDE + LABEL_HEIGHT + GAP) + LABEL_HEIGHT)).tobytes()
              for i in range(4)]
    assert len(set(strips)) == 4
    assert len(png) <= DISCORD_UPLOAD_LIMIT


def test_a_noisy_sheet_is_fitted_under_a_small_upload_limit() -> None:
    noise = Image.effect_noise((512, 512), 90).convert("RGB")
    buf = io.BytesIO()
    noise.save(buf, format="PNG")
    png = contact_sheet_blocking([SheetTile(buf.getvalue(), f"{n}", "") for n in range(1, 10)])
    data, ext = fit_image_blocking(png, 200_000)
    assert len(png) > 200_000 and len(data) <= 200_000 and ext in ("webp", "jpg")


def test_number_reactions_map_to_tiles_with_or_without_the_variation_selector() -> None:
    assert tile_of_emoji("1️⃣", 4) == 1 and tile_of_emoji("4\u20e3", 4) == 4
    assert tile_of_emoji("5️⃣", 4) is None and tile_of_emoji("🔁", 4) is None


# -- the text ---------------------------------------------------------------------------------------


def test_sweep_lays_steps_across_and_guidance_down_and_refuses_past_the_cap() -> None:
    plan = parse_sweep("a fox --model flux_dev --steps 20,24,28 --guidance 3.5,4.5 --seed 7", max_tiles=9)
    assert plan.columns == 3 and plan.seed == 7 and plan.prompt == "a fox"
    assert plan.tiles == (("flux_dev", 20, 3.5), ("flux_dev", 24, 3.5), ("flux_dev", 28, 3.5),
                          ("flux_dev", 20, 4.5), ("flux_dev", 24, 4.5), ("flux_dev", 28, 4.5))
    with pytest.raises(OptionError) as refused:
        parse_sweep("a fox --model flux_dev --steps 20,24,28,32 --guidance 3.5,4.5,5.5", max_tiles=9)
    assert str(refused.value) == ("The sweep is 4 steps x 3 guidance = 12 tiles, but it may be at most 9 tiles "
                                  "([bot] max_sweep_tiles); give fewer values.")
    with pytest.raises(OptionError, match="needs `--model ID`"):
        parse_sweep("a fox --steps 20,24", max_tiles=9)
    with pytest.raises(OptionError, match="`--steps` is '20,x', but it must be whole numbers"):
        parse_sweep("a fox --model flux_dev --steps 20,x", max_tiles=9)


def test_compare_takes_every_model_at_its_defaults_and_one_seed() -> None:
    plan = parse_compare("a red fox --seed 9", ["flux_dev", "realvis_xl", "sd3_medium", "logo_sdxl"])
    assert plan.tiles == tuple((m, None, None) for m in ("flux_dev", "realvis_xl", "sd3_medium", "logo_sdxl"))
    assert plan.seed == 9 and plan.columns == 2
    with pytest.raises(OptionError, match="every model runs at its own defaults"):
        parse_compare("a red fox --steps 4", ["flux_dev"])


# -- end to end in the terminal ------------------------------------------------------------------


def test_piped_compare_writes_a_two_by_two_sheet_and_four_images(cli_env: dict[str, str]) -> None:
    done = promptpics(cli_env, "chat", "--profile", "tiny", stdin="/compare a red fox in the snow\n")
    assert done.returncode == 0, done.stderr[-3000:]
    (sheet_id, sheet_path), = SHEET_LINE.findall(done.stdout)
    sheet = Path(sheet_path)
    assert "sheet" in sheet.name and sheet.is_file()
    images = [Path(line) for line in done.stdout.splitlines() if line.endswith(".png") and "/images/" in line]
    assert len(images) == 4 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in images)
    with Image.open(sheet) as opened:
        assert opened.size == (GAP + 2 * (TILE_SIDE + GAP), HEADER_HEIGHT + GAP + 2 * (TILE_SIDE + LABEL_HEIGHT + GAP))
    for name in ("FLUX.1-dev 🎨", "RealVisXL V4.0 📷", "Stable Diffusion 3 Medium 🧩", "HiDream-I1 (text & logos) 🔤"):
        assert name in done.stdout  # the caption names each tile's model and emoji
    assert "Traceback" not in done.stderr


async def test_sweep_three_by_three_writes_one_sheet_and_over_the_cap_is_refused(config: Config) -> None:
    code, out = await run_chat(config, "/sweep a fox --model flux_dev --steps 1,2,3 --guidance 3.5,4.5,5.5 --seed 3\n")
    assert code == 0, out
    (sheet_id, sheet_path), = SHEET_LINE.findall(out)
    with Image.open(sheet_path) as opened:
        assert opened.size == (GAP + 3 * (TILE_SIDE + GAP), HEADER_HEIGHT + GAP + 3 * (TILE_SIDE + LABEL_HEIGHT + GAP))
    jobs = await stored(config)
    assert sorted((j.params.steps, j.params.guidance) for j in jobs) == [
        (s, g) for s in (1, 2, 3) for g in (3.5, 4.5, 5.5)]
    assert {j.params.seed for j in jobs} == {3} and {j.status for j in jobs} == {JobStatus.SUCCEEDED}

    code, out = await run_chat(config, "/sweep a fox --model flux_dev --steps 1,2,3,4 --guidance 3.5,4.5,5.5\n",
                               max_sweep_tiles=9)
    assert code == 1 and "12 tiles, but it may be at most 9 tiles ([bot] max_sweep_tiles)" in out
    assert len(await stored(config)) == 9  # nothing more was queued

    code, out = await run_chat(config, "/sweep a fox --model flux_dev --steps 1,2,999\n")
    assert code == 1 and "steps is 999, but it must be a whole number from 1 to 50" in out
    assert len(await stored(config)) == 9  # refused whole: not two tiles queued and the third refused


async def test_a_sweep_pick_sets_the_preset_across_restarts_until_it_is_reset(config: Config) -> None:
    code, out = await run_chat(config, "/sweep a fox --model flux_dev --steps 2,3 --guidance 3.5,5.5 --seed 1\n")
    assert code == 0, out
    (sheet_id, _), = SHEET_LINE.findall(out)

    code, out = await run_chat(config, f"/pick {sheet_id} 4\n/models\n/preset\n")  # a new engine: tile 4 is 3 steps / 5.5
    assert code == 0, out
    assert "FLUX.1-dev now runs at 3 steps, guidance 5.5" in out
    assert "steps 3, guidance 5.5 (preset from /sweep)" in out and "`flux_dev` FLUX.1-dev: 3 steps" not in out
    assert "flux_dev FLUX.1-dev: 3 steps, guidance 5.5 (set by console:tester)" in out

    code, out = await run_chat(config, "/imagine a fox --model flux_dev\n/imagine a fox --model flux_dev --steps 1\n")
    assert code == 0, out
    latest = sorted((j for j in await stored(config) if j.params.prompt == "a fox"), key=lambda j: j.seq)[-2:]
    assert [(j.params.steps, j.params.guidance) for j in latest] == [(3, 5.5), (1, 5.5)]  # a set value wins

    code, out = await run_chat(config, "/preset reset flux_dev\n/imagine a fox --model flux_dev\n")
    assert code == 0 and "FLUX.1-dev is back to config.toml's 24 steps, guidance 4.5." in out
    newest = max(await stored(config), key=lambda j: j.seq)
    assert (newest.params.steps, newest.params.guidance) == (24, 4.5)
    async with HistoryStore.open(config.data_dir) as history:
        assert await PresetStore(history).presets() == {}
        assert (await PresetStore(history).sheet(sheet_id)).picked == 4  # type: ignore[union-attr]
        assert await history._scalar("PRAGMA user_version") == SCHEMA_VERSION


async def test_eight_concurrent_compares_admit_whole_groups_up_to_the_per_user_cap(config: Config) -> None:
    capped = config.model_copy(update={"scheduler": config.scheduler.model_copy(update={"max_queued_per_user": 10})})
    user = Actor("chat", "alice", "Alice")
    async with Engine(capped) as engine:
        commands = Commands(engine, BotSettings(cooldown_s=0.0), {"chat": AdminPolicy()})
        replies: list[Reply] = await asyncio.gather(*(
            commands.groups.compare(user, f"fox number {n} --seed {n}", Origin("chat", "room")) for n in range(8)))
        admitted = [r for r in replies if r.ok]
        refused = [r for r in replies if not r.ok]
        await commands.groups.settled()
        jobs = await engine.history.recent_jobs(limit=100)
    assert len(admitted) == 2 and len(refused) == 6  # 2 x 4 jobs fill the cap of 10; a third would be 12
    assert all("asks for 4 jobs at once" in r.text and "none of them was queued" in r.text for r in refused)
    by_prompt: dict[str, list[str]] = {}
    for job in jobs:
        by_prompt.setdefault(job.params.prompt, []).append(job.params.model_id)
    assert len(by_prompt) == 2 and all(sorted(models) == sorted(capped.models) for models in by_prompt.values())


def test_a_group_takes_all_its_seats_or_none() -> None:
    admission = Admission(max_queued_jobs=100, max_queued_per_user=10)
    admission.reserve_many("chat:alice", 4)
    admission.reserve_many("chat:alice", 4)
    with pytest.raises(QueueFullError) as refused:
        admission.reserve_many("chat:alice", 4)
    assert admission.held("chat:alice") == 8  # the refused group took nothing
    assert refused.value.user_message.startswith("This asks for 4 jobs at once and you have 8 waiting; one person may "
                                                 "queue at most 10, so none of them was queued.")
    admission.reserve_many("chat:bob", 10)
    with pytest.raises(QueueFullError):
        Admission(max_queued_jobs=5, max_queued_per_user=10).reserve_many("chat:carol", 6)


async def stored(config: Config) -> list[Any]:
    async with HistoryStore.open(config.data_dir) as history:
        return await history.recent_jobs(limit=100)


# -- end to end on Discord (the fake server) -------------------------------------------------------


async def test_compare_on_discord_posts_four_images_and_a_sheet_whose_number_records_the_pick(
        fake: FakeDiscord, config: Config) -> None:
    async with discord_bot(fake, config) as running:
        interaction = await fake.slash("compare", {"prompt": "a red fox in the snow", "seed": 5})
        ack = (await running.reply_to(interaction))["content"]
        sheet_id = re.search(r"Compare `(s[0-9a-f]{6})`", ack)[1]  # type: ignore[index]
        job_ids = re.findall(r"`([a-z0-9]{6})`", ack.split("queued", 1)[1])
        results = [await running.result_of(job_id) for job_id in job_ids]

        def sheet_message() -> dict[str, Any] | None:
            return next((m for m in fake.channel_messages(with_files=True) if f"{sheet_id}-sheet.png" in m["files"]
                         and len(fake.reactions.get(int(m["id"]), [])) == 4), None)

        sheet = await fake.wait_for(sheet_message)
        await fake.react(sheet["id"], "2️⃣", user_id=BOB)
        answer = await fake.wait_for(lambda: [m for m in fake.channel_messages() if m["reference"] == sheet["id"]])
        record = await running.core.engine.presets_store.sheet(sheet_id)
        feedback = [r for r in await running.core.engine.feedback.rows() if r.kind == "compare_pick"]
    assert len(job_ids) == 4 and len(results) == 4
    # The pick is routing feedback for `router learn` (docs/ROUTER.md), made in this server.
    assert [(r.prompt, r.chosen_model, r.job_id, r.user_key, r.server_id) for r in feedback] == [
        ("a red fox in the snow", "realvis_xl", sheet_id, f"discord:{BOB}", str(GUILD_ID))]
    assert fake.reactions[int(sheet["id"])] == ["1️⃣", "2️⃣", "3️⃣", "4️⃣"]
    assert all(name in sheet["content"] for name in ("FLUX.1-dev 🎨", "RealVisXL V4.0 📷", "HiDream-I1 (text & logos) 🔤"))
    with Image.open(io.BytesIO(sheet["files"][f"{sheet_id}-sheet.png"])) as opened:
        assert opened.size[0] == GAP + 2 * (TILE_SIDE + GAP)
    assert answer[0]["content"] == f"<@{BOB}> Noted: RealVisXL V4.0 is your pick for sheet `{sheet_id}`."
    assert record is not None and record.picked == 2 and record.picked_by == f"discord:{BOB}"
    assert list(record.job_ids) == job_ids


async def test_on_discord_a_sweep_number_from_a_non_admin_is_refused_and_an_admins_sets_the_preset(fake: FakeDiscord, config: Config) -> None:
    async with discord_bot(fake, config) as running:
        interaction = await fake.slash("sweep", {"prompt": "a lighthouse", "model": "flux_dev", "steps": "1,2",
                                                 "guidance": "3.5"}, user_id=ADMIN)
        ack = (await running.reply_to(interaction))["content"]
        sheet_id = re.search(r"Sweep `(s[0-9a-f]{6})`", ack)[1]  # type: ignore[index]
        sheet = await fake.wait_for(lambda: next((m for m in fake.channel_messages(with_files=True)
                                                  if f"{sheet_id}-sheet.png" in m["files"]
                                                  and len(fake.reactions.get(int(m["id"]), [])) == 2), None))
        await fake.react(sheet["id"], "2️⃣", user_id=BOB)
        refusal = await fake.wait_for(lambda: [m for m in fake.channel_messages() if m["reference"] == sheet["id"]])
        await fake.react(sheet["id"], "2️⃣", user_id=ADMIN)
        await fake.wait_for(lambda: len([m for m in fake.channel_messages() if m["reference"] == sheet["id"]]) == 2)
        preset = running.core.engine.presets.get("flux_dev")  # type: ignore[union-attr]
    assert refusal[0]["content"] == f"<@{BOB}> Sorry, `/sweep` is for the bot's admins."
    assert preset is not None and (preset.steps, preset.guidance) == (2, 3.5)
