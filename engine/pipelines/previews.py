"""Latent -> small RGB preview per model family, from the step callback, without the VAE.

Each family's latents map to RGB through a fixed linear projection (``rgb = latent @ M + b``),
fitted once against the real VAE and published with ComfyUI (``comfy/latent_formats.py``,
classes ``SDXL``, ``SD3`` and ``Flux``; their ``Latent2RGBPreviewer`` maps the result from
-1..1 to 0..255 as ``preview_to_image`` does here). HiDream-I1 decodes with the FLUX VAE, so
it uses the FLUX factors.

What is projected is the *denoised estimate*, not the noisy latents: the last step is
extrapolated to sigma 0 (``x0 = x - sigma * dx/dsigma``), which is exact for the Euler
schedulers of the four pipelines (flow matching and SDXL's EulerDiscrete) and close for the
multistep ones. Early previews then show the composition instead of noise.

Cost: an einsum over the latent grid (96x96 for a 768 px image), one small device-to-host
copy, a resize and a JPEG encode: about a millisecond on a CPU (bench/previews.py,
docs/PERFORMANCE.md). Everything here that touches torch ends in ``_blocking`` and runs on the
GPU thread; nothing is imported at module import time.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.config import PreviewSettings

log = logging.getLogger(__name__)

FORMATS = {"jpeg": ("JPEG", "image/jpeg", "jpg"), "webp": ("WEBP", "image/webp", "webp")}


# -- the published factors ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LatentFormat:
    """A family's latent space as the factors expect it: ``(vae_latent - shift) * scale``,
    which is also what diffusers denoises (its decode undoes exactly this)."""

    name: str
    scale: float
    shift: float
    rgb: tuple[tuple[float, float, float], ...]  # one row per latent channel
    bias: tuple[float, float, float]

    @property
    def channels(self) -> int:
        return len(self.rgb)


# Source: ComfyUI, comfy/latent_formats.py (numeric constants only, no code taken): class SDXL (scale_factor 0.13025), class SD3 (1.5305, shift 0.0609), class Flux
# (0.3611, shift 0.1159).
SDXL = LatentFormat("sdxl", 0.13025, 0.0, (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
), (0.1084, -0.0175, -0.0011))

SD3 = LatentFormat("sd3", 1.5305, 0.0609, (
    (-0.0922, -0.0175, 0.0749),
    (0.0311, 0.0633, 0.0954),
    (0.1994, 0.0927, 0.0458),
    (0.0856, 0.0339, 0.0902),
    (0.0587, 0.0272, -0.0496),
    (-0.0006, 0.1104, 0.0309),
    (0.0978, 0.0306, 0.0427),
    (-0.0042, 0.1038, 0.1358),
    (-0.0194, 0.0020, 0.0669),
    (-0.0488, 0.0130, -0.0268),
    (0.0922, 0.0988, 0.0951),
    (-0.0278, 0.0524, -0.0542),
    (0.0332, 0.0456, 0.0895),
    (-0.0069, -0.0030, -0.0810),
    (-0.0596, -0.0465, -0.0293),
    (-0.1448, -0.1463, -0.1189),
), (0.2394, 0.2135, 0.1925))

FLUX = LatentFormat("flux", 0.3611, 0.1159, (
    (-0.0346, 0.0244, 0.0681),
    (0.0034, 0.0210, 0.0687),
    (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329),
    (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915),
    (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421),
    (-0.0515, 0.0201, 0.0011),
    (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749),
    (-0.1264, -0.0522, -0.1103),
    (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
), (-0.0329, -0.0718, -0.0851))

LATENT_FORMATS: dict[str, LatentFormat] = {"sdxl": SDXL, "sd3": SD3, "flux": FLUX, "hidream": FLUX}


# -- plain data out ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Preview:
    step: int  # 1-based: the step whose latents it shows
    total: int
    image: bytes
    mime: str  # "image/jpeg" or "image/webp"
    width: int
    height: int


class PreviewThrottle:
    """Due when ``every_steps`` steps and ``min_interval_s`` seconds have passed since the last
    preview (or the start). Never on the last step: the image itself follows at once."""

    def __init__(self, every_steps: int, min_interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_steps, self.min_interval_s, self._clock = every_steps, min_interval_s, clock
        self._last_step = 0
        self._last_time = clock()

    def due(self, step: int, total: int) -> bool:
        if step >= total or step - self._last_step < self.every_steps:
            return False
        now = self._clock()
        if now - self._last_time < self.min_interval_s:
            return False
        self._last_step, self._last_time = step, now
        return True


# -- the maths (torch, GPU thread) -------------------------------------------------------------


def unpack_flux_latents_blocking(latents: Any, height: int, width: int, vae_scale_factor: int) -> Any:
    """FLUX packs 2x2 latent patches into the sequence: (B, h/2 * w/2, C*4) -> (B, C, h, w).
    The same arithmetic as ``FluxPipeline._unpack_latents`` (diffusers)."""
    batch, _, packed = latents.shape
    h = 2 * (int(height) // (vae_scale_factor * 2))
    w = 2 * (int(width) // (vae_scale_factor * 2))
    x = latents.view(batch, h // 2, w // 2, packed // 4, 2, 2)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(batch, packed // 4, h, w)


def denoised_estimate_blocking(latents: Any, previous: Any | None, previous_sigma: float | None,
                               sigma: float | None) -> Any:
    """Extrapolate the last step to sigma 0. Both Euler updates are ``x' = x + (s' - s) * d``
    with ``d = (x - x0) / s`` (flow matching: ``x = (1 - s) x0 + s n``; EulerDiscrete:
    ``x = x0 + s n``), so ``x0 = x' - s' * (x' - x) / (s' - s)``. Without what that needs
    (the first step, an unknown scheduler) the latents are shown as they are."""
    if previous is None or sigma is None or previous_sigma is None or previous.shape != latents.shape:
        return latents
    ds = sigma - previous_sigma
    if abs(ds) < 1e-8:
        return latents
    import torch

    # x0 = x + k (x_prev - x) with k = sigma / ds: one fused op
    return torch.lerp(latents.float(), previous.float(), sigma / ds)


def projection_blocking(fmt: LatentFormat, vae_scaling: float, vae_shift: float, device: Any) -> tuple[Any, Any]:
    """The factors adapted to this pipeline's VAE config, as ``(matrix C x 3, bias 3)``.

    diffusers' loop holds ``(z - vae_shift) * vae_scaling``; the factors expect
    ``(z - fmt.shift) * fmt.scale``. For the real weights the two agree; for other VAE configs
    (the tiny twins, a fine-tune) the affine map between them is folded into M and b."""
    import torch

    m = torch.tensor(fmt.rgb, dtype=torch.float32, device=device)
    b = torch.tensor(fmt.bias, dtype=torch.float32, device=device)
    alpha = fmt.scale / vae_scaling
    beta = (vae_shift - fmt.shift) * fmt.scale
    return m * alpha, b + beta * m.sum(dim=0)


def latents_to_rgb_blocking(latents: Any, matrix: Any, bias: Any) -> Any:
    """(B, C, h, w) or (C, h, w) -> (h, w, 3) uint8 on the CPU; the first image of a batch."""
    import torch

    x = latents[0] if latents.dim() == 4 else latents
    channels, h, w = x.shape
    rgb = torch.addmm(bias, x.float().reshape(channels, h * w).T, matrix)  # (h*w, 3): one small GEMM
    return rgb.add_(1.0).mul_(127.5).clamp_(0, 255).to(torch.uint8).view(h, w, 3).cpu()


def preview_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The requested aspect ratio with the long side at most ``max_side`` (and the image's own)."""
    long_side = min(max_side, max(width, height))
    scale = long_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_preview(rgb: Any, size: tuple[int, int], fmt: str, quality: int) -> bytes:
    """(h, w, 3) uint8 array -> JPEG or WebP bytes of ``size``."""
    from PIL import Image

    image = Image.fromarray(rgb.numpy(), "RGB")
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format=FORMATS[fmt][0], quality=quality)
    return buffer.getvalue()


# -- one generation's previews -----------------------------------------------------------------


class LatentPreviewer:
    """Called from the step callback with every step's latents; emits a ``Preview`` when the
    throttle allows. Holds a reference (no copy) to the previous step's latents: the schedulers
    return a new tensor each step. A failure turns previews off for this generation, never
    fails the job."""

    def __init__(self, family: str, settings: PreviewSettings, emit: Callable[[Preview], None], *, width: int,
                 height: int, vae_scale_factor: int, vae_scaling: float, vae_shift: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.family, self.settings, self._emit = family, settings, emit
        self.format = LATENT_FORMATS[family]
        self.width, self.height, self.vae_scale_factor = width, height, vae_scale_factor
        self.vae_scaling, self.vae_shift = vae_scaling, vae_shift
        self.size = preview_size(width, height, settings.max_side)
        self.throttle = PreviewThrottle(settings.every_steps, settings.min_interval_s, clock)
        self._projection: tuple[Any, Any] | None = None
        self._previous: Any = None
        self._broken = False

    @classmethod
    def for_pipeline(cls, family: str, pipe: Any, width: int, height: int, settings: PreviewSettings,
                     emit: Callable[[Preview], None]) -> LatentPreviewer:
        vae = pipe.vae.config
        return cls(family, settings, emit, width=width, height=height,
                   vae_scale_factor=int(getattr(pipe, "vae_scale_factor", 8)),
                   vae_scaling=float(getattr(vae, "scaling_factor", None) or LATENT_FORMATS[family].scale),
                   vae_shift=float(getattr(vae, "shift_factor", None) or 0.0))

    def observe_blocking(self, pipe: Any, step: int, total: int, latents: Any) -> None:
        if self._broken or latents is None:
            return
        previous, self._previous = self._previous, latents
        if not self.throttle.due(step, total):
            return
        try:
            data = self.render_blocking(latents, previous, *_last_sigmas(pipe))
        except Exception:
            self._broken = True
            log.warning("previews: %s latents of shape %s could not be projected; previews off for this image",
                        self.family, tuple(getattr(latents, "shape", ())), exc_info=True)
            return
        self._emit(Preview(step, total, data, FORMATS[self.settings.format][1], *self.size))

    def render_blocking(self, latents: Any, previous: Any | None = None, previous_sigma: float | None = None,
                        sigma: float | None = None) -> bytes:
        x0 = denoised_estimate_blocking(latents, previous, previous_sigma, sigma)
        if x0.dim() == 3 and self.family == "flux":  # packed (B, seq, C*4)
            x0 = unpack_flux_latents_blocking(x0, self.height, self.width, self.vae_scale_factor)
        if x0.shape[-3] != self.format.channels:
            raise ValueError(f"{self.format.channels} latent channels expected, got {x0.shape[-3]}")
        if self._projection is None or self._projection[0].device != x0.device:
            self._projection = projection_blocking(self.format, self.vae_scaling, self.vae_shift, x0.device)
        rgb = latents_to_rgb_blocking(x0, *self._projection)
        return encode_preview(rgb, self.size, self.settings.format, self.settings.quality)


def _last_sigmas(pipe: Any) -> tuple[float | None, float | None]:
    """``(sigma before, sigma after)`` the step just taken: ``scheduler.sigmas[step_index - 1]``
    and ``[step_index]`` (the schedulers advance ``step_index`` inside ``step``). Read only when a
    preview is due: on CUDA each read waits for the GPU. ``(None, None)`` without a schedule."""
    scheduler = getattr(pipe, "scheduler", None)
    sigmas = getattr(scheduler, "sigmas", None)
    index = getattr(scheduler, "step_index", None)
    if sigmas is None or not isinstance(index, int) or not 1 <= index < len(sigmas):
        return None, None
    return float(sigmas[index - 1]), float(sigmas[index])
