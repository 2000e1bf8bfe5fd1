"""What crosses between an adapter and the commands, as plain data: who asks (``Actor``), who
is an admin (``AdminPolicy``), /imagine's options, and the answers (``Reply``, ``Submitted``)."""

from __future__ import annotations

from dataclasses import dataclass

from engine import JobHandle, JobRequest, Origin, Requester


@dataclass(frozen=True, slots=True)
class Actor:
    """Who is asking: plain strings from the platform, role ids where the platform has roles."""

    platform: str
    user_id: str
    display_name: str = ""
    role_ids: frozenset[str] = frozenset()

    @property
    def requester(self) -> Requester:
        return Requester(platform=self.platform, user_id=self.user_id, display_name=self.display_name)


@dataclass(frozen=True, slots=True)
class AdminPolicy:
    """Who may run admin commands on one platform: listed user ids or role ids (or everyone)."""

    user_ids: frozenset[str] = frozenset()
    role_ids: frozenset[str] = frozenset()
    everyone: bool = False  # the terminal: whoever holds it owns the machine
    every_server: bool = False  # the terminal too: /show and /history see every server's jobs (commands/scope.py)

    def allows(self, actor: Actor) -> bool:
        return self.everyone or actor.user_id in self.user_ids or bool(actor.role_ids & self.role_ids)


@dataclass(frozen=True, slots=True)
class ImagineOptions:
    """/imagine's options as the user gave them; ``None`` means "use the default"."""

    prompt: str
    model: str | None = None
    negative: str | None = None
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None

    def request(self, actor: Actor, origin: Origin, *, nsfw_allowed: bool = False) -> JobRequest:
        return JobRequest(prompt=self.prompt, model=self.model, negative_prompt=self.negative, steps=self.steps,
                          guidance=self.guidance, width=self.width, height=self.height, seed=self.seed,
                          requester=actor.requester, origin=origin, nsfw_allowed=nsfw_allowed)


@dataclass(frozen=True, slots=True)
class Reply:
    """Text for the one who asked (adapters show it privately where they can)."""

    text: str
    ok: bool = True  # False: refused or failed; the terminal's exit status counts these
    image_path: str | None = None  # /show: the job's PNG, for adapters that attach it
    delete_target: bool = False  # a reaction asked to delete the message it was put on


@dataclass(frozen=True, slots=True)
class Submitted:
    handle: JobHandle
    reply: Reply


Outcome = Submitted | Reply
