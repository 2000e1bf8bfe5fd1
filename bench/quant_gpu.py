"""GPU benchmark (run once on a lent device): full-size random-weight denoisers and text encoders
of the four families, at 768x768, for each quantisation the card supports, built and quantised
through the same diffusers/transformers configs as engine/pipelines/quantise.py.

    python bench/quant_gpu.py [--parts all|denoisers|text_encoders] [--quants bf16,int8,fp8,nf4]
                              [--steps 4] [--compile] [--json OUT]

Per (part, quantisation): load seconds (build on the meta device, random init, quantise, move
to the GPU), seconds per step (denoisers: one forward at the 768x768 latent; text encoders: one
forward of a 512-token prompt), peak GPU memory and the bytes the part reports (tensor subclasses
counted by their parts, engine.pipelines.module_nbytes); for int8/fp8 also the quantised
cache's write seconds and its load seconds back onto the GPU. ``--compile``: regional compile of the
flux and sdxl denoisers (compile_repeated_blocks) - compile seconds and s/step after.
No weights are downloaded: configs only, random weights (quality is not measured here).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.pipelines import module_nbytes  # noqa: E402
from engine.placement import COMPONENTS_GB  # noqa: E402

# Full-size configs (published config.json values), by (family, part).
DENOISERS: dict[str, tuple[str, dict[str, Any]]] = {
    "flux": ("FluxTransformer2DModel", dict(num_layers=19, num_single_layers=38, attention_head_dim=128,
                                            num_attention_heads=24, joint_attention_dim=4096,
                                            pooled_projection_dim=768, guidance_embeds=True, in_channels=64)),
    "sdxl": ("UNet2DConditionModel", dict(sample_size=128, in_channels=4, out_channels=4,
                                          block_out_channels=(320, 640, 1280), layers_per_block=2,
                                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                          up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                          transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                                          cross_attention_dim=2048, use_linear_projection=True,
                                          addition_embed_type="text_time", addition_time_embed_dim=256,
                                          projection_class_embeddings_input_dim=2816)),
    "sd3": ("SD3Transformer2DModel", dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                          attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                          caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                                          pos_embed_max_size=192)),
    "hidream": ("HiDreamImageTransformer2DModel", dict(patch_size=2, in_channels=16, out_channels=16,
                                                       num_layers=16, num_single_layers=32, attention_head_dim=128,
                                                       num_attention_heads=20, caption_channels=[4096, 4096],
                                                       text_emb_dim=2048, num_routed_experts=4,
                                                       num_activated_experts=2, axes_dims_rope=(64, 32, 32),
                                                       max_resolution=(128, 128), llama_layers=list(range(48)))),
}
TEXT_ENCODERS = {  # the two large ones; the CLIPs stay bf16 in every plan
    "t5xxl": ("T5EncoderModel", "T5Config", dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64,
                                                 vocab_size=32128, feed_forward_proj="gated-gelu")),
    "llama31_8b": ("LlamaForCausalLM", "LlamaConfig", dict(hidden_size=4096, intermediate_size=14336,
                                                           num_hidden_layers=32, num_attention_heads=32,
                                                           num_key_value_heads=8, vocab_size=128256)),
}


def quant_config(quant: str, dtype: Any, diffusers_side: bool) -> Any:
    """The same configs engine/pipelines/quantise.py builds."""
    if quant == "bf16":
        return None
    if diffusers_side:
        from diffusers import BitsAndBytesConfig, TorchAoConfig
    else:
        from transformers import BitsAndBytesConfig, TorchAoConfig
    if quant == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig() if quant == "int8" else Float8WeightOnlyConfig())


def build_and_quantise(kind: str, family_or_name: str, quant: str, workdir: Path) -> Any:
    """Random weights saved once in bf16, then loaded with from_pretrained(quantization_config=...),
    the production path."""
    import diffusers
    import torch
    import transformers

    folder = workdir / f"{kind}-{family_or_name}"
    if not folder.is_dir():
        if kind == "denoiser":
            cls_name, cfg = DENOISERS[family_or_name]
            model = getattr(diffusers, cls_name)(**cfg).to(torch.bfloat16)
        else:
            cls_name, cfg_name, cfg = TEXT_ENCODERS[family_or_name]
            model = getattr(transformers, cls_name)(getattr(transformers, cfg_name)(**cfg)).to(torch.bfloat16)
        model.save_pretrained(folder)
        del model
    cls = getattr(diffusers if kind == "denoiser" else transformers,
                  DENOISERS[family_or_name][0] if kind == "denoiser" else TEXT_ENCODERS[family_or_name][0])
    q = quant_config(quant, torch.bfloat16, diffusers_side=kind == "denoiser")
    extra = {"quantization_config": q} if q is not None else {}
    if quant == "nf4":
        extra["device_map"] = "cuda"
    model = cls.from_pretrained(folder, dtype=torch.bfloat16, **extra)
    return model if quant == "nf4" else model.to("cuda")


def denoiser_inputs(family: str, side: int = 768) -> dict[str, Any]:
    """One denoising step's inputs at ``side`` x ``side`` (batch 1, bf16, on the GPU)."""
    import torch

    kw: dict[str, Any] = {"device": "cuda", "dtype": torch.bfloat16}
    if family == "flux":  # 2x2-packed 16-channel latents: (side/16)^2 tokens of 64
        n = (side // 16) ** 2
        return dict(hidden_states=torch.randn(1, n, 64, **kw), encoder_hidden_states=torch.randn(1, 512, 4096, **kw),
                    pooled_projections=torch.randn(1, 768, **kw), timestep=torch.tensor([1.0], **kw),
                    guidance=torch.tensor([3.5], **kw), img_ids=torch.zeros(n, 3, **kw),
                    txt_ids=torch.zeros(512, 3, **kw), return_dict=False)
    if family == "sdxl":
        return dict(sample=torch.randn(2, 4, side // 8, side // 8, **kw), timestep=torch.tensor(999, device="cuda"),
                    encoder_hidden_states=torch.randn(2, 77, 2048, **kw), return_dict=False,
                    added_cond_kwargs={"text_embeds": torch.randn(2, 1280, **kw), "time_ids": torch.randn(2, 6, **kw)})
    if family == "sd3":
        return dict(hidden_states=torch.randn(2, 16, side // 8, side // 8, **kw),
                    encoder_hidden_states=torch.randn(2, 333, 4096, **kw), pooled_projections=torch.randn(2, 2048, **kw),
                    timestep=torch.tensor([999.0, 999.0], **kw), return_dict=False)
    return dict(hidden_states=torch.randn(2, 16, side // 8, side // 8, **kw), timesteps=torch.tensor([999, 999], device="cuda"),
                encoder_hidden_states_t5=torch.randn(2, 128, 4096, **kw),
                encoder_hidden_states_llama3=torch.randn(48, 2, 128, 4096, **kw),
                pooled_embeds=torch.randn(2, 2048, **kw), return_dict=False)


def measure(model: Any, inputs: dict[str, Any], steps: int) -> tuple[float, float]:
    """(first call seconds, mean seconds per call after it)."""
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        model(**inputs)
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(steps):
            model(**inputs)
        torch.cuda.synchronize()
    return first, (time.perf_counter() - t0) / steps


def one(kind: str, name: str, quant: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = build_and_quantise(kind, name, quant, args.workdir)
    torch.cuda.synchronize()
    row: dict[str, Any] = {"load_s": round(time.perf_counter() - t0, 2), "gb": round(module_nbytes(model) / 1e9, 2)}
    if kind == "denoiser":
        inputs = denoiser_inputs(name)
    else:
        inputs = {"input_ids": torch.randint(0, 32000, (1, 512 if name == "t5xxl" else 128), device="cuda")}
    first, per = measure(model, inputs, args.steps)
    row.update(first_call_s=round(first, 3), s_per_step=round(per, 4),
               peak_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2))
    if quant in ("int8", "fp8"):  # the quantised cache (engine/pipelines/quant_cache.py): write once, read back
        model, row["cache_write_s"], row["cache_load_s"] = cache_round_trip(model, args.workdir / f"cached-{kind}-{name}-{quant}")
    if args.compile and kind == "denoiser" and name in ("flux", "sdxl"):
        model.compile_repeated_blocks(fullgraph=True)
        first, per = measure(model, inputs, args.steps)
        row.update(compile_s=round(first, 1), compiled_s_per_step=round(per, 4))
    del model
    return row


def cache_round_trip(model: Any, folder: Path) -> tuple[Any, float, float]:
    """Seconds to save the quantised model as the cache does (safetensors) and to load it back
    onto the GPU; returns the reloaded model (it is the one measured for compile, if asked)."""
    import shutil

    import torch

    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    model.to("cpu").save_pretrained(folder, safe_serialization=True)
    write_s = time.perf_counter() - t0
    cls = type(model)
    del model
    torch.cuda.empty_cache()
    t0 = time.perf_counter()
    model = cls.from_pretrained(folder, dtype=torch.bfloat16).to("cuda")
    torch.cuda.synchronize()
    return model, round(write_s, 2), round(time.perf_counter() - t0, 2)


def supported(quant: str) -> str | None:
    """Why this card cannot run ``quant``, or None."""
    import importlib.util

    import torch

    if quant == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        return "fp8 needs compute capability 8.9+"
    if quant == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    if quant in ("int8", "fp8") and importlib.util.find_spec("torchao") is None:
        return "torchao is not installed"
    return None


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    args.workdir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "side": 768,
                           "catalogue_gb": {f: dict(v) for f, v in COMPONENTS_GB.items()}, "rows": {}}
    parts = ([("denoiser", f) for f in DENOISERS] if args.parts in ("all", "denoisers") else []) + \
            ([("text_encoder", n) for n in TEXT_ENCODERS] if args.parts in ("all", "text_encoders") else [])
    for kind, name in parts:
        for quant in args.quants.split(","):
            key = f"{kind}/{name}/{quant}"
            why = supported(quant)
            try:
                out["rows"][key] = {"skipped": why} if why else one(kind, name, quant, args)
            except Exception as exc:  # one broken row must not lose the others' figures
                out["rows"][key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(key, out["rows"][key], file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", choices=("all", "denoisers", "text_encoders"), default="all")
    parser.add_argument("--quants", default="bf16,int8,fp8,nf4")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="also regional compile (flux, sdxl)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/quant_gpu"))
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"{Path(__file__).name}: needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured")
    results = run_all(args)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
