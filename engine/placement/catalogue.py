"""The four model families at full size: each component's bf16 weight bytes, what each
quantisation keeps of them, and its cost per denoising step. Plain numbers, no torch.

Sizes are the published parameter counts x 2 bytes (the same figures as bench/scheduler.py and
docs/PERFORMANCE.md): FLUX.1-dev 11.9B transformer, T5-XXL 4.76B, CLIP-L 123M, OpenCLIP-bigG
695M, VAE 84M; RealVisXL (SDXL) 2.57B UNet; SD3 Medium 2.03B transformer; HiDream-I1 Full 17.1B
transformer and Llama-3.1-8B-Instruct (8.03B) as its fourth text encoder.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

_T5, _CLIP_L, _CLIP_G, _VAE, _LLAMA = 9.52, 0.25, 1.39, 0.17, 16.06

# GB (decimal) in bf16, by diffusers' component names.
COMPONENTS_GB: Mapping[str, Mapping[str, float]] = MappingProxyType({
    "flux": {"transformer": 23.8, "text_encoder": _CLIP_L, "text_encoder_2": _T5, "vae": _VAE},
    "sdxl": {"unet": 5.13, "text_encoder": _CLIP_L, "text_encoder_2": _CLIP_G, "vae": _VAE},
    "sd3": {"transformer": 4.06, "text_encoder": _CLIP_L, "text_encoder_2": _CLIP_G, "text_encoder_3": _T5,
            "vae": _VAE},
    "hidream": {"transformer": 34.21, "text_encoder": _CLIP_L, "text_encoder_2": _CLIP_G, "text_encoder_3": _T5,
                "text_encoder_4": _LLAMA, "vae": _VAE},
})

# The text encoders worth quantising: T5-XXL and Llama (the CLIPs are under 1.4 GB and stay bf16).
LARGE_TEXT_ENCODER_GB = 2.0

# Bytes per parameter once loaded. 8-bit weight-only: one byte a weight plus per-row scales and
# the layers torchao leaves alone (norms, embeddings): ~0.52 of bf16. NF4: half a byte plus
# block scales (bitsandbytes: one absmax per 64 weights), embeddings and norms kept: ~0.28.
_BYTES_PER_PARAM = {"bf16": 2.0, "fp8": 1.04, "int8": 1.04, "nf4": 0.56}

# Seconds per denoising step relative to bf16, weight-only, no torch.compile: public figures,
# none measured here (no GPU was lent when this was written; bench/quant_gpu.py measures them).
#   fp8  1.01  sayakpaul/diffusers-torchao README, CogVideoX-5B on an H100: bf16 112.4 s, fp8 113.2 s
#   int8 1.10  same table: int8wo 123.1 s (A100: 243.3 s -> 260.0 s, 1.07)
#   nf4  1.30  an assumption on the slow side: the Hugging Face blog "Exploring Quantization
#              Backends in Diffusers" (May 2025) reports FLUX.1-dev in NF4 at times close to
#              bf16; bitsandbytes dequantises every weight on every step
STEP_FACTOR = MappingProxyType({"bf16": 1.0, "fp8": 1.01, "int8": 1.10, "nf4": 1.30})


def bytes_per_param(quant: str) -> float:
    return _BYTES_PER_PARAM[quant]


def quantised_gb(bf16_gb: float, quant: str) -> float:
    return bf16_gb * _BYTES_PER_PARAM[quant] / 2.0
