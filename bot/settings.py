"""The bot side's settings: the raw [bot], [discord] and [slack] tables of config.toml plus tokens
from the environment, validated once at start-up into frozen dataclasses.

Every broken rule stops start-up with one ``ConfigError`` naming the key, the value and the
rule, like the engine's own config. Tokens come only from the environment (a token in a file
ends up in a commit) and are never shown: not in an error, a log line or a ``repr``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from engine import Config, ConfigError

DISCORD_API_BASE = "https://discord.com/api/v10"
DISCORD_GATEWAY_URL = "wss://gateway.discord.gg/"
SLACK_API_URL = "https://slack.com/api/"
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


# Slack reacts with names, not characters: the bot's emojis as Slack names (":repeat:" is 🔁).
# Keys without the variation selector U+FE0F. More go in [slack.emoji_names].
SLACK_EMOJI_NAMES: Mapping[str, str] = MappingProxyType({
    "🔁": "repeat", "🔄": "arrows_counterclockwise", "♻": "recycle", "🎲": "game_die", "❌": "x",
    "✖": "heavy_multiplication_x", "🗑": "wastebasket", "🚫": "no_entry_sign", "🛑": "octagonal_sign",
    "🎨": "art", "📷": "camera", "📸": "camera_with_flash", "🧩": "jigsaw", "🔤": "abc", "🔠": "capital_abcd",
    "🔡": "abcd", "🖼": "frame_with_picture", "🖌": "lower_left_paintbrush", "✏": "pencil2", "📝": "memo",
    "✨": "sparkles", "🌄": "sunrise_over_mountains", "🏞": "national_park", "👤": "bust_in_silhouette",
    "🔥": "fire", "⭐": "star", "🚀": "rocket", "🔮": "crystal_ball", "🤖": "robot_face", "🌈": "rainbow",
    "💡": "bulb", "🎬": "clapper", "🧪": "test_tube", "🆕": "new", "📐": "triangular_ruler", "🦊": "fox_face",
})
_SLACK_EMOJI_NAME = re.compile(r"[a-z0-9_+'-]{1,100}")
_SLACK_USER_ID = re.compile(r"[UW][A-Z0-9]{2,}")
SLACK_MODES = ("socket", "http")


@dataclass(frozen=True, slots=True)
class SlackSettings:
    """[slack] plus SLACK_BOT_TOKEN, SLACK_APP_TOKEN, SLACK_SIGNING_SECRET and SLACK_API_URL."""

    bot_token: str | None = field(default=None, repr=False)  # xoxb-: every Web API call
    app_token: str | None = field(default=None, repr=False)  # xapp-: Socket Mode only
    signing_secret: str | None = field(default=None, repr=False)  # HTTP mode only: checks each request
    api_url: str = SLACK_API_URL  # ends with "/": slack_sdk appends the method name
    mode: str = "socket"  # "socket": no public URL needed; "http": Slack posts to http_host:http_port/http_path
    http_host: str = "0.0.0.0"
    http_port: int = 3000
    http_path: str = "/slack/events"
    admin_user_ids: frozenset[str] = frozenset()
    imagine_command: str = "/imagine"
    admin_command: str = "/promptpics"
    max_retries: int = 4  # a Web API call answered 429 (after Retry-After) or 5xx (with backoff)
    retry_backoff_s: float = 1.0  # first wait after a 5xx; doubled each time
    emoji_names: Mapping[str, str] = field(default_factory=lambda: SLACK_EMOJI_NAMES, repr=False)


@dataclass(frozen=True, slots=True)
class Settings:
    bot: BotSettings
    discord: DiscordSettings
    slack: SlackSettings = SlackSettings()

    @property
    def platforms_with_tokens(self) -> list[str]:
        return [name for name, token in (("discord", self.discord.token), ("slack", self.slack.bot_token)) if token]


def load_settings(config: Config, env: Mapping[str, str]) -> Settings:
    tables = config.platform_tables
    bot = parse_bot_settings(tables.get("bot", {}), config)
    return Settings(bot=bot, discord=parse_discord_settings(tables.get("discord", {}), env),
                    slack=parse_slack_settings(tables.get("slack", {}), env, bot, config))


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


# -- [slack] -----------------------------------------------------------------------------------

_SLACK_KEYS = {"api_url", "mode", "http_host", "http_port", "http_path", "admin_user_ids", "imagine_command",
               "admin_command", "max_retries", "retry_backoff_s", "emoji_names"}
_SLACK_SECRETS = {"bot_token": "SLACK_BOT_TOKEN", "app_token": "SLACK_APP_TOKEN", "signing_secret": "SLACK_SIGNING_SECRET",
                  "token": "SLACK_BOT_TOKEN"}


def parse_slack_settings(raw: Mapping[str, Any], env: Mapping[str, str], bot: BotSettings | None = None,
                         config: Config | None = None) -> SlackSettings:
    for key, variable in _SLACK_SECRETS.items():
        if key in raw:
            raise ConfigError(f"slack.{key}", HIDDEN, f"tokens and secrets are read only from the {variable} "
                                                      "environment variable, never from a file; remove the key")
    _no_unknown_keys(raw, "slack.", _SLACK_KEYS)
    d = SlackSettings()
    api_url = env.get("SLACK_API_URL") or _text(raw, "slack.", "api_url", d.api_url)
    _url("SLACK_API_URL" if env.get("SLACK_API_URL") else "slack.api_url", api_url, ("http://", "https://"))
    mode = _text(raw, "slack.", "mode", d.mode).lower()
    if mode not in SLACK_MODES:
        raise ConfigError("slack.mode", mode, "it must be \"socket\" (Socket Mode, the default) or \"http\"")
    settings = SlackSettings(
        bot_token=_slack_secret(env, "SLACK_BOT_TOKEN", "xoxb-", "the Bot User OAuth Token (OAuth & Permissions)"),
        app_token=_slack_secret(env, "SLACK_APP_TOKEN", "xapp-", "an App-Level Token with connections:write"),
        signing_secret=_token("SLACK_SIGNING_SECRET", env.get("SLACK_SIGNING_SECRET")),
        api_url=api_url.rstrip("/") + "/",
        mode=mode,
        http_host=_text(raw, "slack.", "http_host", d.http_host),
        http_port=_whole(raw, "slack.", "http_port", d.http_port, low=0, high=65535),
        http_path=_slack_path(raw),
        admin_user_ids=_slack_user_ids(raw),
        imagine_command=_slash_command(raw, "imagine_command", d.imagine_command),
        admin_command=_slash_command(raw, "admin_command", d.admin_command),
        max_retries=_whole(raw, "slack.", "max_retries", d.max_retries, low=0, high=10),
        retry_backoff_s=_number(raw, "slack.", "retry_backoff_s", d.retry_backoff_s, low=0.0),
        emoji_names=_slack_emoji_names(raw),
    )
    if settings.imagine_command == settings.admin_command:
        raise ConfigError("slack.admin_command", settings.admin_command, "it must differ from slack.imagine_command")
    _check_slack_tokens(settings)
    if settings.bot_token is not None:  # a Discord-only bot may use emojis Slack has no name for here
        _check_slack_emojis(settings.emoji_names, bot, config)
    return settings


def _check_slack_tokens(s: SlackSettings) -> None:
    """Slack is served when SLACK_BOT_TOKEN is set; then the chosen mode's own secret must be there."""
    if s.bot_token is None:
        if s.app_token or s.signing_secret:
            given = "SLACK_APP_TOKEN" if s.app_token else "SLACK_SIGNING_SECRET"
            raise ConfigError("SLACK_BOT_TOKEN", "(not set)", f"{given} is set, so Slack needs the bot token too "
                                                               "(xoxb-..., from OAuth & Permissions)")
        return
    if s.mode == "socket" and s.app_token is None:
        hint = (" or set [slack] mode = \"http\" to use SLACK_SIGNING_SECRET" if s.signing_secret else "")
        raise ConfigError("SLACK_APP_TOKEN", "(not set)", "Socket Mode (the default) needs an App-Level Token "
                                                         f"(xapp-..., scope connections:write){hint}")
    if s.mode == "http" and s.signing_secret is None:
        raise ConfigError("SLACK_SIGNING_SECRET", "(not set)", "HTTP mode checks every request with the app's "
                                                              "Signing Secret (Basic Information > App Credentials)")


def _slack_secret(env: Mapping[str, str], name: str, prefix: str, what: str) -> str | None:
    value = _token(name, env.get(name))
    if value is not None and not value.startswith(prefix):
        raise ConfigError(name, HIDDEN, f"it must start with {prefix!r}: {what}")
    return value


def _slack_path(raw: Mapping[str, Any]) -> str:
    path = _text(raw, "slack.", "http_path", SlackSettings().http_path)
    if not path.startswith("/") or any(ch.isspace() for ch in path):
        raise ConfigError("slack.http_path", path, "it must be a URL path starting with /, such as \"/slack/events\"")
    return path


def _slash_command(raw: Mapping[str, Any], key: str, default: str) -> str:
    value = _text(raw, "slack.", key, default).lower()
    if not re.fullmatch(r"/[a-z0-9_-]{1,31}", value):
        raise ConfigError(f"slack.{key}", value, "it must be a slash command as named in the app manifest, "
                                                  "such as \"/imagine\" (a slash, then up to 31 letters, digits, - or _)")
    return value


def _slack_user_ids(raw: Mapping[str, Any]) -> frozenset[str]:
    value = raw.get("admin_user_ids", [])
    if not isinstance(value, list):
        raise ConfigError("slack.admin_user_ids", value, "it must be a list of Slack user ids, such as [\"U012ABCDEF\"]")
    for item in value:
        if not isinstance(item, str) or not _SLACK_USER_ID.fullmatch(item.strip()):
            raise ConfigError("slack.admin_user_ids", item, "each entry must be a Slack user id such as \"U012ABCDEF\" "
                                                            "(profile -> ⋮ -> Copy member ID)")
    return frozenset(item.strip() for item in value)


def _slack_emoji_names(raw: Mapping[str, Any]) -> Mapping[str, str]:
    extra = raw.get("emoji_names", {})
    if not isinstance(extra, Mapping):
        raise ConfigError("slack.emoji_names", extra, "it must be a table of emoji = \"slack_name\", "
                                                      "such as \"🦊\" = \"fox_face\"")
    names = dict(SLACK_EMOJI_NAMES)
    for emoji, name in extra.items():
        if not isinstance(name, str) or not _SLACK_EMOJI_NAME.fullmatch(name.strip(":")):
            raise ConfigError(f"slack.emoji_names.{emoji}", name, "it must be a Slack emoji name such as \"fox_face\" "
                                                                  "(lower case, without the colons)")
        names[emoji.replace("\ufe0f", "").strip()] = name.strip(":")
    return MappingProxyType(names)


def _check_slack_emojis(names: Mapping[str, str], bot: BotSettings | None, config: Config | None) -> None:
    used = {}
    if bot is not None:
        used.update({bot.regenerate_emoji: "bot.regenerate_emoji", bot.cancel_emoji: "bot.cancel_emoji"})
    if config is not None:
        used.update({m.emoji: f"models.{m.id}.emoji" for m in config.models.values() if m.emoji})
    for emoji, key in used.items():
        if emoji.replace("\ufe0f", "").strip() not in names:
            raise ConfigError(key, emoji, "Slack reacts with emoji names and this one has none here; add it to "
                                          "[slack.emoji_names], such as \"🦊\" = \"fox_face\"")


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
