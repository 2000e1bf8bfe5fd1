"""Discord's /compare, /sweep and /preset slash commands (bot/commands/compare.py does the work).

No ``from __future__ import annotations``: discord.py reads the option types from the annotations at runtime.
"""

from collections.abc import Callable
from typing import Any, Optional

import discord
from discord import app_commands

from engine import MAX_SEED, Config, Origin


def add_group_commands(tree: app_commands.CommandTree, config: Config, app: Callable[[], Any],
                       origin_of: Callable[[discord.Interaction], Origin]) -> None:
    """``app`` returns the running DiscordApp (typed Any: app.py imports this module, not the other way)."""
    lim = config.limits
    models = [app_commands.Choice(name=f"{m.display_name} ({m.id})"[:100], value=m.id) for m in config.models.values()]

    @tree.command(name="compare", description="The prompt on every model, one contact sheet to pick from")
    @app_commands.guild_only()
    @app_commands.describe(prompt="what to draw", seed="same seed on every model (random if not given)")
    async def compare(interaction: discord.Interaction, prompt: app_commands.Range[str, 1, lim.max_prompt_chars],
                      seed: Optional[app_commands.Range[int, 0, MAX_SEED]] = None) -> None:
        origin, adult = origin_of(interaction), _adult(interaction)
        await app().respond_posting(interaction, lambda actor: app().commands.groups.compare(
            actor, prompt, origin, seed=seed, adult_channel=adult))

    @tree.command(name="sweep", description="Admins: one model at every steps x guidance, one contact sheet")
    @app_commands.guild_only()
    @app_commands.describe(prompt="what to draw", model="the model to sweep", steps="e.g. 20,24,28",
                           guidance="e.g. 3.5,4.5,5.5", seed="same seed on every tile (random if not given)")
    @app_commands.choices(model=models)
    async def sweep(interaction: discord.Interaction, prompt: app_commands.Range[str, 1, lim.max_prompt_chars],
                    model: str, steps: app_commands.Range[str, 1, 60], guidance: app_commands.Range[str, 1, 60],
                    seed: Optional[app_commands.Range[int, 0, MAX_SEED]] = None) -> None:
        text = f"{prompt} --model {model} --steps {steps} --guidance {guidance}" + (f" --seed {seed}" if seed else "")
        origin, adult = origin_of(interaction), _adult(interaction)
        await app().respond_posting(interaction, lambda actor: app().commands.groups.sweep(
            actor, text, origin, adult_channel=adult))

    @tree.command(name="preset", description="The presets set from sweeps; reset one to config.toml")
    @app_commands.guild_only()
    @app_commands.describe(reset="admins: this model back to config.toml's steps and guidance")
    @app_commands.choices(reset=models)
    async def preset(interaction: discord.Interaction, reset: Optional[str] = None) -> None:
        await app().respond(interaction, lambda actor: app().commands.groups.preset(actor, f"reset {reset}" if reset else ""))


def _adult(interaction: discord.Interaction) -> bool:
    is_nsfw = getattr(interaction.channel, "is_nsfw", None)
    return bool(is_nsfw()) if callable(is_nsfw) else False
