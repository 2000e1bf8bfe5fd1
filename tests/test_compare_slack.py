"""/compare and /sweep on Slack, end to end: `/promptpics compare ...` against the fake Slack Web API,
the contact sheet uploaded with its :one:-:four: reactions, a number reaction recorded as the pick."""

from __future__ import annotations

import re
from typing import Any

import pytest

from engine import Config
from tests.fake_slack import ADMIN, ALICE, BOB, FakeSlack
from tests.test_slack import bot, config, fake  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(240)

NUMBERS = ["one", "two", "three", "four"]


def sheet_message(fake: FakeSlack, sheet_id: str, tiles: int) -> Any:
    for m in fake.channel_messages(with_files=True):
        if any(fake.files[f]["name"] == f"{sheet_id}-sheet.png" for f in m.files) and len(m.reactions) == tiles:
            return m
    return None


async def test_compare_on_slack_uploads_the_sheet_and_a_number_records_the_pick(fake: FakeSlack, config: Config) -> None:
    async with bot(fake, config) as running:
        payload, ack = await running.slash("compare a red fox in the snow --seed 5 --size 64x64", command="/promptpics")
        answer = (await running.answers(payload))[0]
        sheet_id = re.search(r"Compare `(s[0-9a-f]{6})`", answer)[1]  # type: ignore[index]
        sheet = await fake.wait_for(lambda: sheet_message(fake, sheet_id, 4))
        await running.react(sheet.ts, "three", user=BOB)
        noted = await fake.wait_for(lambda: [e for e in fake.ephemerals if sheet_id in e.get("text", "")])
        record = await running.core.engine.presets_store.sheet(sheet_id)
        jobs = await running.history_rows()
    assert ack == {} and sheet.reactions == NUMBERS
    assert "Stable Diffusion 3 Medium 🧩" in sheet.text and "seed 5" in sheet.text
    assert noted[0]["user"] == BOB and "Stable Diffusion 3 Medium is your pick" in noted[0]["text"]
    assert record is not None and record.picked == 3 and record.picked_by == f"slack:{BOB}"
    assert sorted(j.params.model_id for j in jobs) == sorted(config.models) and {j.params.seed for j in jobs} == {5}


async def test_sweep_on_slack_is_for_admins_and_refused_past_the_cap(fake: FakeSlack, config: Config) -> None:
    async with bot(fake, config) as running:
        async def ask(text: str, user: str = ADMIN) -> str:
            payload, _ = await running.slash(text, command="/promptpics", user=user)
            return (await running.answers(payload))[0]

        refused = await ask("sweep a fox --model flux_dev --steps 1,2 --guidance 3.5", user=ALICE)
        too_big = await ask("sweep a fox --model flux_dev --steps 1,2,3,4 --guidance 3,4,5")
        jobs = await running.history_rows()
    assert refused == "Sorry, `/sweep` is for the bot's admins."
    assert too_big.startswith("The sweep is 4 steps x 3 guidance = 12 tiles, but it may be at most 9 tiles")
    assert jobs == []
