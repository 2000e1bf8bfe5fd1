"""Fit the embedding stage's per-model thresholds; prints a [router.thresholds] table to paste.

    .venv/bin/python bench/router_fit.py                          # leave-one-out on the examples
    .venv/bin/python bench/router_fit.py --data bench/router_heldout.jsonl --precision 0.9

The procedure (docs/ROUTER.md, "Fitting the thresholds"):
1. Embed every example utterance in config.toml [router.examples].
2. Samples: each example scored against all the *other* examples (leave-one-out), plus every
   prompt of the ``--data`` files that the rules do not decide (those are what the embedding
   stage sees in production), scored against all examples.
3. Per model m: among samples whose best score is m's, sorted by that score from high to low,
   the threshold is the lowest score at which "best is m and score >= threshold" is still right
   at least ``--precision`` of the time. Below it the router asks the LLM.
The evaluation set (../shared/eval) is deliberately not used here, so its figures stay honest.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.config import load_config  # noqa: E402
from engine.router import ExampleIndex, RuleBook, SentenceEncoder, fit_thresholds, read_examples  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, action="append", default=[], help="labelled JSONL file(s) to add")
    parser.add_argument("--precision", type=float, default=0.9, help="required precision (default 0.9)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    config = load_config(REPO / "config.toml")
    settings = config.router
    encoder = SentenceEncoder.load_blocking(settings.embedding_model, max_tokens=settings.embedding_max_tokens)
    index = ExampleIndex(encoder, dict(settings.examples), settings.embedding_top_k)

    samples = index.leave_one_out_blocking()
    rules = RuleBook(settings.rules)
    for path in args.data:
        for example in read_examples(path, config.models):
            if rules.match(example.prompt) is None:
                samples.append((example.expected, index.scores_blocking(example.prompt)))

    thresholds = fit_thresholds(samples, precision=args.precision)
    right = sum(max(s, key=s.__getitem__) == truth for truth, s in samples)
    print(f"# {len(samples)} samples ({right / len(samples):.1%} top-1 right), precision >= {args.precision:g}")
    print("[router.thresholds]")
    for model in config.models:
        print(f"{model} = {thresholds.get(model, 1.0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
