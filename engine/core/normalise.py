"""Request validation and normalisation: a raw JobRequest becomes exact GenerationParams."""

from __future__ import annotations

import random
import re

from engine.config import Config, Limits, ModelSpec
from engine.errors import RequestError
from engine.jobs import GenerationParams, JobRequest

# The pixel multiple each family accepts: the VAE downsamples by 8, and the transformer
# families pack 2x2 latent patches on top (FLUX, SD3 and HiDream), so they need 16.
SIZE_MULTIPLE = {"flux": 16, "sdxl": 8, "sd3": 16, "hidream": 16}
MAX_SEED = 2**32 - 1
AUTO = "auto"


def requested_model(request: JobRequest, config: Config) -> str | None:
    """The model the user named, validated; None when the engine should choose."""
    if request.model is None or request.model.strip().lower() in ("", AUTO):
        return None
    model_id = request.model.strip().lower()
    if model_id not in config.models:
        raise RequestError("model", request.model, f"it must be 'auto' or one of: {', '.join(config.models)}")
    return model_id


def check_request(request: JobRequest, config: Config) -> tuple[str, ...]:
    """Every rule ``submit`` checks that needs no router, before any engine starts: a front end
    refuses a bad request at once. Returns the ids of the models the request may run on."""
    explicit = requested_model(request, config)
    # Limits do not depend on the model: the default model's defaults stand in for the router's pick.
    normalise(request, config.model(explicit or config.default_model), config, rng=random.Random(0))
    return (explicit,) if explicit else tuple(config.models)


def clean_prompt(prompt: object, limits: Limits) -> str:
    """The prompt with whitespace collapsed; refused when empty or too long."""
    return _text("prompt", prompt, limits.max_prompt_chars, required=True)


def normalise(request: JobRequest, model: ModelSpec, config: Config, *, route_reason: str = "",
              rng: random.Random | None = None) -> GenerationParams:
    """Check every field against the hard limits and fill the defaults of ``model``."""
    lim = config.limits
    prompt = clean_prompt(request.prompt, lim)
    negative = _text("negative_prompt", request.negative_prompt or "", lim.max_negative_chars, required=False)
    steps = model.steps if request.steps is None else request.steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not lim.min_steps <= steps <= lim.max_steps:
        raise RequestError("steps", steps, f"it must be a whole number from {lim.min_steps} to {lim.max_steps}")
    guidance = model.guidance if request.guidance is None else request.guidance
    if isinstance(guidance, bool) or not isinstance(guidance, int | float) or not lim.min_guidance <= guidance <= lim.max_guidance:
        raise RequestError("guidance", guidance, f"it must be a number from {lim.min_guidance:g} to {lim.max_guidance:g}")
    width = _side("width", request.width, model, config)
    height = _side("height", request.height, model, config)
    seed = request.seed
    if seed is None:
        seed = (rng or random.SystemRandom()).randint(0, MAX_SEED)
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise RequestError("seed", seed, f"it must be a whole number from 0 to {MAX_SEED}")
    return GenerationParams(prompt=prompt, negative_prompt=negative, model_id=model.id, steps=steps,
                            guidance=float(guidance), width=width, height=height, seed=seed,
                            route_reason=route_reason)


# Control characters other than whitespace (NUL, ESC, DEL, the C1 range): removed from prompts.
# Kept, they would reach the PNG metadata, captions and logs verbatim, and a word split by one
# ("co\x00ke") would slip past the safety prompt check; removed, it is whole again.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")


def _text(field: str, value: object, limit: int, *, required: bool) -> str:
    if not isinstance(value, str):
        raise RequestError(field, value, "it must be text")
    # Newlines and runs of spaces add nothing to a prompt; control characters go (above).
    text = " ".join(_CONTROL.sub("", value).split())
    if required and not text:
        raise RequestError(field, value, "it must not be empty")  # shown with repr: escaped
    if len(text) > limit:
        raise RequestError(field, f"{len(text)} characters", f"it must be at most {limit} characters")
    return text


def _side(field: str, value: int | None, model: ModelSpec, config: Config) -> int:
    """Cap at max_image_side (the stated policy: too big is shrunk, not refused), round down
    to the family's multiple, and refuse only what is too small to be an image."""
    lim = config.limits
    multiple = SIZE_MULTIPLE[model.family]
    top = lim.max_image_side - lim.max_image_side % multiple
    if value is None:
        return top
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(field, value, "it must be a whole number of pixels")
    if value < lim.min_image_side:
        raise RequestError(field, value, f"it must be at least {lim.min_image_side} pixels")
    side = min(value, lim.max_image_side)
    return max(side - side % multiple, multiple)
