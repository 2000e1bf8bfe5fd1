"""Load each model family, place it on the device, free it; the device, dtype and start-up
switches. The only diffusers import besides the tiny twins (engine/tiny/).

Every function here that touches torch ends in ``_blocking`` and runs on the GPU thread.
A load that fails leaves as ``ModelLoadError`` or ``OutOfMemoryError`` (errors.py).
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import ModelSpec
from engine.pipelines.errors import translate_error
from engine.pipelines.quant_cache import QuantCache
from engine.pipelines.quantise import (
    apart_quantisation,
    check_quantisation,
    compile_regional_blocking,
    pipeline_quantisation,
    quantised_parts,
    quiet_torchao_import,
)
from engine.pipelines.sizes import pipeline_nbytes
from engine.safety.prevention import guard_vae_decode_blocking
from engine.workers import MODEL_LOADING

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LoadedPipeline:
    """A pipeline placed on its device, with what it cost."""

    spec: ModelSpec
    pipe: Any
    device: Any  # torch.device where denoising runs
    dtype: Any  # torch.dtype
    placement: str  # "cpu", "gpu", "model-offload" or "sequential-offload"
    nbytes: int  # parameters + buffers
    load_s: float


# -- device, dtype and start-up switches -----------------------------------------------------


def resolve_device_blocking(setting: str) -> Any:
    """``auto`` -> cuda when present; an explicit cuda without CUDA is a config error."""
    import torch

    from engine.errors import ConfigError

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("engine.device", setting, "CUDA is not available on this machine (use 'auto' or 'cpu')")
    return torch.device(setting)


def resolve_dtype(device: Any, cuda_dtype: str) -> Any:
    """CUDA: bf16/fp16 from config. CPU: always float32 (bf16 on CPU is 15-20x slower)."""
    import torch

    return getattr(torch, cuda_dtype) if device.type == "cuda" else torch.float32


def configure_torch_blocking(device: Any) -> None:
    """Switch TF32 on for matmul and cuDNN when CUDA is present (free speed on Ampere+), and
    keep the libraries' loading bars out of a quiet run (hub download bars stay)."""
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    if not log.isEnabledFor(logging.INFO):
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        log.info("CUDA %s: TF32 matmul and cuDNN TF32 on", torch.cuda.get_device_name(device))


# -- loading ---------------------------------------------------------------------------------


def load_pipeline_blocking(spec: ModelSpec, device: Any, dtype: Any, *,
                           quant_cache: Path | None = None) -> LoadedPipeline:
    """Load ``spec`` with its family's loader (quantised as its config says) and place it;
    never leaves half a model behind. ``quant_cache``: the folder of the quantised cache
    (quant_cache.py): int8/fp8 parts found there are read, the others saved there after loading."""
    started = time.perf_counter()
    check_quantisation(spec, device)  # a config error: refused before anything loads
    pipe = None
    try:
        with MODEL_LOADING:
            pipe, _ = _load_through_cache(spec, dtype, QuantCache(quant_cache) if quant_cache is not None else None)
        compile_regional_blocking(pipe, spec)
        # float16: the VAE decodes in float32 (else SDXL's overflows to a black image); any
        # dtype: NaN/Inf pixels raise NonFiniteError, which the safety policy retries.
        guard_vae_decode_blocking(pipe, spec.id, dtype)
        placement = _place_blocking(pipe, spec, device)
    except BaseException as exc:
        del pipe
        free_memory_blocking(device)
        raise translate_error(exc, spec.id, "loading") from exc
    loaded = LoadedPipeline(spec, pipe, device, dtype, placement, pipeline_nbytes(pipe), time.perf_counter() - started)
    quant = ", ".join(f"{n} {q}" for n, q in quantised_parts(spec).items()) or "bf16"
    log.info("loaded %s (%s, %s, %.0f MB, %s) in %.2f s", spec.id, spec.family, quant, loaded.nbytes / 2**20,
             placement, loaded.load_s)
    return loaded


def quantise_into_cache_blocking(spec: ModelSpec, dtype: Any, cache_dir: Path, device: Any) -> list[str]:
    """Fill the quantised cache for ``spec`` now (``promptpics download --quantise``): load it in
    RAM with the parts already cached, quantise the others and save them; nothing is placed on a
    device. Returns the parts written (none when every part was cached already)."""
    check_quantisation(spec, device)
    cache = QuantCache(cache_dir)
    if not cache.missing_parts(spec, dtype):
        return []
    pipe = None
    try:
        with MODEL_LOADING, quiet_torchao_import(quantised_parts(spec).values()):  # a CLI's console: no import noise
            pipe, written = _load_through_cache(spec, dtype, cache)
    except BaseException as exc:
        raise translate_error(exc, spec.id, "loading") from exc
    finally:
        del pipe
        gc.collect()
    return written


def _load_through_cache(spec: ModelSpec, dtype: Any, cache: QuantCache | None) -> tuple[Any, list[str]]:
    """The family's loader with the parts the cache holds; the parts it quantised are saved there
    while the weights are still in RAM (before any placement). Returns (pipeline, parts written)."""
    cached = cache.load_parts(spec, dtype) if cache is not None else {}
    pipe = _LOADERS[spec.family](spec, dtype, cached)
    return pipe, cache.store_parts(spec, dtype, pipe, skip=cached) if cache is not None else []


def _hub_kwargs(source: str) -> dict[str, Any]:
    # A local folder must never fall back to the hub (a typo would start a 30 GB download).
    return {"local_files_only": True} if os.path.isdir(source) else {}


def _pipeline_kwargs(spec: ModelSpec, dtype: Any, cached: dict[str, Any]) -> dict[str, Any]:
    """``from_pretrained`` arguments: dtype, hub rule, the parts read from the quantised cache,
    and diffusers' quantisation config for the parts still to quantise, if any."""
    quantisation = pipeline_quantisation(spec, dtype, skip=cached)
    extra = {"quantization_config": quantisation} if quantisation is not None else {}
    return {"dtype": dtype, **_hub_kwargs(spec.source), **extra, **cached}


def _load_flux(spec: ModelSpec, dtype: Any, cached: dict[str, Any]) -> Any:
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(spec.source, **_pipeline_kwargs(spec, dtype, cached))


def _load_sdxl(spec: ModelSpec, dtype: Any, cached: dict[str, Any]) -> Any:
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(spec.source, **_pipeline_kwargs(spec, dtype, cached))


def _load_sd3(spec: ModelSpec, dtype: Any, cached: dict[str, Any]) -> Any:
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(spec.source, **_pipeline_kwargs(spec, dtype, cached))


def _load_hidream(spec: ModelSpec, dtype: Any, cached: dict[str, Any]) -> Any:
    """HiDream-I1 ships without its fourth text encoder: Llama-3.1-8B-Instruct is loaded apart,
    in the pipeline's half precision, with hidden states on (the pipeline reads layers of it)."""
    from diffusers import HiDreamImagePipeline
    from transformers import AutoTokenizer, LlamaForCausalLM

    assert spec.text_encoder_source is not None  # config validation guarantees it
    te_kwargs = _hub_kwargs(spec.text_encoder_source)
    tokenizer_4 = AutoTokenizer.from_pretrained(spec.text_encoder_source, **te_kwargs)
    cached = dict(cached)
    text_encoder_4 = cached.pop("text_encoder_4", None)
    if text_encoder_4 is None:
        apart = apart_quantisation(spec, dtype)
        if apart is not None:
            te_kwargs = {**te_kwargs, "quantization_config": apart}
        text_encoder_4 = LlamaForCausalLM.from_pretrained(
            spec.text_encoder_source, output_hidden_states=True, output_attentions=True, dtype=dtype, **te_kwargs
        )
    return HiDreamImagePipeline.from_pretrained(
        spec.source, tokenizer_4=tokenizer_4, text_encoder_4=text_encoder_4, **_pipeline_kwargs(spec, dtype, cached)
    )


_LOADERS: dict[str, Callable[[ModelSpec, Any, dict[str, Any]], Any]] = {
    "flux": _load_flux,
    "sdxl": _load_sdxl,
    "sd3": _load_sd3,
    "hidream": _load_hidream,
}


def _place_blocking(pipe: Any, spec: ModelSpec, device: Any) -> str:
    """Put the pipeline where it runs. Offload calls exist only on CUDA (they raise without it)."""
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_slicing()  # decodes a batch one image at a time: same pixels, lower peak
    if spec.family == "hidream":
        # A no-op for modules without sliced attention; kept because HiDream is the model that
        # runs closest to the memory limit.
        pipe.enable_attention_slicing()
    if device.type != "cuda":
        pipe.to(device)
        return "cpu"
    if spec.offload == "sequential":
        try:
            pipe.enable_sequential_cpu_offload(device=device)
            return "sequential-offload"
        except Exception:  # accelerate too old, meta tensors, ...: model offload still fits
            log.warning("%s: sequential CPU offload failed; using model CPU offload", spec.id, exc_info=True)
            pipe.remove_all_hooks()
    if spec.offload in ("model", "sequential"):
        pipe.enable_model_cpu_offload(device=device)
        return "model-offload"
    pipe.to(device)
    return "gpu"


def release_blocking(loaded: LoadedPipeline) -> None:
    """Drop a pipeline and give its memory back (hooks first, or offload keeps references)."""
    try:
        loaded.pipe.remove_all_hooks()
    except Exception:
        log.debug("%s: remove_all_hooks failed", loaded.spec.id, exc_info=True)
    loaded.pipe = None
    free_memory_blocking(loaded.device)


def free_memory_blocking(device: Any) -> None:
    gc.collect()
    if getattr(device, "type", None) == "cuda":
        import torch

        torch.cuda.empty_cache()
