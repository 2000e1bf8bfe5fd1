"""The only diffusers import: load each model family, place it on the device, run it.

Every function here that touches torch ends in ``_blocking`` and runs on the GPU thread.
Foreign errors are translated at this seam: out-of-memory becomes ``OutOfMemoryError``, a
missing or broken model becomes ``ModelLoadError`` (the original stays chained for the log).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.config import ModelSpec
from engine.errors import JobCancelledError, ModelLoadError, OutOfMemoryError
from engine.jobs import GenerationParams
from engine.previews import LatentPreviewer, Preview, PreviewSettings
from engine.safety.prevention import check_latents_blocking, guard_vae_decode_blocking

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]  # (step 1-based, total)
PreviewCallback = Callable[[Preview], None]


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


def load_pipeline_blocking(spec: ModelSpec, device: Any, dtype: Any) -> LoadedPipeline:
    """Load ``spec`` with its family's loader and place it; never leaves half a model behind."""
    started = time.perf_counter()
    pipe = None
    try:
        pipe = _LOADERS[spec.family](spec, dtype)
        # float16: the VAE decodes in float32 (else SDXL's overflows to a black image); any
        # dtype: NaN/Inf pixels raise NonFiniteError, which the safety policy retries.
        guard_vae_decode_blocking(pipe, spec.id, dtype)
        placement = _place_blocking(pipe, spec, device)
    except BaseException as exc:
        del pipe
        free_memory_blocking(device)
        raise translate_error(exc, spec.id, "loading") from exc
    loaded = LoadedPipeline(spec, pipe, device, dtype, placement, pipeline_nbytes(pipe), time.perf_counter() - started)
    log.info("loaded %s (%s, %.0f MB, %s) in %.2f s", spec.id, spec.family, loaded.nbytes / 2**20, placement, loaded.load_s)
    return loaded


def _hub_kwargs(source: str) -> dict[str, Any]:
    # A local folder must never fall back to the hub (a typo would start a 30 GB download).
    return {"local_files_only": True} if os.path.isdir(source) else {}


def _load_flux(spec: ModelSpec, dtype: Any) -> Any:
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(spec.source, dtype=dtype, **_hub_kwargs(spec.source))


def _load_sdxl(spec: ModelSpec, dtype: Any) -> Any:
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(spec.source, dtype=dtype, **_hub_kwargs(spec.source))


def _load_sd3(spec: ModelSpec, dtype: Any) -> Any:
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(spec.source, dtype=dtype, **_hub_kwargs(spec.source))


def _load_hidream(spec: ModelSpec, dtype: Any) -> Any:
    """HiDream-I1 ships without its fourth text encoder: Llama-3.1-8B-Instruct is loaded apart,
    in the pipeline's half precision, with hidden states on (the pipeline reads layers of it)."""
    from diffusers import HiDreamImagePipeline
    from transformers import AutoTokenizer, LlamaForCausalLM

    assert spec.text_encoder_source is not None  # config validation guarantees it
    te_kwargs = _hub_kwargs(spec.text_encoder_source)
    tokenizer_4 = AutoTokenizer.from_pretrained(spec.text_encoder_source, **te_kwargs)
    text_encoder_4 = LlamaForCausalLM.from_pretrained(
        spec.text_encoder_source, output_hidden_states=True, output_attentions=True, dtype=dtype, **te_kwargs
    )
    return HiDreamImagePipeline.from_pretrained(
        spec.source, tokenizer_4=tokenizer_4, text_encoder_4=text_encoder_4, dtype=dtype, **_hub_kwargs(spec.source)
    )


_LOADERS: dict[str, Callable[[ModelSpec, Any], Any]] = {
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


def pipeline_nbytes(pipe: Any) -> int:
    """Bytes of every parameter and buffer of every torch module in the pipeline."""
    import torch

    total = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            total += sum(t.numel() * t.element_size() for t in component.parameters())
            total += sum(t.numel() * t.element_size() for t in component.buffers())
    return total


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


# -- running ---------------------------------------------------------------------------------


def generate_blocking(loaded: LoadedPipeline, params: GenerationParams, *, on_step: StepCallback,
                      cancel: threading.Event, tiled_decode: bool = False, on_preview: PreviewCallback | None = None,
                      previews: PreviewSettings | None = None) -> Any:
    """Run one generation; returns a PIL image of exactly ``params.width x params.height``.

    Out of memory after the last denoising step is reported with the phase "decoding with"
    (the VAE decode), before it with "generating with"; ``tiled_decode`` decodes in tiles, a
    lower peak for a retry (engine.residency decides when). ``on_preview`` gets a small
    picture of the latents now and then (engine/previews.py; no VAE decode)."""
    import torch

    pipe = loaded.pipe
    steps_done = 0
    previewer = None
    if on_preview is not None and (previews or PreviewSettings()).enabled:
        previewer = LatentPreviewer.for_pipeline(loaded.spec.family, pipe, params.width, params.height,
                                                 previews or PreviewSettings(), on_preview)

    def step_end(p: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        nonlocal steps_done
        if cancel.is_set():
            # diffusers' own stop flag, then raise so a cancelled job skips the VAE decode too.
            p._interrupt = True
            raise JobCancelledError("")
        # NaN latents never recover: stop here instead of denoising and decoding a black square.
        check_latents_blocking(kwargs.get("latents"), loaded.spec.id, i + 1)
        steps_done = i + 1
        on_step(i + 1, params.steps)
        if previewer is not None:
            previewer.observe_blocking(p, i + 1, params.steps, kwargs.get("latents"))
        return {}

    if cancel.is_set():
        raise JobCancelledError("")
    kwargs: dict[str, Any] = dict(
        prompt=params.prompt,
        num_inference_steps=params.steps,
        guidance_scale=params.guidance,
        width=params.width,
        height=params.height,
        # A CPU generator gives the same starting noise on every device, so a seed means the
        # same picture on the CPU demo and the GPU bot.
        generator=torch.Generator("cpu").manual_seed(params.seed),
        callback_on_step_end=step_end,
        output_type="pil",
    )
    if params.negative_prompt and loaded.spec.family != "flux":
        # FLUX.1-dev is guidance-distilled: a negative prompt needs true CFG (twice the work), so
        # it is not passed; docs/MODELS.md says so.
        kwargs["negative_prompt"] = params.negative_prompt
    if loaded.spec.family == "hidream":
        _fit_hidream_area(pipe, params.width, params.height)
    if tiled_decode:
        pipe.vae.enable_tiling()
    try:
        with torch.inference_mode():
            image = pipe(**kwargs).images[0]
    except JobCancelledError:
        raise
    except BaseException as exc:
        phase = "decoding with" if steps_done >= params.steps else "generating with"
        raise translate_error(exc, loaded.spec.id, phase) from exc
    finally:
        if tiled_decode:
            pipe.vae.disable_tiling()  # tiles are for the retry only: the same seed, the same pixels
    if image.size != (params.width, params.height):
        # HiDream renders a fixed pixel area rounded to 16 px; bring it to the size asked for.
        from PIL import Image

        image = image.resize((params.width, params.height), Image.Resampling.LANCZOS)
    return image


def _fit_hidream_area(pipe: Any, width: int, height: int) -> None:
    """HiDream ignores width x height as such: it keeps the aspect ratio and renders an area of
    ``(default_sample_size * vae_scale_factor) ** 2``. Setting the sample size from the request
    makes that area the one asked for (exact for square sizes)."""
    pipe.default_sample_size = max(1, math.isqrt(width * height) // pipe.vae_scale_factor)


# -- error translation ------------------------------------------------------------------------


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def translate_error(exc: BaseException, model_id: str, phase: str) -> BaseException:
    """Map a foreign error to the engine's tree; engine errors and interrupts pass through."""
    from engine.errors import EngineError

    if isinstance(exc, EngineError | KeyboardInterrupt | SystemExit):
        return exc
    if is_out_of_memory(exc):
        return OutOfMemoryError(model_id, phase)
    if phase == "loading":
        return ModelLoadError(model_id, _load_reason(exc))
    return exc


def _load_reason(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, OSError | EnvironmentError) or "does not appear to have" in text or "not found" in text.lower():
        return "its files are missing or incomplete (check the model's `source` and that the weights are downloaded)."
    if "gated" in text.lower() or "401" in text or "403" in text:
        return "the hub refused access (accept the model's licence and log in with `hf auth login`)."
    return "the weights could not be read (see the server log)."
