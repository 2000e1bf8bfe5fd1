"""How one model sits on the card: per-component quantisation (``[models.<id>.quant]``) and
regional compilation (``compile``); the names of each family's parts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import Field

from engine.config.base import SettingsModel

QUANTS = ("bf16", "fp8", "int8", "nf4")
Quant = Literal["bf16", "fp8", "int8", "nf4"]  # "bf16": not quantised (the pipeline's own dtype)
PLACEMENTS = ("manual", "auto")

# The pipeline components of each family, as diffusers names them.
DENOISER = {"flux": "transformer", "sdxl": "unet", "sd3": "transformer", "hidream": "transformer"}
TEXT_ENCODERS = {
    "flux": ("text_encoder", "text_encoder_2"),  # CLIP-L, T5-XXL
    "sdxl": ("text_encoder", "text_encoder_2"),  # CLIP-L, OpenCLIP-bigG
    "sd3": ("text_encoder", "text_encoder_2", "text_encoder_3"),  # CLIP-L, CLIP-G, T5-XXL
    "hidream": ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4"),  # + Llama-3.1-8B
}
# diffusers 0.42 declares ``_repeated_blocks`` (what ``compile_repeated_blocks`` compiles) only on
# these families' denoisers: FluxTransformer2DModel and UNet2DConditionModel.
REGIONAL_COMPILE_FAMILIES = ("flux", "sdxl")


class QuantSettings(SettingsModel):
    """``[models.<id>.quant]``: ``denoiser`` and each text encoder by its component name; the
    VAE always stays in full precision. Weight-only: activations keep the pipeline's dtype."""

    denoiser: Quant = "bf16"
    text_encoders: Mapping[str, Quant] = Field(default_factory=dict)  # {"text_encoder_2": "int8"}

    def of(self, component: str, family: str) -> Quant:
        """The quantisation of one pipeline component (``"bf16"`` for the VAE and anything unnamed)."""
        if component == DENOISER[family]:
            return self.denoiser
        return self.text_encoders.get(component, "bf16")

    @property
    def quantised(self) -> bool:
        return self.denoiser != "bf16" or any(q != "bf16" for q in self.text_encoders.values())
