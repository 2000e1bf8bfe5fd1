"""Quantised twins: every family loads through the production loaders with int8 weight-only
(torchao, through diffusers' PipelineQuantizationConfig), reports its real, smaller size and
renders; what this CPU cannot run is refused with a sentence naming key, value and rule."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from engine.config import ModelSpec, QuantSettings, TEXT_ENCODERS
from engine.errors import ConfigError
from tests.conftest import REPO

torch = pytest.importorskip("torch")
pytest.importorskip("torchao")

CPU = torch.device("cpu")
# The largest text encoder of each family: T5 (flux, sd3), OpenCLIP-G (sdxl), Llama (hidream,
# loaded apart by transformers).
BIG_TEXT_ENCODER = {"flux": "text_encoder_2", "sdxl": "text_encoder_2", "sd3": "text_encoder_3",
                    "hidream": "text_encoder_4"}


def spec_of(tiny_config: Any, family: str, **update: Any) -> ModelSpec:
    spec = next(s for s in tiny_config.models.values() if s.family == family)
    return spec.model_copy(update=update)


def int8(family: str) -> QuantSettings:
    return QuantSettings(denoiser="int8", text_encoders={BIG_TEXT_ENCODER[family]: "int8"})


def render(loaded: Any) -> np.ndarray:
    from engine.pipelines import release_blocking

    pipe = loaded.pipe
    if loaded.spec.family == "hidream":
        pipe.default_sample_size = 8  # HiDream ignores width/height (docs: DESIGN.md offline facts)
    try:
        out = pipe("a red fox", num_inference_steps=2, height=64, width=64, guidance_scale=1.0, output_type="np",
                   generator=torch.Generator().manual_seed(0))
        return np.asarray(out.images[0])
    finally:
        release_blocking(loaded)


@pytest.mark.parametrize("family", ["flux", "sdxl", "sd3", "hidream"])
def test_an_int8_twin_loads_smaller_and_renders(tiny_config: Any, family: str) -> None:
    from engine.pipelines import load_pipeline_blocking, tensor_nbytes

    plain = load_pipeline_blocking(spec_of(tiny_config, family), CPU, torch.float32)
    quantised = load_pipeline_blocking(spec_of(tiny_config, family, quant=int8(family)), CPU, torch.float32)
    denoiser = quantised.pipe.transformer if family != "sdxl" else quantised.pipe.unet
    weight = next(m.weight for m in denoiser.modules() if isinstance(m, torch.nn.Linear))
    assert type(weight).__name__ == "Int8Tensor"  # torchao's, put there by diffusers' loader
    assert tensor_nbytes(weight) < weight.numel() * 4 * 0.4  # one byte a weight plus scales, not four
    # The reported size is the real one: the Linear weights of the two quantised parts went from
    # four bytes to one (plus a scale a row; a few layers, such as a Llama's tied output head,
    # stay), and nothing else moved. (A count of numel x element_size would see float32
    # Int8Tensors and report no saving at all.)
    parts = [getattr(plain.pipe, "unet" if family == "sdxl" else "transformer"), getattr(plain.pipe, BIG_TEXT_ENCODER[family])]
    linear_fp32 = sum(m.weight.numel() * 4 for p in parts for m in p.modules() if isinstance(m, torch.nn.Linear))
    saved = plain.nbytes - quantised.nbytes
    assert 0.6 * linear_fp32 <= saved <= 0.75 * linear_fp32, (saved, linear_fp32)
    big = getattr(quantised.pipe, BIG_TEXT_ENCODER[family])
    assert any(type(t).__name__ == "Int8Tensor" for t in big.parameters())
    image = render(quantised)
    render(plain)
    assert image.shape[-1] == 3 and np.isfinite(image).all()


def test_nf4_and_fp8_are_refused_on_a_cpu_by_name(tiny_config: Any) -> None:
    from engine.pipelines import load_pipeline_blocking

    spec = spec_of(tiny_config, "flux", id="flux_dev", quant=QuantSettings(denoiser="nf4"))
    with pytest.raises(ConfigError) as nf4:
        load_pipeline_blocking(spec, CPU, torch.float32)
    assert "models.flux_dev.quant.denoiser" in str(nf4.value) and "CUDA" in str(nf4.value)
    spec = spec_of(tiny_config, "sd3", id="sd3_medium", quant=QuantSettings(text_encoders={"text_encoder_3": "fp8"}))
    with pytest.raises(ConfigError) as fp8:
        load_pipeline_blocking(spec, CPU, torch.float32)
    assert "models.sd3_medium.quant.text_encoders.text_encoder_3" in str(fp8.value) and "Ada" in str(fp8.value)


def test_the_size_estimate_follows_the_quantisation(tiny_config: Any) -> None:
    from engine.residency.device import TorchOps

    ops = TorchOps(CPU)
    plain = ops.expected_bytes(spec_of(tiny_config, "flux"), torch.float32)
    quantised = ops.expected_bytes(spec_of(tiny_config, "flux", quant=int8("flux")), torch.float32)
    assert plain and quantised and quantised < 0.8 * plain


def test_regional_compile_is_applied_to_the_repeated_blocks(tiny_config: Any) -> None:
    from engine.pipelines import load_pipeline_blocking, release_blocking

    loaded = load_pipeline_blocking(spec_of(tiny_config, "flux", compile="regional"), CPU, torch.float32)
    try:
        blocks = [m for m in loaded.pipe.transformer.modules() if type(m).__name__ == "FluxTransformerBlock"]
        assert blocks and all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
        others = [m for m in loaded.pipe.transformer.modules() if type(m).__name__ == "AdaLayerNormContinuous"]
        assert all(getattr(m, "_compiled_call_impl", None) is None for m in others)
    finally:
        release_blocking(loaded)
    # Not rendered here: the first run would compile with inductor, minutes on a 2-core CPU and a
    # C compiler needed; bench/quant_gpu.py measures compile seconds and s/step on the GPU.


def test_every_family_names_its_text_encoders_in_order() -> None:
    assert {f: len(names) for f, names in TEXT_ENCODERS.items()} == {"flux": 2, "sdxl": 2, "sd3": 3, "hidream": 4}


def test_importing_the_quantisation_module_loads_no_torchao() -> None:
    # torchao logs a line per CUDA kernel library it cannot load: it must not run on every CLI call
    code = "import sys, engine.pipelines.quantise, engine.placement; print('torchao' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr
