"""The platform-neutral command catalogue: what every command and reaction does, for Discord,
Slack and the terminal alike.

- data.py: what crosses between an adapter and the commands (Actor, AdminPolicy, ImagineOptions, Reply, Submitted)
- core.py: the catalogue of commands and ``Commands``, which runs them
- options.py: the text flags of a typed /imagine (``--steps 4 --size 512x768 --no blur``)
- reactions.py: what a reaction on a job's message asks for
- scope.py: who may look at a stored job from where (/show, /history)
- cooldowns.py: the per-user cooldown, checked and taken in one step
"""

from bot.commands.cooldowns import Cooldowns
from bot.commands.core import CATALOGUE, Commands, CommandSpec
from bot.commands.data import Actor, AdminPolicy, ImagineOptions, Outcome, Reply, Submitted
from bot.commands.options import TEXT_FLAGS, OptionError, parse_imagine_text, text_usage
from bot.commands.reactions import ReactionAction, ReactionKind, normalise_emoji

__all__ = [
    "Actor", "AdminPolicy", "CATALOGUE", "CommandSpec", "Commands", "Cooldowns", "ImagineOptions", "OptionError",
    "Outcome", "ReactionAction", "ReactionKind", "Reply", "Submitted", "TEXT_FLAGS", "normalise_emoji",
    "parse_imagine_text", "text_usage",
]
