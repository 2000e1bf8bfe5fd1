"""The bot's subcommands of ``promptpics``: ``chat`` (the terminal), ``run`` (every platform
whose token is set, on one engine and one queue) and ``sync-commands`` (Discord's slash
commands, registered on request only). Each handler is ``async def cmd_x(config, args) -> int``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

from bot.cli.preflight import check_serving_weights, hub_sources, settle_offline
from bot.cli.profile import prepare
from bot.cli.webui import gallery_links, web_beside
from bot.commands import AdminPolicy, Commands
from bot.console import ADMINS as CONSOLE_ADMINS
from bot.console import ConsoleApp
from bot.delivery import Delivery
from bot.outlet import Outlet
from bot.settings import Settings, load_settings
from bot.supervise import supervise
from engine import Config, Engine, HistoryStore

log = logging.getLogger(__name__)

NO_TOKEN = ("promptpics: no chat platform is configured. Set DISCORD_TOKEN (the bot token from the Discord "
            "developer portal) to serve Discord (docs/BOT.md), and/or SLACK_BOT_TOKEN with SLACK_APP_TOKEN "
            "(Socket Mode) to serve Slack (docs/SLACK.md). To try the bot without any token, run "
            "`promptpics chat`.")
SHUTDOWN_GRACE_S = 5.0  # time for status messages to say "paused" before the connections close


def add_bot_commands(subparsers: Any) -> None:
    chat = subparsers.add_parser("chat", help="the bot's commands in this terminal (no token needed)",
                                 description="Type /imagine PROMPT, /queue, /models, /history, /show ID, /react ID 🔁, "
                                             "/help ... one per line; input may be piped. Exits when input ends "
                                             "and the jobs asked for are done.")
    chat.set_defaults(run=cmd_chat)
    run = subparsers.add_parser("run", help="serve every chat platform whose token is set (DISCORD_TOKEN, "
                                            "SLACK_BOT_TOKEN) from one engine and one queue")
    run.set_defaults(run=cmd_run)
    sync = subparsers.add_parser("sync-commands", help="register the Discord slash commands (after install or changes)")
    sync.add_argument("--guild", type=int, metavar="ID", help="only in this server: instant, for trying changes")
    sync.set_defaults(run=cmd_sync_commands)


# -- what every front end shares -----------------------------------------------------------------


@dataclass
class BotCore:
    engine: Engine
    commands: Commands
    delivery: Delivery


def build_core(config: Config, settings: Settings, admins: Mapping[str, AdminPolicy],
               history: HistoryStore | None = None) -> BotCore:
    # The caller may own the history, so it can stay open after the engine closes while the
    # last results are still being posted and recorded (delivery.drain).
    engine = Engine(config, history=history)
    commands = Commands(engine, settings.bot, admins, gallery_links=gallery_links(config))
    delivery = Delivery(commands)
    delivery.attach()  # before the engine is entered: jobs it takes back at start are shown too
    return BotCore(engine, commands, delivery)


class PlatformApp(Protocol):
    """One chat platform served by ``promptpics run`` (DiscordApp, SlackApp)."""

    @property
    def platform(self) -> str: ...

    @property
    def outlet(self) -> Outlet: ...

    async def serve(self) -> None: ...

    async def reset(self) -> None: ...

    async def close(self) -> None: ...


# -- promptpics chat -----------------------------------------------------------------------------


async def cmd_chat(config: Config, args: argparse.Namespace) -> int:
    settings = load_settings(config, os.environ)
    config = await asyncio.to_thread(prepare, config)
    check_serving_weights(config, offline=settle_offline(hub_sources(config, config.models)))
    return await chat(config, settings)


async def chat(config: Config, settings: Settings, *, stdin: TextIO | None = None, stdout: TextIO | None = None,
               user: str | None = None) -> int:
    """The terminal front end on its own engine; returns the exit status."""
    core = build_core(config, settings, {"console": CONSOLE_ADMINS})
    console = ConsoleApp(core.commands, core.delivery, stdin=stdin, stdout=stdout, user=user)
    core.delivery.add_outlet(console.outlet)
    async with core.engine:
        delivering = asyncio.create_task(core.delivery.run(), name="delivery")
        reading = asyncio.create_task(console.run(), name="console")
        try:
            await asyncio.wait({delivering, reading}, return_when=asyncio.FIRST_COMPLETED)
            if not reading.done():  # delivery stopped: nothing would ever be shown
                reading.cancel()
                print(f"promptpics: {_why_it_ended(None, delivering)}", file=sys.stderr)
                return 1
            return reading.result()
        finally:
            for task in (delivering, reading):
                task.cancel()
            await asyncio.gather(delivering, reading, return_exceptions=True)


# -- promptpics run ------------------------------------------------------------------------------


async def cmd_run(config: Config, args: argparse.Namespace) -> int:
    settings = load_settings(config, os.environ)
    if not settings.platforms_with_tokens:
        print(NO_TOKEN, file=sys.stderr)
        return 2
    config = await asyncio.to_thread(prepare, config)
    check_serving_weights(config, offline=settle_offline(hub_sources(config, config.models)))
    return await serve(config, settings)


def platform_apps(core: BotCore, settings: Settings) -> list[PlatformApp]:
    """Every platform whose tokens are set, all on ``core``: one engine, one queue."""
    apps: list[PlatformApp] = []
    if settings.discord.token:
        from bot.discord import DiscordApp

        apps.append(DiscordApp(core.commands, settings.discord))
    if settings.slack.bot_token:
        from bot.slack import SlackApp

        apps.append(SlackApp(core.commands, settings.slack))
    return apps


def admin_policies(settings: Settings) -> dict[str, AdminPolicy]:
    from bot.discord import DiscordApp

    # Slack's admins are user ids only (no roles): no need to import slack_bolt for them.
    return {"discord": DiscordApp.admin_policy(settings.discord),
            "slack": AdminPolicy(user_ids=settings.slack.admin_user_ids)}


async def serve(config: Config, settings: Settings, *, stop: asyncio.Event | None = None) -> int:
    """Serve every configured platform on one engine until SIGTERM/SIGINT (or ``stop``)."""
    stop = stop or asyncio.Event()
    async with HistoryStore.open(config.data_dir, busy_timeout_s=config.history.busy_timeout_s) as history:
        core = build_core(config, settings, admin_policies(settings), history)
        apps = platform_apps(core, settings)
        for app in apps:
            core.delivery.add_outlet(app.outlet)
        with _stop_on_signals(stop):
            async with core.engine, web_beside(config, core.engine):  # [web] enabled: the dashboard too
                # Load the router's models now rather than on the first user's prompt.
                warming = asyncio.create_task(core.engine.warm_up_router(), name="router-warm-up")
                try:
                    return await serve_apps(core, apps, stop)
                finally:
                    warming.cancel()


async def serve_apps(core: BotCore, apps: list[PlatformApp], stop: asyncio.Event) -> int:
    serving: dict[asyncio.Task[Any], PlatformApp] = {
        asyncio.create_task(supervise(app), name=f"serve-{app.platform}"): app for app in apps}
    delivering: asyncio.Task[Any] = asyncio.create_task(core.delivery.run(), name="delivery")
    stopping: asyncio.Task[Any] = asyncio.create_task(stop.wait(), name="stop")
    done, _ = await asyncio.wait({*serving, delivering, stopping}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    for task in done - {stopping}:
        code = 1
        print(f"promptpics: {_why_it_ended(serving.get(task), task)}", file=sys.stderr)
    log.info("stopping: the running job is paused and kept with the queue for the next start")
    # 1. No new jobs; the running one is interrupted and kept, like the queued ones.
    await core.engine.aclose()
    # 2. Their status messages say so while the connections are still open.
    await core.delivery.drain(SHUTDOWN_GRACE_S)
    # 3. Leave the platforms.
    for app in apps:
        with contextlib.suppress(Exception):
            await app.close()
    for task in (*serving, delivering, stopping):
        task.cancel()
    await asyncio.gather(*serving, delivering, stopping, return_exceptions=True)
    return code


def _why_it_ended(app: PlatformApp | None, task: asyncio.Task[Any]) -> str:
    name = app.platform if app else "delivery"
    exc = None if task.cancelled() else task.exception()
    if exc is None:
        return f"the {name} connection closed; stopping"
    if type(exc).__name__ == "SlackLoginFailure":  # its sentence names the variable, never the token
        return f"{name}: {exc}"
    if type(exc).__name__ == "LoginFailure":
        return (f"{name} refused the token ({exc}). Reset it in the developer portal and set "
                f"{name.upper()}_TOKEN again.")
    log.error("%s stopped", name, exc_info=exc)
    return f"{name} stopped: {type(exc).__name__}: {exc}"


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or Windows
            pass
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


# -- promptpics sync-commands --------------------------------------------------------------------


async def cmd_sync_commands(config: Config, args: argparse.Namespace) -> int:
    import discord

    from bot.discord import invite_url, sync_commands

    settings = load_settings(config, os.environ)
    if not settings.discord.token:
        print("promptpics: set DISCORD_TOKEN (the bot token from the Discord developer portal) first; "
              "see docs/BOT.md.", file=sys.stderr)
        return 2
    try:
        names, application_id = await sync_commands(config, settings.discord, args.guild)
    except discord.LoginFailure as exc:
        print(f"promptpics: Discord refused DISCORD_TOKEN ({exc}); reset it in the developer portal.", file=sys.stderr)
        return 2
    except discord.HTTPException as exc:
        print(f"promptpics: Discord refused the commands: {exc.status} {exc.text}", file=sys.stderr)
        return 1
    except (OSError, asyncio.TimeoutError) as exc:  # aiohttp's connection errors are OSErrors
        print(f"promptpics: Discord could not be reached ({type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}); "
              "check the network and try again", file=sys.stderr)
        return 2
    where = f"in server {args.guild}" if args.guild else "globally (Discord may take a while to show them everywhere)"
    print(f"registered {len(names)} commands {where}: {', '.join('/' + n for n in names)}")
    print(f"invite the bot: {invite_url(application_id)}")
    return 0
