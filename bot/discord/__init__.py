"""The Discord adapter (discord.py 2.x).

- app.py: the client, its slash commands and reactions, ``DiscordApp``, ``promptpics sync-commands``
- outlet.py: ``DiscordOutlet``, which posts statuses, previews and results with the bot token
"""

from bot.discord.app import DiscordApp, PromptPicsClient, invite_url, sync_commands
from bot.discord.outlet import PLATFORM, DiscordOutlet

__all__ = ["DiscordApp", "DiscordOutlet", "PLATFORM", "PromptPicsClient", "invite_url", "sync_commands"]
