"""The bot side's settings: the raw [bot], [discord] and [slack] tables of config.toml plus tokens
from the environment, validated once at start-up into frozen models.

Every broken rule stops start-up with one ``ConfigError`` naming the key, the value and the
rule, through the engine's own ``validate_table``. Tokens come only from the environment (a
token in a file ends up in a commit) and are never shown: not in an error, a log line or a ``repr``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BeforeValidator, Field, StrictFloat, StrictInt, StrictStr

from engine import HIDDEN, Config, ConfigError, SettingsModel, broken, validate_table

DISCORD_API_BASE = "https://discord.com/api/v10"
DISCORD_GATEWAY_URL = "wss://gateway.discord.gg/"
SLACK_API_URL = "https://slack.com/api/"
SECRET: Any = {"secret": True}  # a field whose value an error shows as HIDDEN
S = TypeVar("S", bound=SettingsModel)

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
    # the tiles of a /compare or /sweep contact sheet (bot/sheets.py)
    **{f"{n}\u20e3": name for n, name in enumerate(("one", "two", "three", "four", "five", "six", "seven", "eight",
                                                     "nine"), start=1)},
})
_SLACK_EMOJI_NAME = re.compile(r"[a-z0-9_+'-]{1,100}")
_SLACK_USER_ID = re.compile(r"[UW][A-Z0-9]{2,}")


# -- field types: each rule names itself ---------------------------------------------------------


def _stripped(value: Any) -> Any:
    if not isinstance(value, str) or not value.strip():
        raise broken("it must be a non-empty string")
    return value.strip()


def _emoji(value: str) -> str:
    if len(value) > 8 or any(ch.isspace() for ch in value):
        raise broken("it must be one emoji, such as '🔁'")
    return value


def _url(*schemes: str) -> AfterValidator:
    def check(value: str) -> str:
        if not value.startswith(schemes) or len(value) <= len(schemes[-1]):
            raise broken(f"it must be a URL starting with {' or '.join(schemes)}")
        return value
    return AfterValidator(check)


def _token(value: Any) -> Any:
    if value is None or not isinstance(value, str) or not value.strip():
        return None
    if any(ch.isspace() for ch in value.strip()):
        raise broken("a token has no spaces or line breaks; copy it again from the developer portal")
    return value.strip()


def _prefixed(prefix: str, what: str) -> AfterValidator:
    def check(value: str | None) -> str | None:
        if value is not None and not value.startswith(prefix):
            raise broken(f"it must start with {prefix!r}: {what}")
        return value
    return AfterValidator(check)


def _snowflakes(value: Any) -> frozenset[str]:
    """Discord ids: TOML integers or strings of digits (both appear in copied settings)."""
    if not isinstance(value, list | tuple | set | frozenset):
        raise broken("it must be a list of Discord ids, such as [\"123456789012345678\"]")
    ids = set()
    for item in value:
        text = str(item) if isinstance(item, int) and not isinstance(item, bool) else item
        if not isinstance(text, str) or not text.isdigit():
            raise broken("each entry must be a Discord id: digits only (Developer Mode -> right-click -> Copy ID)", item)
        ids.add(text)
    return frozenset(ids)


def _slack_user_ids(value: Any) -> frozenset[str]:
    if not isinstance(value, list | tuple | set | frozenset):
        raise broken("it must be a list of Slack user ids, such as [\"U012ABCDEF\"]")
    for item in value:
        if not isinstance(item, str) or not _SLACK_USER_ID.fullmatch(item.strip()):
            raise broken("each entry must be a Slack user id such as \"U012ABCDEF\" (profile -> ⋮ -> Copy member ID)", item)
    return frozenset(item.strip() for item in value)


def _slack_mode(value: str) -> str:
    if value.lower() not in ("socket", "http"):
        raise broken("it must be \"socket\" (Socket Mode, the default) or \"http\"", value.lower())
    return value.lower()


def _slack_path(value: str) -> str:
    if not value.startswith("/") or any(ch.isspace() for ch in value):
        raise broken("it must be a URL path starting with /, such as \"/slack/events\"")
    return value


def _slash_command(value: str) -> str:
    if not re.fullmatch(r"/[a-z0-9_-]{1,31}", value.lower()):
        raise broken("it must be a slash command as named in the app manifest, such as \"/imagine\" "
                     "(a slash, then up to 31 letters, digits, - or _)", value.lower())
    return value.lower()


def _slack_emoji_names(value: Any) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise broken("it must be a table of emoji = \"slack_name\", such as \"🦊\" = \"fox_face\"")
    names = dict(SLACK_EMOJI_NAMES)
    for emoji, name in value.items():
        if not isinstance(name, str) or not _SLACK_EMOJI_NAME.fullmatch(name.strip(":")):
            raise broken("it must be a Slack emoji name such as \"fox_face\" (lower case, without the colons)", name,
                         at=f".{emoji}")
        names[emoji.replace("\ufe0f", "").strip()] = name.strip(":")
    return MappingProxyType(names)


Word = Annotated[StrictStr, BeforeValidator(_stripped)]
Emoji = Annotated[Word, AfterValidator(_emoji)]
Token = Annotated[str | None, BeforeValidator(_token)]


def _secret(default: None = None) -> Any:
    return Field(default, repr=False, json_schema_extra=SECRET)


# -- the tables ----------------------------------------------------------------------------------


class BotSettings(SettingsModel):
    """[bot]: what every platform shares."""

    cooldown_s: StrictFloat = Field(10.0, ge=0.0)  # per user, between two submitted jobs; admins are exempt
    progress_interval_s: StrictFloat = Field(2.0, ge=0.0)  # at most one status edit per message this often
    history_limit: StrictInt = Field(10, ge=1, le=50)  # rows shown by /history
    regenerate_emoji: Emoji = "🔁"
    cancel_emoji: Emoji = "❌"
    # /sweep's grid: at most this many tiles (steps x guidance); number reactions go to 9️⃣
    max_sweep_tiles: StrictInt = Field(9, ge=1, le=9)


class DiscordSettings(SettingsModel):
    """[discord] plus DISCORD_TOKEN, DISCORD_API_BASE and DISCORD_GATEWAY_URL."""

    token: Token = _secret()
    api_base: Annotated[Word, _url("http://", "https://"), AfterValidator(lambda v: v.rstrip("/"))] = DISCORD_API_BASE
    gateway_url: Annotated[Word, _url("ws://", "wss://")] = DISCORD_GATEWAY_URL
    admin_user_ids: Annotated[frozenset[str], BeforeValidator(_snowflakes)] = frozenset()
    admin_role_ids: Annotated[frozenset[str], BeforeValidator(_snowflakes)] = frozenset()
    max_upload_bytes: StrictInt = Field(0, ge=0)  # 0: the limit Discord states for the channel; else at most this


class SlackSettings(SettingsModel):
    """[slack] plus SLACK_BOT_TOKEN, SLACK_APP_TOKEN, SLACK_SIGNING_SECRET and SLACK_API_URL."""

    # xoxb-: every Web API call
    bot_token: Annotated[Token, _prefixed("xoxb-", "the Bot User OAuth Token (OAuth & Permissions)")] = _secret()
    # xapp-: Socket Mode only
    app_token: Annotated[Token, _prefixed("xapp-", "an App-Level Token with connections:write")] = _secret()
    signing_secret: Token = _secret()  # HTTP mode only: checks each request
    # ends with "/": slack_sdk appends the method name
    api_url: Annotated[Word, _url("http://", "https://"), AfterValidator(lambda v: v.rstrip("/") + "/")] = SLACK_API_URL
    # "socket": no public URL needed; "http": Slack posts to http_host:http_port/http_path
    mode: Annotated[Literal["socket", "http"], BeforeValidator(lambda v: _slack_mode(_stripped(v)))] = "socket"
    http_host: Word = "0.0.0.0"
    http_port: StrictInt = Field(3000, ge=0, le=65535)
    http_path: Annotated[Word, AfterValidator(_slack_path)] = "/slack/events"
    admin_user_ids: Annotated[frozenset[str], BeforeValidator(_slack_user_ids)] = frozenset()
    imagine_command: Annotated[Word, AfterValidator(_slash_command)] = "/imagine"
    admin_command: Annotated[Word, AfterValidator(_slash_command)] = "/promptpics"
    max_retries: StrictInt = Field(4, ge=0, le=10)  # a Web API call answered 429 (after Retry-After) or 5xx
    retry_backoff_s: StrictFloat = Field(1.0, ge=0.0)  # first wait after a 5xx; doubled each time
    emoji_names: Annotated[Mapping[str, str], BeforeValidator(_slack_emoji_names)] = Field(
        default_factory=lambda: SLACK_EMOJI_NAMES, repr=False)


class Settings(SettingsModel):
    bot: BotSettings
    discord: DiscordSettings
    slack: SlackSettings = Field(default_factory=SlackSettings)

    @property
    def platforms_with_tokens(self) -> list[str]:
        return [name for name, token in (("discord", self.discord.token), ("slack", self.slack.bot_token)) if token]


def load_settings(config: Config, env: Mapping[str, str]) -> Settings:
    tables = config.platform_tables
    bot = parse_bot_settings(tables.get("bot", {}), config)
    return Settings(bot=bot, discord=parse_discord_settings(tables.get("discord", {}), env),
                    slack=parse_slack_settings(tables.get("slack", {}), env, bot, config))


# -- reading each table, and the rules that span tables ------------------------------------------


def parse_bot_settings(raw: Mapping[str, Any], config: Config) -> BotSettings:
    settings = validate_table(BotSettings, raw, "bot.")
    taken = {m.emoji: f"models.{m.id}.emoji" for m in config.models.values() if m.emoji}
    for key in ("regenerate_emoji", "cancel_emoji"):
        value = getattr(settings, key)
        if value in taken:
            raise ConfigError(f"bot.{key}", value, f"it must differ from every model's emoji ({taken[value]} has it)")
    if settings.regenerate_emoji == settings.cancel_emoji:
        raise ConfigError("bot.cancel_emoji", settings.cancel_emoji, "it must differ from bot.regenerate_emoji")
    return settings


def parse_discord_settings(raw: Mapping[str, Any], env: Mapping[str, str]) -> DiscordSettings:
    if isinstance(raw, Mapping) and "token" in raw:
        raise ConfigError("discord.token", HIDDEN, "tokens are read only from the DISCORD_TOKEN environment "
                                                    "variable, never from a file; remove the key")
    variables = {"token": "DISCORD_TOKEN", "api_base": "DISCORD_API_BASE", "gateway_url": "DISCORD_GATEWAY_URL"}
    return _with_environment(DiscordSettings, raw, "discord.", env, variables)


_SLACK_VARIABLES = {"bot_token": "SLACK_BOT_TOKEN", "app_token": "SLACK_APP_TOKEN", "signing_secret": "SLACK_SIGNING_SECRET",
                    "api_url": "SLACK_API_URL"}


def parse_slack_settings(raw: Mapping[str, Any], env: Mapping[str, str], bot: BotSettings | None = None,
                         config: Config | None = None) -> SlackSettings:
    for key, variable in {**_SLACK_VARIABLES, "token": "SLACK_BOT_TOKEN"}.items():
        if key != "api_url" and isinstance(raw, Mapping) and key in raw:
            raise ConfigError(f"slack.{key}", HIDDEN, f"tokens and secrets are read only from the {variable} "
                                                      "environment variable, never from a file; remove the key")
    settings = _with_environment(SlackSettings, raw, "slack.", env, _SLACK_VARIABLES)
    if settings.imagine_command == settings.admin_command:
        raise ConfigError("slack.admin_command", settings.admin_command, "it must differ from slack.imagine_command")
    _check_slack_tokens(settings)
    if settings.bot_token is not None:  # a Discord-only bot may use emojis Slack has no name for here
        _check_slack_emojis(settings.emoji_names, bot, config)
    return settings


def _with_environment(model: type[S], raw: Mapping[str, Any], prefix: str, env: Mapping[str, str],
                      variables: Mapping[str, str]) -> S:
    """``raw`` with each field a set environment variable gives; an error then names the variable."""
    from_env = {field: env[variable] for field, variable in variables.items() if env.get(variable)}
    table = {**raw, **from_env} if isinstance(raw, Mapping) else raw
    return validate_table(model, table, prefix, sources={field: variables[field] for field in from_env})


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
