"""The text flags of a typed /imagine (the terminal, Slack): ``/imagine a fox --steps 4 --size 512x512 --no blur``.

Hand-written rather than argparse: a prompt is free text (an unknown ``--flag`` is a sentence
for the user, not an exit), ``--no`` takes every word up to the next flag, and phones turn
``--`` into an em dash.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from bot.commands.data import ImagineOptions


class OptionError(ValueError):
    """A text option that cannot be read; ``str(exc)`` is the sentence for the user."""


TEXT_FLAGS: dict[str, str] = {
    "--model": "ID (auto or a model id)",
    "--steps": "N (whole number)",
    "--guidance": "G (number)",
    "--size": "WxH (e.g. 512x768)",
    "--width": "W (pixels)",
    "--height": "H (pixels)",
    "--seed": "S (whole number)",
    "--no": "TEXT (what the image should not show; may be several words)",
}
_FLAG_ALIASES = {"--negative": "--no", "--neg": "--no", "--ar": "--size"}
_DASHES = ("—", "–", "−")  # phones and Slack turn "--" into an em dash
_SIZE = re.compile(r"(\d+)\s*[x×X*]\s*(\d+)")


def text_usage() -> str:
    flags = "; ".join(f"{flag} {what}" for flag, what in TEXT_FLAGS.items())
    return f"Usage: /imagine PROMPT [options]. Options: {flags}."


def _as_flag(token: str) -> str | None:
    """'--steps', '—steps' or '--steps=4' -> '--steps'; a plain word -> None."""
    word = token.split("=", 1)[0].lower()
    for dash in _DASHES:
        if word.startswith(dash) and len(word) > 1:
            word = "--" + word[1:]
    if not word.startswith("--") or len(word) < 3:
        return None
    return _FLAG_ALIASES.get(word, word)


def parse_imagine_text(text: str) -> ImagineOptions:
    """The words are the prompt; each flag takes one value, except --no, which takes every
    word up to the next flag. Unknown flags and unreadable values raise OptionError."""
    tokens = text.split()
    prompt: list[str] = []
    values: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        flag = _as_flag(token)
        if flag is None:
            prompt.append(token)
            i += 1
            continue
        if flag not in TEXT_FLAGS:
            raise OptionError(f"`{token.split('=', 1)[0]}` is not an option I know.")
        inline = token.split("=", 1)[1] if "=" in token else None
        taken = [inline] if inline else []
        i += 1
        while i < len(tokens) and _as_flag(tokens[i]) is None and (not taken or flag == "--no"):
            taken.append(tokens[i])
            i += 1
        if not taken:
            raise OptionError(f"`{flag}` needs a value: {flag} {TEXT_FLAGS[flag]}.")
        if flag in values:
            raise OptionError(f"`{flag}` is given twice.")
        values[flag] = _unquote(" ".join(taken))
    return _options_from_text(_unquote(" ".join(prompt)), values)


def _options_from_text(prompt: str, values: Mapping[str, str]) -> ImagineOptions:
    width = _whole(values, "--width")
    height = _whole(values, "--height")
    if "--size" in values:
        match = _SIZE.fullmatch(values["--size"].strip())
        if not match:
            raise OptionError(f"`--size` is {values['--size']!r}, but it must look like 512x768.")
        width, height = int(match[1]), int(match[2])
    guidance = _read(values, "--guidance", float, "a number")
    return ImagineOptions(prompt=prompt, model=values.get("--model"), negative=values.get("--no"),
                          steps=_whole(values, "--steps"), guidance=None if guidance is None else float(guidance),
                          width=width, height=height, seed=_whole(values, "--seed"))


def _whole(values: Mapping[str, str], flag: str) -> int | None:
    value = _read(values, flag, int, "a whole number")
    return None if value is None else int(value)


def _read(values: Mapping[str, str], flag: str, kind: Callable[[str], int | float], what: str) -> int | float | None:
    if flag not in values:
        return None
    try:
        return kind(values[flag])
    except ValueError:
        raise OptionError(f"`{flag}` is {values[flag]!r}, but it must be {what}.") from None


def _unquote(text: str) -> str:
    text = text.strip()
    for left, right in (('"', '"'), ("'", "'"), ("“", "”")):
        if len(text) >= 2 and text.startswith(left) and text.endswith(right):
            return text[1:-1].strip()
    return text
