"""Who may look at a stored job from where (/show, /history): DESIGN.md rule 8, in one place.

A job is visible where it was made. Its requester sees it anywhere in the server (Discord guild,
Slack workspace) it was asked in, and from a DM with the bot on that platform; a job asked in no
server (a DM, or recorded before the history knew servers) is its requester's anywhere on the
platform. Others see it only in the same server, and only when its channel did not allow adult
images; an admin sees every job of the server. An adult-allowed job's image is attached only in
a channel that allows adult images. A job out of sight is answered exactly like an unknown id,
so an id printed in a public message is no key to another server. The terminal sees everything.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from bot.commands.data import Actor
from engine import Origin, StoredJob


class Sight(enum.Enum):
    NONE = "none"  # answered like an unknown id
    TEXT = "text"  # settings and outcome, without the image
    FULL = "full"  # with the image


@dataclass(frozen=True, slots=True)
class Viewpoint:
    """Who asks and from where: the asker, the place asked in, and what that place allows."""

    actor: Actor
    origin: Origin  # platform, server_id ("" in a DM), channel_id
    adult_channel: bool = False  # the channel allows adult images (the platform's flag or [safety])
    admin: bool = False  # an admin of this platform (Commands.is_admin)
    every_server: bool = False  # the terminal: whoever holds it owns the machine

    def sight(self, job: StoredJob) -> Sight:
        if self.every_server:
            return Sight.FULL
        if not self.may_read(job):
            return Sight.NONE
        if job.nsfw_allowed and not self.adult_channel:
            return Sight.TEXT
        return Sight.FULL

    def may_read(self, job: StoredJob) -> bool:
        if job.origin.platform != self.origin.platform:
            return False
        here, there = self.origin.server_id, job.origin.server_id
        if self.is_requester(job):
            return here == there or "" in (here, there)
        if not here or here != there:
            return False
        return self.admin or not job.nsfw_allowed

    def is_requester(self, job: StoredJob) -> bool:
        return (job.requester.platform, job.requester.user_id) == (self.actor.platform, self.actor.user_id)

    @property
    def history_server(self) -> str | None:
        """The server /history reads the asker's jobs from (with those asked in none); None: all of them."""
        return None if self.every_server or not self.origin.server_id else self.origin.server_id
