"""One-shot CUDA check: the engine's GPU paths on tiny twins, OOM recovery, and full-size
random-weight denoiser latency. Not a test (CI has no GPU); figures go to docs/PERFORMANCE.md.

    python bench/gpu_check.py [--out DIR]

Sections, each independent (a failure is printed and the next runs):
  A. Engine on CUDA, tiny profile: device, dtype, TF32 flags, each family at 768x768.
  B. Offload modes on CUDA: model offload and sequential offload (HiDream's default).
  C. Out of memory: a load that cannot fit becomes a readable OutOfMemoryError, memory is
     handed back, and the next job runs.
  D. Full-size denoisers with random weights (FLUX.1-dev, SD3 Medium, SDXL UNet, HiDream-I1):
     seconds per denoising step at 768x768 in bf16, and parameter memory.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS: dict[str, Any] = {}


def section(name: str):
    def wrap(fn):
        def run(*args: Any) -> None:
            print(f"\n== {name}", flush=True)
            started = time.perf_counter()
            try:
                RESULTS[name] = fn(*args)
            except Exception:
                traceback.print_exc()
                RESULTS[name] = {"error": traceback.format_exc(limit=3)}
            print(json.dumps(RESULTS[name], indent=1, default=str), f"({time.perf_counter() - started:.1f} s)", flush=True)
        return run
    return wrap


def tiny_config(**model_overrides: dict[str, Any]):
    from engine.config import load_config, with_tiny_models
    from engine.tiny import ensure_tiny_models

    config = load_config(REPO / "config.toml", env={})
    config = with_tiny_models(config, ensure_tiny_models(Path(tempfile.gettempdir()) / "pp-gpu-tiny"))
    models = {mid: m.model_copy(update={**model_overrides.get(mid, {})}) for mid, m in config.models.items()}
    return config.model_copy(update={"models": models, "device": "auto"})


async def run_jobs(config, requests) -> list[Any]:
    from engine import Engine

    out = []
    async with Engine(config) as engine:
        for request in requests:
            handle = await engine.submit(request)
            events = [e async for e in handle.events()]
            out.append((events[-1], [dataclasses.asdict(r) for r in engine.resident_models()]))
    return out


@section("A. engine on CUDA, tiny profile")
def check_engine() -> dict[str, Any]:
    import torch

    from engine import JobFinished, JobRequest

    config = tiny_config(logo_sdxl={"offload": "none"})
    requests = [JobRequest("a lighthouse at dusk", model=m, seed=7) for m in config.models]
    requests += [JobRequest("a lighthouse at dusk", model="flux_dev", seed=7)]  # same seed again
    results = asyncio.run(run_jobs(config, requests))
    rows = {}
    for request, (last, resident) in zip(requests, results, strict=True):
        ok = isinstance(last, JobFinished)
        rows.setdefault(request.model, []).append({
            "ok": ok, "size": (last.result.width, last.result.height) if ok else None,
            "timings": dataclasses.asdict(last.result.timings) if ok else repr(last),
            "sha": __import__("hashlib").sha256(last.result.png).hexdigest()[:16] if ok else None,
            "resident": [(r["model_id"], r["placement"]) for r in resident],
        })
    return {
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "same_seed_same_bytes": rows["flux_dev"][0]["sha"] == rows["flux_dev"][1]["sha"],
        "jobs": rows,
    }


@section("B. offload modes on CUDA")
def check_offload() -> dict[str, Any]:
    from engine import JobFinished, JobRequest

    config = tiny_config(flux_dev={"offload": "model"}, logo_sdxl={"offload": "sequential"})
    requests = [JobRequest("a logo that says PP", model="flux_dev", seed=1, steps=8),
                JobRequest("a logo that says PP", model="logo_sdxl", seed=1, steps=8)]
    out = {}
    for request, (last, resident) in zip(requests, asyncio.run(run_jobs(config, requests)), strict=True):
        out[request.model] = {"ok": isinstance(last, JobFinished), "last": type(last).__name__,
                              "message": getattr(last, "message", ""),
                              "placement": [(r["model_id"], r["placement"]) for r in resident]}
    return out


@section("C. out of memory while loading")
def check_oom() -> dict[str, Any]:
    import torch

    from engine import Engine, JobRequest

    config = tiny_config()

    async def scenario() -> dict[str, Any]:
        async with Engine(config) as engine:
            ok1 = await (await engine.submit(JobRequest("warm", model="flux_dev", steps=2))).result()
            before = torch.cuda.memory_allocated()
            torch.cuda.set_per_process_memory_fraction(before / torch.cuda.get_device_properties(0).total_memory + 1e-6)
            handle = await engine.submit(JobRequest("too big", model="sd3_medium", steps=2))
            events = [e async for e in handle.events()]
            after_fail = torch.cuda.memory_allocated()
            torch.cuda.set_per_process_memory_fraction(1.0)
            ok2 = await (await engine.submit(JobRequest("again", model="sd3_medium", steps=2))).result()
            return {"first_ok": bool(ok1.png), "failed_event": repr(events[-1]),
                    "allocated_before": before, "allocated_after_failure": after_fail,
                    "resident_after_failure_and_retry": [r.model_id for r in engine.resident_models()],
                    "next_job_ok": bool(ok2.png)}

    return asyncio.run(scenario())


def time_forward(model: Any, inputs: dict[str, Any], runs: int = 5) -> float:
    import torch

    with torch.inference_mode():
        for _ in range(2):
            model(**inputs)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(runs):
            model(**inputs)
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / runs


def build(cls: Any, **config: Any) -> Any:
    import torch

    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            return cls(**config).eval()
    finally:
        torch.set_default_dtype(torch.float32)


def param_gb(model: Any) -> float:
    return round(sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9, 2)


@section("D. full-size denoisers, random weights, 768x768 bf16")
def check_full_size() -> dict[str, Any]:
    import torch
    from diffusers import FluxTransformer2DModel, HiDreamImageTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    bf = dict(device="cuda", dtype=torch.bfloat16)
    out: dict[str, Any] = {}
    latent = 768 // 8  # 96

    def measure(name: str, make, inputs_fn) -> None:
        try:
            model = make()
            out[name] = {"params_gb": param_gb(model), "s_per_step": round(time_forward(model, inputs_fn()), 4),
                         "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1)}
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        finally:
            model = None
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    tokens = (latent // 2) ** 2
    measure("flux_dev (1 pass/step, distilled guidance)", lambda: build(
        FluxTransformer2DModel, patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56)), lambda: dict(
        hidden_states=torch.randn(1, tokens, 64, **bf), encoder_hidden_states=torch.randn(1, 512, 4096, **bf),
        pooled_projections=torch.randn(1, 768, **bf), timestep=torch.tensor([0.5], **bf),
        img_ids=torch.zeros(tokens, 3, **bf), txt_ids=torch.zeros(512, 3, **bf), guidance=torch.tensor([4.5], **bf)))
    measure("sd3_medium (CFG: batch 2)", lambda: build(
        SD3Transformer2DModel, sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        out_channels=16, pos_embed_max_size=192), lambda: dict(
        hidden_states=torch.randn(2, 16, latent, latent, **bf), encoder_hidden_states=torch.randn(2, 333, 4096, **bf),
        pooled_projections=torch.randn(2, 2048, **bf), timestep=torch.tensor([500.0, 500.0], **bf)))
    measure("realvis_xl UNet (CFG: batch 2)", lambda: build(
        UNet2DConditionModel, sample_size=128, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(320, 640, 1280),
        layers_per_block=2, cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816), lambda: dict(
        sample=torch.randn(2, 4, latent, latent, **bf), timestep=torch.tensor([500.0, 500.0], **bf),
        encoder_hidden_states=torch.randn(2, 77, 2048, **bf),
        added_cond_kwargs={"text_embeds": torch.randn(2, 1280, **bf), "time_ids": torch.randn(2, 6, **bf)}))
    measure("logo_sdxl = HiDream-I1 Full transformer (CFG: batch 2)", lambda: build(
        HiDreamImageTransformer2DModel, patch_size=2, in_channels=16, out_channels=16, num_layers=16,
        num_single_layers=32, attention_head_dim=128, num_attention_heads=20, caption_channels=[4096, 4096],
        text_emb_dim=2048, num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(64, 32, 32),
        max_resolution=(128, 128), llama_layers=list(range(48))[:48]), lambda: dict(
        hidden_states=torch.randn(2, 16, latent, latent, **bf), timesteps=torch.tensor([500.0, 500.0], **bf),
        encoder_hidden_states_t5=torch.randn(2, 128, 4096, **bf),
        encoder_hidden_states_llama3=torch.randn(48, 2, 128, 4096, **bf), pooled_embeds=torch.randn(2, 2048, **bf)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--skip", default="", help="letters of sections to skip, e.g. 'D'")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"{Path(__file__).name}: needs a CUDA GPU (torch.cuda.is_available() is False); nothing checked")
    for letter, fn in (("A", check_engine), ("B", check_offload), ("C", check_oom), ("D", check_full_size)):
        if letter not in args.skip:
            fn()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1, default=str))


if __name__ == "__main__":
    main()
