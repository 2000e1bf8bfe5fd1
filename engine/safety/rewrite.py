"""Prompt rewriting: the small chat LLM first, a deterministic sanitiser when its answer is unusable.

The LLM comes from the shared ``LLMCache`` (the router's copy when the ids match: never a second
one) and is only loaded when a rewrite is first needed. Its answer must be non-empty, short,
different from the prompt, free of refusals and control tokens, and must pass the prompt check;
otherwise the sanitiser swaps or drops the flagged words.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from engine.llm import sanitise_user_text
from engine.safety.detectors import PromptCheck, normalise_text, term_pattern

log = logging.getLogger(__name__)

REWRITE_SYSTEM = (
    "You rewrite prompts for an image generator used in a public community chat. "
    "Make the prompt safe for work: no nudity, sexual content, gore or drug use. "
    "Disambiguate drug-like words into their harmless everyday meaning "
    "(for example 'coke' becomes 'a glass of cola', 'weed' becomes 'garden weeds'). "
    "Keep the subject, style, colours and composition. "
    "Answer with the rewritten prompt only, on one line, without quotes or explanations."
)
_WHY = {
    "prompt": "The prompt contains words that are not allowed here.",
    "nsfw": "The image made from this prompt was flagged as not safe for work.",
    "black": "The image made from this prompt came out black.",
}
SAFE_SUFFIX = "fully clothed, safe for work"
_LABEL = re.compile(r"^\s*(?:rewritten|safe|new|revised)?\s*prompt\s*:\s*", re.IGNORECASE)
_REFUSAL = re.compile(r"^\s*(?:i'?m sorry|i am sorry|sorry|i can'?t|i cannot|i won'?t|as an ai)\b", re.IGNORECASE)


class ChatModel(Protocol):
    """What ``engine.llm.ChatLLM`` offers the rewriter."""

    def generate_blocking(self, system: str, user: str, *, max_new_tokens: int = 64,
                          timeout_s: float | None = None) -> str: ...


class ChatModels(Protocol):
    """What ``engine.llm.LLMCache`` offers: one copy per source."""

    def get_blocking(self, source: str) -> Any: ...


@dataclass(frozen=True, slots=True)
class Rewrite:
    prompt: str  # "" when nothing drawable was left (the policy refuses)
    method: str  # "llm" or "sanitiser"
    detail: str = ""  # why the LLM's answer was not used


class PromptRewriter:
    def __init__(self, check: PromptCheck, *, llms: ChatModels | None = None, llm_source: str = "",
                 replacements: Mapping[str, str] | None = None, blocked_terms: tuple[str, ...] = (),
                 max_chars: int = 400, max_new_tokens: int = 96, timeout_s: float | None = 20.0) -> None:
        self._check = check
        self._llms, self._source = llms, llm_source
        self._replacements = dict(replacements or {})
        self._blocked = term_pattern(blocked_terms)  # dropping one of these adds SAFE_SUFFIX
        self._max_chars, self._max_new_tokens, self._timeout_s = max_chars, max_new_tokens, timeout_s

    def rewrite_blocking(self, prompt: str, *, reason: str) -> Rewrite:
        """``reason``: "prompt" (flagged before generating), "nsfw" or "black" (an image was)."""
        problem = "no rewrite model is configured"
        if self._llms is not None and self._source:
            try:
                llm: ChatModel = self._llms.get_blocking(self._source)
                answer = llm.generate_blocking(REWRITE_SYSTEM, f"{_WHY[reason]}\nPrompt: {prompt}",
                                               max_new_tokens=self._max_new_tokens, timeout_s=self._timeout_s)
            except Exception as exc:  # a missing or failing LLM degrades to the sanitiser
                log.warning("safety: rewrite LLM failed (%s); using the sanitiser", type(exc).__name__, exc_info=True)
                problem = f"the rewrite model failed ({type(exc).__name__})"
            else:
                candidate = clean_answer(answer)
                problem = self.problem_with(prompt, candidate) or ""
                if not problem:
                    return Rewrite(candidate, "llm")
                log.info("safety: rewrite LLM answer refused: %s", problem)
        return Rewrite(self.sanitise(prompt, reason=reason), "sanitiser", problem)

    def problem_with(self, prompt: str, candidate: str) -> str | None:
        """Why ``candidate`` cannot replace ``prompt``; ``None`` when it can."""
        if not candidate:
            return "the answer was empty"
        if len(candidate) > self._max_chars:
            return f"the answer was {len(candidate)} characters (at most {self._max_chars})"
        if _comparable(candidate) == _comparable(prompt):
            return "the answer repeated the prompt"
        if _REFUSAL.match(candidate):
            return "the model declined"
        if sum(c.isalpha() for c in candidate) < 3:
            return "the answer held no words"
        finding = self._check.check(candidate)
        if finding.verdict.flagged:
            return f"the answer is still flagged ({finding.verdict.detail})"
        return None

    def sanitise(self, prompt: str, *, reason: str) -> str:
        """Swap flagged words for their harmless reading (``replacements``) or drop them; after an
        NSFW image, or when a sexual term went, ask for clothes explicitly."""
        text = normalise_text(prompt)
        pattern = self._check.flagged_pattern
        dropped_blocked = bool(self._blocked and self._blocked.search(text))
        if pattern is not None:
            text = pattern.sub(lambda m: self._replacements.get(" ".join(m.group(0).lower().split()), ""), text)
        text = _tidy(text)
        if sum(c.isalpha() for c in text) < 2:
            return ""
        if (reason == "nsfw" or dropped_blocked) and SAFE_SUFFIX not in text:
            text = f"{text}, {SAFE_SUFFIX}"
        return text


def clean_answer(answer: str) -> str:
    """The first non-empty line of an LLM answer, without labels, quotes or control tokens."""
    text = sanitise_user_text(answer)
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    line = _LABEL.sub("", line).strip().strip("\"'`“”‘’").strip()
    return " ".join(line.split())


def _comparable(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def _tidy(text: str) -> str:
    """Whitespace and punctuation left behind by removed words: "a , , cat ," -> "a, cat"."""
    text = " ".join(text.split())
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)
    text = re.sub(r"\(\s*\)|\[\s*\]", "", text)
    return " ".join(text.split()).strip(" ,;:-")
