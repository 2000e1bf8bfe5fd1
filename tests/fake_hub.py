"""A small model hub on 127.0.0.1 that answers the calls huggingface_hub 2.x makes for a
download, so `promptpics download` runs its real code against it.

The endpoints (huggingface_hub/hf_api.py, file_download.py, _snapshot_download.py):

    GET  /api/models/{repo}[/revision/{rev}][?blobs=True]  model_info: sha, siblings (with sizes)
    GET  /api/models/{repo}/tree/{rev}?recursive=True      list_repo_tree: [{type, path, size, oid, lfs}]
    HEAD /{repo}/resolve/{rev}/{path}                      metadata: X-Repo-Commit, ETag, X-Linked-Size
    GET  /{repo}/resolve/{rev}/{path}                      the bytes; honours "Range: bytes=N-" (206)

A gated repository answers its files with 401 (no token) or 403 (a token without access) and
``X-Error-Code: GatedRepo``, as the hub does; its listing stays public. ``cut`` makes the next
GETs of a file stop half-way (the connection closes before Content-Length bytes).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    gated: bool = False
    granted_tokens: set[str] = field(default_factory=set)
    commit: str = ""

    def __post_init__(self) -> None:
        digest = hashlib.sha1(json.dumps(sorted((p, hashlib.sha256(b).hexdigest()) for p, b in self.files.items()))
                              .encode()).hexdigest()
        self.commit = self.commit or digest

    @classmethod
    def from_folder(cls, folder: Path, *, extra: Mapping[str, bytes] = {}, gated: bool = False) -> FakeRepo:
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
                 if p.is_file() and not p.name.startswith(".")}
        return cls({**files, **extra}, gated=gated)


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo]
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)
    cuts: dict[str, int] = field(default_factory=dict)  # file path -> GETs still to cut half-way
    url: str = ""

    def cut(self, path: str, times: int = 1) -> None:
        self.cuts[path] = times

    def gets(self, path: str) -> list[str | None]:
        """The Range header of every GET of a file (None: the whole file)."""
        return [r for m, p, r in self.requests if m == "GET" and "/resolve/" in p and p.endswith("/" + path)]


@contextmanager
def serve_hub(repos: dict[str, FakeRepo]) -> Iterator[FakeHub]:
    hub = FakeHub(repos)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Range")))
            if path.startswith("/api/models/"):
                return self._api(path[len("/api/models/"):])
            if "/resolve/" in path:
                repo_id, _, rest = path.lstrip("/").partition("/resolve/")
                return self._file(repo_id, rest.partition("/")[2], body)
            self._json(404, {"error": "not found"})

        def _api(self, rest: str) -> None:
            if rest in hub.repos:  # model_info without a revision: the default branch
                return self._json(200, _info(rest, hub.repos[rest]))
            for marker in ("/revision/", "/tree/"):
                if marker in rest:
                    repo_id = rest.partition(marker)[0]
                    repo = hub.repos.get(repo_id)
                    if repo is None:
                        return self._json(401, {"error": "Repository not found"}, code="RepoNotFound")
                    return self._json(200, _info(repo_id, repo) if marker == "/revision/" else _tree(repo))
            # The hub answers an unknown (or private) repository 401, so as not to say which it is.
            self._json(401, {"error": "Repository not found"}, code="RepoNotFound")

        def _file(self, repo_id: str, name: str, body: bool) -> None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._json(401, {"error": "Repository not found"}, code="RepoNotFound", body=body)
            token = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
            if repo.gated and token not in repo.granted_tokens:
                message = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
                return self._json(403 if token else 401, {"error": message}, code="GatedRepo", body=body)
            data = repo.files.get(name)
            if data is None:
                return self._json(404, {"error": "Entry not found"}, code="EntryNotFound", body=body)
            start = int(self.headers.get("Range", "bytes=0-").removeprefix("bytes=").split("-")[0] or 0)
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if not body:
                return
            if hub.cuts.get(name, 0) > 0 and self.command == "GET":
                hub.cuts[name] -= 1
                half = start + (len(data) - start) // 2
                self.wfile.write(data[start:half])
                self.wfile.flush()
                self.close_connection = True  # fewer bytes than Content-Length promised
                return
            self.wfile.write(data[start:])

        def _json(self, status: int, payload: object, *, code: str | None = None, body: bool = True) -> None:
            raw = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            if code:
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", str(payload))
            self.end_headers()
            if body:
                self.wfile.write(raw)

    return Handler


def _entry(path: str, data: bytes) -> dict[str, object]:
    return {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest(),
            "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}}


def _info(repo_id: str, repo: FakeRepo) -> dict[str, object]:
    siblings = [{"rfilename": p, "size": len(b), "blobId": hashlib.sha1(b).hexdigest(),
                 "lfs": {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b), "pointerSize": 134}}
                for p, b in sorted(repo.files.items())]
    return {"id": repo_id, "sha": repo.commit, "private": False, "gated": "manual" if repo.gated else False,
            "siblings": siblings}


def _tree(repo: FakeRepo) -> list[dict[str, object]]:
    folders = sorted({p.rpartition("/")[0] for p in repo.files if "/" in p})
    return ([{"type": "directory", "path": f, "oid": "0" * 40, "size": 0} for f in folders]
            + [_entry(p, b) for p, b in sorted(repo.files.items())])
