"""The bot side's settings: the raw [bot] and [discord] tables of config.toml plus tokens from
the environment, validated once at start-up into frozen dataclasses.

Every broken rule stops start-up with one ``ConfigError`` naming the key, the value and the
rule, like the engine's own config. Tokens come only from the environment (a token in a file
ends up in a commit) and are never shown: not in an error, a log line or a ``repr``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine import Config, ConfigError

DISCORD_API_BASE = "https://discord.com/api/v10"
DISCORD_GATEWAY_URL = "wss://gateway.discord.gg/"
HIDDEN = "(hidden)"  # what an error shows instead of a token


@dataclass(frozen=True, slots=True)
class BotSettings:
    """[bot]: what every platform shares."""

    cooldown_s: float = 10.0  # per user, between two submitted jobs; admins are exempt
    progress_interval_s: float = 2.0  # at most one status edit per message this often
    history_limit: int = 10  # rows shown by /history
    regenerate_emoji: str = "🔁"
    cancel_emoji: str = "❌"


@dataclass(frozen=True, slots=True)
class DiscordSettings:
    """[discord] plus DISCORD_TOKEN, DISCORD_API_BASE and DISCORD_GATEWAY_URL."""

    token: str | None = field(default=None, repr=False)
    api_base: str = DISCORD_API_BASE
    gateway_url: str = DISCORD_GATEWAY_URL
    admin_user_ids: frozenset[str] = frozenset()
    admin_role_ids: frozenset[str] = frozenset()
    max_upload_bytes: int = 0  # 0: the limit Discord states for the channel; else at most this


@dataclass(frozen=True, slots=True)
class Settings:
    bot: BotSettings
    discord: DiscordSettings
    # Slack (issue 8): add `slack: SlackSettings` here, read from [slack] and SLACK_* variables.

    @property
    def platforms_with_tokens(self) -> list[str]:
        return ["discord"] if self.discord.token else []


def load_settings(config: Config, env: Mapping[str, str]) -> Settings:
    tables = config.platform_tables
    bot = parse_bot_settings(tables.get("bot", {}), config)
    return Settings(bot=bot, discord=parse_discord_settings(tables.get("discord", {}), env))


# -- [bot] -------------------------------------------------------------------------------------


def parse_bot_settings(raw: Mapping[str, Any], config: Config) -> BotSettings:
    _no_unknown_keys(raw, "bot.", BotSettings)
    defaults = BotSettings()
    settings = BotSettings(
        cooldown_s=_number(raw, "bot.", "cooldown_s", defaults.cooldown_s, low=0.0),
        progress_interval_s=_number(raw, "bot.", "progress_interval_s", defaults.progress_interval_s, low=0.0),
        history_limit=_whole(raw, "bot.", "history_limit", defaults.history_limit, low=1, high=50),
        regenerate_emoji=_emoji(raw, "bot.", "regenerate_emoji", defaults.regenerate_emoji),
        cancel_emoji=_emoji(raw, "bot.", "cancel_emoji", defaults.cancel_emoji),
    )
    taken = {m.emoji: f"models.{m.id}.emoji" for m in config.models.values() if m.emoji}
    for key in ("regenerate_emoji", "cancel_emoji"):
        value = getattr(settings, key)
        if value in taken:
            raise ConfigError(f"bot.{key}", value, f"it must differ from every model's emoji ({taken[value]} has it)")
    if settings.regenerate_emoji == settings.cancel_emoji:
        raise ConfigError("bot.cancel_emoji", settings.cancel_emoji, "it must differ from bot.regenerate_emoji")
    return settings


# -- [discord] ---------------------------------------------------------------------------------

_DISCORD_KEYS = {"api_base", "gateway_url", "admin_user_ids", "admin_role_ids", "max_upload_bytes"}


def parse_discord_settings(raw: Mapping[str, Any], env: Mapping[str, str]) -> DiscordSettings:
    if "token" in raw:
        raise ConfigError("discord.token", HIDDEN, "tokens are read only from the DISCORD_TOKEN environment "
                                                    "variable, never from a file; remove the key")
    _no_unknown_keys(raw, "discord.", _DISCORD_KEYS)
    api_base = env.get("DISCORD_API_BASE") or _text(raw, "discord.", "api_base", DISCORD_API_BASE)
    gateway = env.get("DISCORD_GATEWAY_URL") or _text(raw, "discord.", "gateway_url", DISCORD_GATEWAY_URL)
    _url("DISCORD_API_BASE" if env.get("DISCORD_API_BASE") else "discord.api_base", api_base, ("http://", "https://"))
    _url("DISCORD_GATEWAY_URL" if env.get("DISCORD_GATEWAY_URL") else "discord.gateway_url", gateway, ("ws://", "wss://"))
    return DiscordSettings(
        token=_token("DISCORD_TOKEN", env.get("DISCORD_TOKEN")),
        api_base=api_base.rstrip("/"),
        gateway_url=gateway,
        admin_user_ids=_snowflakes(raw, "discord.", "admin_user_ids"),
        admin_role_ids=_snowflakes(raw, "discord.", "admin_role_ids"),
        max_upload_bytes=_whole(raw, "discord.", "max_upload_bytes", 0, low=0, high=None),
    )


# -- small typed readers: each names key, value and rule ---------------------------------------


def _no_unknown_keys(raw: Mapping[str, Any], prefix: str, known: type | set[str]) -> None:
    names = {f.name for f in dataclasses.fields(known)} if isinstance(known, type) else known
    for key in raw:
        if key not in names:
            raise ConfigError(prefix + key, raw[key], f"it is not a known key here (known: {', '.join(sorted(names))})")


def _number(raw: Mapping[str, Any], prefix: str, key: str, default: float, *, low: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(prefix + key, value, "it must be a number")
    if value < low:
        raise ConfigError(prefix + key, value, f"it must be at least {low:g}")
    return float(value)


def _whole(raw: Mapping[str, Any], prefix: str, key: str, default: int, *, low: int, high: int | None) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(prefix + key, value, "it must be a whole number")
    if value < low or (high is not None and value > high):
        rule = f"it must be at least {low}" if high is None else f"it must be from {low} to {high}"
        raise ConfigError(prefix + key, value, rule)
    return value


def _text(raw: Mapping[str, Any], prefix: str, key: str, default: str) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(prefix + key, value, "it must be a non-empty string")
    return value.strip()


def _emoji(raw: Mapping[str, Any], prefix: str, key: str, default: str) -> str:
    value = _text(raw, prefix, key, default)
    if len(value) > 8 or any(ch.isspace() for ch in value):
        raise ConfigError(prefix + key, value, "it must be one emoji, such as '🔁'")
    return value


def _url(key: str, value: str, schemes: tuple[str, ...]) -> None:
    if not value.startswith(schemes) or len(value) <= len(schemes[-1]):
        raise ConfigError(key, value, f"it must be a URL starting with {' or '.join(schemes)}")


def _snowflakes(raw: Mapping[str, Any], prefix: str, key: str) -> frozenset[str]:
    """Discord ids: TOML integers or strings of digits (both appear in copied settings)."""
    value = raw.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(prefix + key, value, "it must be a list of Discord ids, such as [\"123456789012345678\"]")
    ids = set()
    for item in value:
        text = str(item) if isinstance(item, int) and not isinstance(item, bool) else item
        if not isinstance(text, str) or not text.isdigit():
            raise ConfigError(prefix + key, item, "each entry must be a Discord id: digits only "
                                                  "(Developer Mode -> right-click -> Copy ID)")
        ids.add(text)
    return frozenset(ids)


def _token(name: str, value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    if any(ch.isspace() for ch in value.strip()):
        raise ConfigError(name, HIDDEN, "a token has no spaces or line breaks; copy it again from the developer portal")
    return value.strip()
