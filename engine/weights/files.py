"""Which weights each configured model needs, and which of a repository's files those are.

Pure: no network, no torch. The rules follow what the loaders (engine/pipelines/loaders.py)
actually read, so a download fetches nothing they would not load:

- a diffusers pipeline (every family): ``model_index.json`` and the folders it names; in each
  folder its config and tokenizer files and one weight format, the plain (non-variant) files:
  ``from_pretrained`` is called without ``variant=``, and prefers safetensors when present. The
  single-file checkpoints some repos keep at their root (``flux1-dev.safetensors``) are skipped.
- a transformers model (HiDream's Llama text encoder, the router and rewrite LLM): the files at
  the repository's root (config, tokenizer, safetensors shards), never ``original/`` checkpoints.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from engine.config import Config
from engine.errors import RequestError

Kind = Literal["pipeline", "transformers"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".onnx_data", ".pb",
                   ".gguf")
KEPT_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja")  # configs, vocabularies, chat templates
# "name.fp16.safetensors", "name.fp16-00001-of-00002.safetensors", "name.safetensors.index.fp16.json"
_VARIANT = re.compile(r"\.(fp16|bf16|fp32|fp8|int8|non_ema|ema)[.-]")


@dataclass(frozen=True, slots=True)
class WeightsTarget:
    """One thing to download: a model's pipeline, HiDream's text encoder, or an LLM."""

    name: str  # what the user reads: "flux_dev", "logo_sdxl text encoder", "router LLM"
    source: str  # a hub id, or an absolute local folder (config resolves ./relative ones)
    kind: Kind

    @property
    def local(self) -> bool:
        return os.path.isabs(self.source)

    @property
    def probe_file(self) -> str:
        """The small file read first: it names the components, and a gated repo refuses it."""
        return "model_index.json" if self.kind == "pipeline" else "config.json"


def weight_targets(config: Config, model_ids: Sequence[str] = (), *, everything: bool = False) -> list[WeightsTarget]:
    """The targets for ``model_ids`` (each with HiDream's text encoder), or every model and the
    LLMs the router and the rewrite use when ``everything``; one target per distinct source."""
    unknown = [mid for mid in model_ids if mid not in config.models]
    if unknown:
        raise RequestError("model", unknown[0], f"it must be one of {', '.join(config.models)}")
    targets: list[WeightsTarget] = []
    for spec in config.models.values():
        if everything or spec.id in model_ids:
            targets.append(WeightsTarget(spec.id, spec.source, "pipeline"))
            if spec.text_encoder_source:
                targets.append(WeightsTarget(f"{spec.id} text encoder", spec.text_encoder_source, "transformers"))
    if everything:
        targets += llm_targets(config)
    return _distinct(targets)


def llm_targets(config: Config) -> list[WeightsTarget]:
    """The router's LLM stage and the safety rewrite's LLM, when they are switched on."""
    targets = []
    if "llm" in config.router.stages:
        targets.append(WeightsTarget("router LLM", config.router_llm_id, "transformers"))
    if config.safety.use_llm:
        targets.append(WeightsTarget("rewrite LLM", config.rewrite_llm_id, "transformers"))
    return _distinct(targets)


def _distinct(targets: Iterable[WeightsTarget]) -> list[WeightsTarget]:
    seen: dict[str, WeightsTarget] = {}
    for target in targets:
        seen.setdefault(target.source, target)
    return list(seen.values())


def components(model_index: Mapping[str, Any]) -> list[str]:
    """The folders ``model_index.json`` names: ``"vae": ["diffusers", "AutoencoderKL"]``; a
    ``[null, null]`` entry (HiDream's text_encoder_4, loaded apart) has no folder."""
    return [name for name, value in model_index.items()
            if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] is not None]


def select_files(kind: Kind, paths: Iterable[str], model_index: Mapping[str, Any] | None = None) -> list[str]:
    """The paths of a repository's files the loaders read, sorted."""
    by_folder: dict[str, list[str]] = {}
    for path in paths:
        folder, _, name = path.rpartition("/")
        by_folder.setdefault(folder, []).append(name)
    if kind == "transformers":
        folders = [""]
    else:
        folders = components(model_index or {})
    chosen = ["model_index.json"] if kind == "pipeline" and "model_index.json" in by_folder.get("", []) else []
    for folder in folders:
        prefix = f"{folder}/" if folder else ""
        chosen += [prefix + name for name in _needed_in_folder(by_folder.get(folder, []))]
    return sorted(chosen)


def _needed_in_folder(names: Sequence[str]) -> list[str]:
    plain = [n for n in names if not _VARIANT.search(n)]
    weights = [n for n in plain if n.endswith(WEIGHT_SUFFIXES)]
    fmt = ".safetensors" if any(n.endswith(".safetensors") for n in weights) else ".bin"
    kept = [n for n in plain if n.endswith(fmt)]
    # The shard index goes with its format: "model.safetensors.index.json" only with safetensors.
    kept += [n for n in plain if n.endswith(KEPT_SUFFIXES) and (".index." not in n or f"{fmt}.index." in n)]
    return kept
