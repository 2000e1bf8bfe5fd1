"""Benchmark: what one live preview costs, next to what one denoising step costs.

    python bench/previews.py [--device cpu|cuda] [--sizes 768 1024] [--repeats 40] [--tiny-steps 12]
                             [--real-step] [--threads N]

1. Per family and image size: the whole preview path on latents of the production shape and
   dtype (the denoised estimate, FLUX's 2x2 unpacking, the projection, the device-to-host copy,
   the resize to <= 256 px and the JPEG encode), median and p90 over ``--repeats``.
2. The tiny twins: seconds per denoising step at each size (production pipelines, random tiny
   weights), and the same run with a preview at every step: the share a preview adds.
3. ``--real-step`` (CUDA only): one denoising forward of a full-size FLUX.1 transformer and a
   full-size SDXL UNet with random weights (same shapes and FLOPs as the real models; weights
   do not change the time) at each size, in the CUDA dtype: the step a preview is compared to.

Prints Markdown tables for docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = {"flux": "flux_dev", "sdxl": "realvis_xl", "sd3": "sd3_medium", "hidream": "logo_sdxl"}


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latents_for(family: str, size: int, device: Any, dtype: Any) -> Any:
    """Random latents in the shape the step callback sees for a ``size`` x ``size`` image."""
    import torch

    grid = size // 8
    if family == "flux":
        return torch.randn(1, (grid // 2) ** 2, 64, device=device, dtype=dtype)  # packed 2x2
    channels = 4 if family == "sdxl" else 16
    return torch.randn(1, channels, grid, grid, device=device, dtype=dtype)


def preview_cost(family: str, size: int, device: Any, dtype: Any, repeats: int) -> tuple[float, float, int]:
    """(median ms, p90 ms, bytes) of one preview, the full path."""
    from engine.pipelines.previews import LATENT_FORMATS, LatentPreviewer, PreviewSettings

    fmt = LATENT_FORMATS[family]
    previewer = LatentPreviewer(family, PreviewSettings(), lambda p: None, width=size, height=size, vae_scale_factor=8,
                                vae_scaling=fmt.scale, vae_shift=fmt.shift)
    previous, latents = latents_for(family, size, device, dtype), latents_for(family, size, device, dtype)
    data = previewer.render_blocking(latents, previous, 0.55, 0.5)  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        data = previewer.render_blocking(latents, previous, 0.55, 0.5)  # ends with a host copy: synchronous
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.9 * (len(times) - 1))], len(data)


def tiny_steps(config: Any, family: str, size: int, steps: int, device: Any, dtype: Any) -> tuple[float, float]:
    """(s per step without previews, s per step with a preview at every step), medians of 3 runs."""
    from engine.jobs import GenerationParams
    from engine.pipelines import generate_blocking, load_pipeline_blocking, release_blocking
    from engine.pipelines.previews import PreviewSettings

    loaded = load_pipeline_blocking(config.model(MODELS[family]), device, dtype)
    params = GenerationParams("a lighthouse at dusk", "", MODELS[family], steps, 4.0, size, size, 1)
    every = PreviewSettings(every_steps=1, min_interval_s=0.0)

    def per_step(preview: bool) -> float:
        stamps: list[float] = []

        def on_step(step: int, total: int) -> None:
            sync(device)
            stamps.append(time.perf_counter())

        generate_blocking(loaded, params, on_step=on_step, cancel=threading.Event(),
                          on_preview=(lambda p: None) if preview else None, previews=every if preview else None)
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        return statistics.median(gaps)

    per_step(False)  # warm-up
    plain = statistics.median(per_step(False) for _ in range(3))
    with_preview = statistics.median(per_step(True) for _ in range(3))
    release_blocking(loaded)
    return plain, with_preview


def real_step_s(family: str, size: int, device: Any, dtype: Any) -> float:
    """One denoising forward of the full-size network with random weights (CUDA)."""
    import torch

    grid = size // 8
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the CUDA dtype: no float32 copy of 12B parameters first
    with torch.device(device):
        if family == "flux":
            from diffusers import FluxTransformer2DModel

            model = FluxTransformer2DModel(guidance_embeds=True).eval()  # FLUX.1-dev's dimensions
            seq = (grid // 2) ** 2
            inputs = dict(hidden_states=torch.randn(1, seq, 64, dtype=dtype),
                          encoder_hidden_states=torch.randn(1, 512, 4096, dtype=dtype),
                          pooled_projections=torch.randn(1, 768, dtype=dtype), timestep=torch.tensor([0.5]),
                          img_ids=torch.zeros(seq, 3), txt_ids=torch.zeros(512, 3), guidance=torch.tensor([4.5]),
                          return_dict=False)
        else:
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel(  # stable-diffusion-xl-base-1.0's unet/config.json
                sample_size=128, cross_attention_dim=2048, addition_embed_type="text_time",
                addition_embed_type_num_heads=64, addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                attention_head_dim=(5, 10, 20), block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), use_linear_projection=True).eval()
            inputs = dict(sample=torch.randn(2, 4, grid, grid, dtype=dtype), timestep=torch.tensor(500),  # CFG batch
                          encoder_hidden_states=torch.randn(2, 77, 2048, dtype=dtype),
                          added_cond_kwargs={"text_embeds": torch.randn(2, 1280, dtype=dtype),
                                             "time_ids": torch.randn(2, 6, dtype=dtype)},
                          return_dict=False)
    torch.set_default_dtype(default_dtype)
    times = []
    with torch.inference_mode():
        for _ in range(4):
            sync(device)
            started = time.perf_counter()
            model(**inputs)
            sync(device)
            times.append(time.perf_counter() - started)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[768, 1024])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--tiny-steps", type=int, default=12, help="0 skips the tiny-twin comparison")
    parser.add_argument("--real-step", action="store_true", help="time full-size FLUX and SDXL steps (CUDA)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from engine.config import load_config, with_tiny_models
    from engine.pipelines import configure_torch_blocking, resolve_device_blocking, resolve_dtype
    from engine.tiny import ensure_tiny_models

    device = resolve_device_blocking(args.device)
    configure_torch_blocking(device)
    dtype = resolve_dtype(device, "bfloat16")
    print(f"{platform.node()}: {platform.machine()}, {os.cpu_count()} CPU cores ({torch.get_num_threads()} torch threads), "
          f"torch {torch.__version__}, "
          f"device {device}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, "
          f"dtype {dtype}, {time.strftime('%Y-%m-%d')}\n")

    print("| family | image | latents in the callback | preview ms (median) | p90 ms | JPEG bytes |")
    print("|---|---|---|---|---|---|")
    costs: dict[tuple[str, int], float] = {}
    for family in MODELS:
        for size in args.sizes:
            median, p90, nbytes = preview_cost(family, size, device, dtype, args.repeats)
            costs[family, size] = median
            shape = tuple(latents_for(family, size, "cpu", torch.float32).shape)
            print(f"| {family} | {size}x{size} | {shape} {str(dtype).replace('torch.', '')} | {median:.2f} | {p90:.2f} "
                  f"| {nbytes} |")

    if args.tiny_steps:
        config = load_config(REPO / "config.toml", env={})
        config = config.model_copy(update={"device": str(device)})
        config = with_tiny_models(config, ensure_tiny_models(Path(tempfile.gettempdir()) / "promptpics-bench-tiny"))
        print(f"\nTiny twins, {args.tiny_steps} steps, a preview at every step (the default is every 4 steps and 2 s):\n")
        print("| family | image | s per step | s per step with previews | a preview is this share of a tiny step |")
        print("|---|---|---|---|---|")
        for family in MODELS:
            for size in args.sizes:
                plain, with_preview = tiny_steps(config, family, size, args.tiny_steps, device, dtype)
                share = costs[family, size] / 1000 / plain
                print(f"| {family} | {size}x{size} | {plain:.3f} | {with_preview:.3f} | {share:.1%} |")

    if args.real_step:
        print("\nFull-size networks, random weights, one denoising forward (SDXL: batch 2 for CFG):\n")
        print("| network | image | s per step | a preview is this share |")
        print("|---|---|---|---|")
        for family in ("flux", "sdxl"):
            for size in args.sizes:
                step = real_step_s(family, size, device, dtype)
                print(f"| {family} | {size}x{size} | {step:.3f} | {costs[family, size] / 1000 / step:.2%} |")


if __name__ == "__main__":
    main()
