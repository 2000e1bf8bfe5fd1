"""The text of /compare and /sweep: what to render, as plain data, before any job exists.

``/compare PROMPT [--seed S] [--size WxH] [--no TEXT]``: every configured model at its defaults.
``/sweep PROMPT --model M --steps 20,24,28 --guidance 3.5,4.5,5.5 [--seed S] [--size WxH]``:
one model at every combination, steps across and guidance down; at most ``[bot] max_sweep_tiles``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from bot.commands.options import OptionError, parse_imagine_text

COMPARE_USAGE = "/compare PROMPT [--seed S] [--size WxH] [--no TEXT]"
SWEEP_USAGE = "/sweep PROMPT --model ID --steps 20,24,28 --guidance 3.5,4.5,5.5 [--seed S] [--size WxH]"
PRESET_USAGE = "/preset [reset MODEL]"
MAX_SEED = 2**32 - 1


@dataclass(frozen=True, slots=True)
class GroupPlan:
    """What a /compare or /sweep renders: one tile per (model, steps, guidance), in sheet order."""

    kind: str  # "compare" or "sweep"
    prompt: str
    tiles: tuple[tuple[str | None, int | None, float | None], ...]  # (model, steps, guidance); None: default
    seed: int
    width: int | None = None
    height: int | None = None
    negative: str | None = None
    columns: int = 2


def parse_compare(text: str, model_ids: list[str], *, seed: int | None = None) -> GroupPlan:
    options = parse_imagine_text(text)
    for flag, value in (("--model", options.model), ("--steps", options.steps), ("--guidance", options.guidance)):
        if value is not None:
            raise OptionError(f"`{flag}` does not apply to /compare: every model runs at its own defaults. "
                              f"Usage: {COMPARE_USAGE}.")
    return GroupPlan("compare", options.prompt, tuple((m, None, None) for m in model_ids),
                     _seed(seed if seed is not None else options.seed), options.width, options.height,
                     options.negative, columns=2 if len(model_ids) <= 4 else 3)


def parse_sweep(text: str, *, max_tiles: int) -> GroupPlan:
    """Refused (OptionError) beyond ``max_tiles``: the sentence names the field, the value and the rule."""
    words, lists = _take_lists(text.split(), ("--steps", "--guidance"))
    options = parse_imagine_text(" ".join(words))
    if not options.model or options.model.lower() == "auto":
        raise OptionError(f"`/sweep` needs `--model ID`: one model, at every combination. Usage: {SWEEP_USAGE}.")
    steps: list[int | None] = [int(v) for v in _values(lists, "--steps", int, "whole numbers")] or [None]
    guidance: list[float | None] = [float(v) for v in _values(lists, "--guidance", float, "numbers")] or [None]
    count = len(steps) * len(guidance)
    if count > max_tiles:
        raise OptionError(f"The sweep is {len(steps)} steps x {len(guidance)} guidance = {count} tiles, but it may be "
                          f"at most {max_tiles} tiles ([bot] max_sweep_tiles); give fewer values.")
    tiles = tuple((options.model, s, g) for g in guidance for s in steps)  # steps across, guidance down
    return GroupPlan("sweep", options.prompt, tiles, _seed(options.seed), options.width, options.height,
                     options.negative, columns=len(steps))


def _take_lists(tokens: list[str], flags: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """The comma lists of ``flags`` taken out of the words (parse_imagine_text reads the rest)."""
    rest: list[str] = []
    lists: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        word = tokens[i].split("=", 1)[0].lower().replace("—", "--").replace("–", "--")
        if word in flags:
            value = tokens[i].split("=", 1)[1] if "=" in tokens[i] else (tokens[i + 1] if i + 1 < len(tokens) else "")
            i += 1 if "=" in tokens[i] else 2
            if word in lists:
                raise OptionError(f"`{word}` is given twice.")
            if not value:
                raise OptionError(f"`{word}` needs a value, such as {word} 20,24,28.")
            lists[word] = value
            continue
        rest.append(tokens[i])
        i += 1
    return rest, lists


def _values(lists: dict[str, str], flag: str, kind: type, what: str) -> list[int | float]:
    if flag not in lists:
        return []
    try:
        values = [kind(v) for v in lists[flag].split(",") if v.strip()]
    except ValueError:
        raise OptionError(f"`{flag}` is {lists[flag]!r}, but it must be {what} separated by commas.") from None
    if len(set(values)) != len(values):
        raise OptionError(f"`{flag}` is {lists[flag]!r}, but each value may appear once.")
    return values


def _seed(seed: int | None) -> int:
    """One seed for every tile: the differences on the sheet are the models' or the settings'."""
    return random.SystemRandom().randint(0, MAX_SEED) if seed is None else seed
