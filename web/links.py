"""Members' private gallery links: an HMAC-signed, expiring token naming one requester, and the
key that signs them. Standard library only: the bot's ``/gallery`` command makes these links in
its own process without loading the web server.

A link is ``<base>/g/<payload>.<signature>``. The payload is base64url JSON
``{"p": platform, "u": user_id, "n": display name, "e": expiry (unix s)}``; the signature is
HMAC-SHA256 over the payload's ASCII bytes, cut to 128 bits. The signature is checked on those raw
bytes before anything is decoded (verify, then parse).

The key is ``PROMPTPICS_WEB_SECRET`` when set, else ``<data_dir>/web-secret.key``: 32 random bytes
written once (0600) by whichever process needs it first, so the bot and ``promptpics web`` sign
and check with the same key. Deleting the file (or changing the variable) revokes every link.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

SECRET_FILE = "web-secret.key"
SECRET_VARIABLE = "PROMPTPICS_WEB_SECRET"
SIGNATURE_BYTES = 16


class LinkError(Exception):
    """A gallery link that cannot be honoured; ``str(exc)`` is the sentence for the visitor."""


@dataclass(frozen=True, slots=True)
class Member:
    """Whose jobs a valid link shows, and until when."""

    platform: str
    user_id: str
    name: str
    expires_at: float


def load_secret(data_dir: Path, env: dict[str, str] | None = None) -> bytes:
    """The signing key: the environment's, or the data folder's key file (made on first use)."""
    value = (os.environ if env is None else env).get(SECRET_VARIABLE, "")
    if value.strip():
        return hashlib.sha256(value.strip().encode()).digest()
    path = Path(data_dir) / SECRET_FILE
    try:
        return bytes.fromhex(path.read_text(encoding="ascii").strip())
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = secrets.token_bytes(32)
    try:  # O_EXCL: of two processes making it at once, one wins and both read the winner's
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return bytes.fromhex(path.read_text(encoding="ascii").strip())
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(fresh.hex())
        f.flush()
        os.fsync(f.fileno())
    return fresh


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(key: bytes, payload: str) -> str:
    mac = hmac.new(key, b"promptpics-gallery-link:" + payload.encode("ascii"), hashlib.sha256)
    return _b64(mac.digest()[:SIGNATURE_BYTES])


def sign_link(key: bytes, platform: str, user_id: str, name: str, ttl_s: float, *, now: float | None = None) -> str:
    """The token part of a link (``<payload>.<signature>``), valid for ``ttl_s`` seconds."""
    expires = int((time.time() if now is None else now) + ttl_s)
    body = json.dumps({"p": platform, "u": user_id, "n": name, "e": expires}, separators=(",", ":"), ensure_ascii=False)
    payload = _b64(body.encode("utf-8"))
    return f"{payload}.{_signature(key, payload)}"


def gallery_url(base_url: str, token: str) -> str:
    return f"{base_url.rstrip('/')}/g/{token}"


def verify_link(key: bytes, token: str, *, now: float | None = None) -> Member:
    """The member a token names; LinkError when it is malformed, tampered with or expired."""
    payload, dot, signature = token.partition(".")
    if not dot or not payload.isascii() or not signature.isascii():
        raise LinkError("This gallery link is not valid; ask for a new one with /gallery.")
    # 1. verify the raw bytes ...
    if not hmac.compare_digest(_signature(key, payload), signature):
        raise LinkError("This gallery link is not valid; ask for a new one with /gallery.")
    # 2. ... then parse what was signed
    try:
        data = json.loads(_unb64(payload))
        member = Member(str(data["p"]), str(data["u"]), str(data.get("n", "")), float(data["e"]))
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise LinkError("This gallery link is not valid; ask for a new one with /gallery.") from exc
    if member.expires_at <= (time.time() if now is None else now):
        raise LinkError("This gallery link has expired; ask for a new one with /gallery.")
    return member
