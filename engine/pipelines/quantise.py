"""Per-component weight quantisation through diffusers' and transformers' own configs (torchao
for int8/fp8 weight-only, bitsandbytes for nf4), and regional compilation of a denoiser.

Nothing here quantises by hand: it only builds the ``PipelineQuantizationConfig`` (and, for
HiDream's Llama loaded apart, the transformers config) that ``from_pretrained`` applies while
it loads. torchao is imported only when a model asks for int8 or fp8.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

from engine.config import DENOISER, TEXT_ENCODERS, ModelSpec
from engine.errors import ConfigError

log = logging.getLogger(__name__)

LOADED_APART = {"hidream": "text_encoder_4"}  # loaded by transformers before the pipeline
FP8_MIN_CAPABILITY = (8, 9)  # float8 matmuls: Ada (sm_89) and Hopper (sm_90) onwards


def quantised_parts(spec: ModelSpec) -> dict[str, str]:
    """``{component: quant}`` for every part of ``spec`` that is not bf16."""
    names = (DENOISER[spec.family], *TEXT_ENCODERS[spec.family])
    return {n: q for n in names if (q := spec.quant.of(n, spec.family)) != "bf16"}


def check_quantisation(spec: ModelSpec, device: Any) -> None:
    """Refuse, before anything loads, a quantisation this machine cannot run."""
    for name, quant in quantised_parts(spec).items():
        key = _key(spec, name)
        if quant == "nf4" and device.type != "cuda":
            raise ConfigError(key, quant, "nf4 (bitsandbytes 4-bit) needs a CUDA GPU; on this CPU use int8 or bf16")
        if quant == "nf4" and not _has_module("bitsandbytes"):
            raise ConfigError(key, quant, "nf4 needs the bitsandbytes package (pip install bitsandbytes)")
        if quant in ("int8", "fp8") and not _has_module("torchao"):
            raise ConfigError(key, quant, f"{quant} needs the torchao package (pip install 'promptpics[quant]')")
        if quant == "fp8" and not _fp8_capable(device):
            raise ConfigError(key, quant, "fp8 needs an Ada or Hopper GPU (compute capability 8.9+); use int8")


def pipeline_quantisation(spec: ModelSpec, dtype: Any, *, skip: Collection[str] = ()) -> Any | None:
    """The ``PipelineQuantizationConfig`` for the parts the pipeline loads itself (``skip``: parts
    given ready, from the quantised cache), or None."""
    parts = {n: q for n, q in quantised_parts(spec).items() if n != LOADED_APART.get(spec.family) and n not in skip}
    if not parts:
        return None
    from diffusers import PipelineQuantizationConfig

    with quiet_torchao_import(parts.values()):
        mapping = {n: _config(q, dtype, diffusers_side=n == DENOISER[spec.family]) for n, q in parts.items()}
        return PipelineQuantizationConfig(quant_mapping=mapping)


def apart_quantisation(spec: ModelSpec, dtype: Any) -> Any | None:
    """The transformers config for the text encoder loaded apart (HiDream's Llama), or None."""
    name = LOADED_APART.get(spec.family)
    quant = spec.quant.of(name, spec.family) if name else "bf16"
    if quant == "bf16":
        return None
    with quiet_torchao_import([quant]):
        return _config(quant, dtype, diffusers_side=False)


def _config(quant: str, dtype: Any, *, diffusers_side: bool) -> Any:
    """diffusers' config for a denoiser, transformers' for a text encoder (each library's
    ``from_pretrained`` accepts only its own)."""
    if diffusers_side:
        from diffusers import BitsAndBytesConfig, TorchAoConfig
    else:
        from transformers import BitsAndBytesConfig, TorchAoConfig  # type: ignore[assignment]
    if quant == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig() if quant == "int8" else Float8WeightOnlyConfig())


@contextmanager
def quiet_torchao_import(quants: Any) -> Iterator[None]:
    """torchao logs a warning per CUDA kernel library it cannot load (every one, on a CPU) and
    torch one about an Enum it registers: harmless, so kept out of the console while it imports."""
    if not any(q in ("int8", "fp8") for q in quants):
        yield
        return
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import torchao  # noqa: F401

        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def compile_regional_blocking(pipe: Any, spec: ModelSpec) -> None:
    """``compile = "regional"``: torch.compile each repeated block of the denoiser (diffusers'
    ``compile_repeated_blocks``); the compile itself happens on the first run."""
    if spec.compile != "regional":
        return
    denoiser = getattr(pipe, DENOISER[spec.family])
    try:
        denoiser.compile_repeated_blocks(fullgraph=True)
    except ValueError as exc:  # the class declares no repeated blocks
        raise ConfigError(f"models.{spec.id}.compile", spec.compile, str(exc)) from exc
    log.info("%s: regional compile of %s's repeated blocks on (compiles on the first run)", spec.id,
             type(denoiser).__name__)


def _key(spec: ModelSpec, name: str) -> str:
    return f"models.{spec.id}.quant." + ("denoiser" if name == DENOISER[spec.family] else f"text_encoders.{name}")


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _fp8_capable(device: Any) -> bool:
    if device.type != "cuda":
        return False
    import torch

    return tuple(torch.cuda.get_device_capability(device)) >= FP8_MIN_CAPABILITY
