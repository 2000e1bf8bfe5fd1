"""[web] of config.toml plus PROMPTPICS_WEB_TOKEN, validated once at start-up (engine's readers).

The admin token is read only from the environment and never shown (not in an error, a log line
or a ``repr``); without it the admin pages and /metrics answer 403 to everyone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from engine import HIDDEN, Config, ConfigError, SettingsModel, broken, validate_table

TOKEN_VARIABLE = "PROMPTPICS_WEB_TOKEN"
MIN_TOKEN_LENGTH = 16


def _token(value: Any) -> Any:
    if value is None or not isinstance(value, str) or not value.strip():
        return None
    value = value.strip()
    if any(ch.isspace() for ch in value):
        raise broken("a token has no spaces or line breaks", HIDDEN)
    if len(value) < MIN_TOKEN_LENGTH:
        raise broken(f"it must be at least {MIN_TOKEN_LENGTH} characters (try `python -c "
                     "\"import secrets; print(secrets.token_urlsafe(32))\"`)", HIDDEN)
    return value


def _public_url(value: Any) -> Any:
    if isinstance(value, str) and value and not value.startswith(("http://", "https://")):
        raise broken("it must be empty or a URL starting with http:// or https://")
    return value.rstrip("/") if isinstance(value, str) else value


class WebSettings(SettingsModel):
    """[web]: the gallery and dashboard (docs/WEB.md)."""

    enabled: StrictBool = False  # `promptpics run` serves it too, from the same engine
    host: StrictStr = "127.0.0.1"  # a reverse proxy in front for anything else (docs/WEB.md)
    port: StrictInt = Field(8765, ge=0, le=65535)
    public_url: Annotated[StrictStr, BeforeValidator(_public_url)] = ""  # "": http://host:port
    link_ttl_days: StrictFloat = Field(7.0, gt=0.0, le=365.0)  # how long a /gallery link works
    session_hours: StrictFloat = Field(12.0, gt=0.0, le=24.0 * 30)  # an admin login lasts this long
    secure_cookies: StrictBool = False  # true behind an https proxy: the session cookie is then https-only
    page_size: StrictInt = Field(48, ge=1, le=200)
    thumb_side: StrictInt = Field(256, ge=32, le=1024)
    token: Annotated[str | None, BeforeValidator(_token)] = Field(None, repr=False, json_schema_extra={"secret": True})

    @property
    def base_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"


def load_web_settings(config: Config, env: Mapping[str, str]) -> WebSettings:
    raw = config.platform_tables.get("web", {})
    if isinstance(raw, Mapping) and "token" in raw:
        raise ConfigError("web.token", HIDDEN, f"the admin token is read only from the {TOKEN_VARIABLE} environment "
                                               "variable, never from a file; remove the key")
    table = {**raw, "token": env[TOKEN_VARIABLE]} if isinstance(raw, Mapping) and env.get(TOKEN_VARIABLE) else raw
    return validate_table(WebSettings, table, "web.", sources={"token": TOKEN_VARIABLE})
