"""The router: prompt -> model id, with a reason, a confidence and the stage that decided.

    cascade.py      CascadeRouter (rules -> embeddings -> LLM -> guess -> default), RouteDecision,
                    the Router protocol, build_router (the engine's router), explicit_choice
    rules.py        RuleBook: the regex rules of [router.rules], first match wins
    embeddings.py   the sentence encoder (sentence-transformers, CPU), ExampleIndex (examples per
                    model), fit_thresholds, and the torch thread setting of the embedding thread
    llm_stage.py    the LLM stage's prompt and scoring: each model id's log-probability as the answer
    evaluate.py     accuracy, recall, confusion and latency of a router on a labelled JSONL file
    learning.py     the rule that confirms routing feedback as examples; the capped learned set (pure)
    learn.py        ``router learn``: confirm, merge, refit, check before/after, apply or refuse
                    (imported as ``engine.router.learn``: it reads the history)

The ``[router]`` settings live in engine.config (RouterConfig). Importing this package loads no torch.
See docs/ROUTER.md.
"""

from engine.router.cascade import (
    ENGINE_INDEX_WAIT_S,
    CascadeRouter,
    Router,
    RouteDecision,
    build_router,
    default_decision,
    explicit_choice,
)
from engine.router.embeddings import (
    EmbeddingUnavailable,
    ExampleIndex,
    SentenceEncoder,
    fit_thresholds,
    load_shared_encoder_blocking,
)
from engine.router.evaluate import Example, evaluate, format_report, percentile, read_examples, score
from engine.router.rules import RuleBook, word_count

__all__ = [
    "ENGINE_INDEX_WAIT_S", "CascadeRouter", "EmbeddingUnavailable", "Example", "ExampleIndex", "RouteDecision",
    "Router", "RuleBook", "SentenceEncoder", "build_router", "default_decision", "evaluate", "explicit_choice",
    "fit_thresholds", "format_report", "load_shared_encoder_blocking", "percentile", "read_examples", "score",
    "word_count",
]
