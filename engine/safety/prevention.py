"""Prevention on the GPU thread: a float32 VAE decode under float16, and NaN/Inf guards.

``engine.pipelines`` calls these (it stays the only diffusers import): ``guard_vae_decode_blocking``
once after loading, ``check_latents_blocking`` from its step callback. Both raise
``NonFiniteError``, which the safety policy turns into a "black" verdict and a retry, so a broken
run stops at the step it breaks instead of decoding a black square.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from engine.safety.errors import NonFiniteError

log = logging.getLogger(__name__)

_GUARDED = "_promptpics_decode_guard"


def guard_vae_decode_blocking(pipe: Any, model_id: str, dtype: Any) -> None:
    """Wrap ``pipe.vae.decode``: under float16 the VAE is kept in float32 and its input upcast
    (the SDXL VAE overflows float16 and decodes to NaN -> a black image; FLUX, SD3 and HiDream do
    not upcast on their own); under any dtype the decoded pixels are checked for NaN/Inf.

    bfloat16 has float32's range, so it keeps its VAE as it is. Call before placing the pipeline
    (offload hooks stay in charge: diffusers' ``decode`` triggers them itself). Idempotent.
    """
    import torch

    vae = pipe.vae
    if getattr(vae, _GUARDED, False):
        return
    upcast = dtype == torch.float16
    if upcast:
        vae.to(dtype=torch.float32)
    decode = vae.decode

    @functools.wraps(decode)
    def guarded_decode(z: Any, *args: Any, **kwargs: Any) -> Any:
        out = decode(z.to(torch.float32) if upcast else z, *args, **kwargs)
        sample = out[0] if isinstance(out, tuple) else out.sample
        if not bool(torch.isfinite(sample).all()):
            raise NonFiniteError(model_id, "decoded image")
        return out

    vae.decode = guarded_decode
    setattr(vae, _GUARDED, True)
    if upcast:
        log.info("%s: VAE kept in float32 under float16 (black-image guard)", model_id)


def check_latents_blocking(latents: Any, model_id: str, step: int) -> None:
    """Raise ``NonFiniteError`` when the latents hold NaN/Inf (one small reduction per step)."""
    if latents is not None and not bool(latents.isfinite().all()):
        raise NonFiniteError(model_id, f"latents at step {step}")
