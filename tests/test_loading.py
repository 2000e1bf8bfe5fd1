"""Two threads loading models at once (the router's embedding thread at start-up, the GPU thread
loading the first job's pipeline): each gets a whole, working model. transformers, diffusers and
accelerate change process-wide state while loading, so the engine serialises loads
(engine.workers.MODEL_LOADING); without that, these loads broke each other."""

from __future__ import annotations

import threading
from typing import Any

import torch

from engine.config import Config
from engine.llm import ChatLLM
from engine.pipelines import load_pipeline_blocking
from engine.router.embeddings import SentenceEncoder

ROUNDS = 3


def test_loads_on_two_threads_at_once_give_whole_models(tiny_config: Config) -> None:
    problems: list[str] = []
    start = threading.Barrier(3)

    def pipelines() -> None:
        start.wait()
        for _ in range(ROUNDS):
            for model_id in ("flux_dev", "realvis_xl"):
                try:
                    loaded = load_pipeline_blocking(tiny_config.model(model_id), torch.device("cpu"), torch.float32)
                    meta = [n for c in loaded.pipe.components.values() if isinstance(c, torch.nn.Module)
                            for n, p in c.named_parameters() if p.is_meta]
                    if meta:
                        problems.append(f"{model_id}: meta parameters {meta[:2]}")
                except Exception as exc:
                    problems.append(f"{model_id}: {type(exc).__name__}: {exc}")

    def embeddings() -> None:
        start.wait()
        for _ in range(ROUNDS):
            try:
                vectors = SentenceEncoder.load_blocking(tiny_config.router.embedding_model).encode_blocking(["a fox"])
                if not torch.isfinite(vectors).all():
                    problems.append("embeddings: non-finite vector")
            except Exception as exc:
                problems.append(f"embeddings: {type(exc).__name__}: {exc}")

    def llm() -> None:
        start.wait()
        for _ in range(ROUNDS):
            try:
                ChatLLM.load_blocking(tiny_config.router_llm_id, torch.device("cpu"), torch.float32)
            except Exception as exc:
                problems.append(f"llm: {type(exc).__name__}: {exc}")

    threads: list[Any] = [threading.Thread(target=f) for f in (pipelines, embeddings, llm)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not problems, problems
