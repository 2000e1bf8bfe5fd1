"""The router's first stage: cheap, precise regex rules from config.toml, first match wins."""

from __future__ import annotations

import re
from collections.abc import Sequence

from engine.config import RuleSpec

_WORD = re.compile(r"[\w'’-]+")


def word_count(text: str) -> int:
    return len(_WORD.findall(text))


class RuleBook:
    """Ordered rules; ``match`` returns the first whose patterns all hold, or None.

    Matching is plain ``re.search`` on the whole prompt: microseconds, no model, no thread.
    """

    def __init__(self, rules: Sequence[RuleSpec]) -> None:
        self.rules = tuple(rules)

    def match(self, prompt: str) -> RuleSpec | None:
        words = word_count(prompt)
        for rule in self.rules:
            if rule.max_words is not None and words > rule.max_words:
                continue
            if all(p.search(prompt) for p in rule.when) and not any(p.search(prompt) for p in rule.unless):
                return rule
        return None
