"""One-shot CUDA check of the safety loop's prevention, and the detectors' cost on the GPU host.

    python bench/safety_gpu_check.py

  A. float16 VAE overflow on CUDA, tiny SDXL and FLUX twins whose VAE is scaled past float16's
     range: black without the decode guard, a picture with it; bfloat16 needs no guard.
  B. The per-step latent NaN check on CUDA (one reduction and a sync), FLUX-sized latents.
  C. NudeNet per image on the host CPU (the session as the policy builds it, and 16 threads).
Not a test (CI has no GPU); figures go to docs/SAFETY.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_config() -> Any:
    from engine.config import load_config, with_tiny_models
    from engine.tiny import ensure_tiny_models

    config = load_config(REPO / "config.toml", env={})
    config = config.model_copy(update={"device": "cuda",
        "limits": config.limits.model_copy(update={"min_image_side": 64})})
    return with_tiny_models(config, ensure_tiny_models(Path(tempfile.gettempdir()) / "promptpics-safety-tiny"))


def overflow(config: Any) -> None:
    import torch

    from engine.jobs import GenerationParams
    from engine.pipelines import generate_blocking, load_pipeline_blocking
    from engine.safety import BlackImageDetector, NonFiniteError, guard_vae_decode_blocking

    black = BlackImageDetector()
    for model_id in ("realvis_xl", "flux_dev"):
        spec = config.model(model_id)
        for dtype, guard in ((torch.float16, False), (torch.float16, True), (torch.bfloat16, False)):
            loaded = load_pipeline_blocking(spec, torch.device("cuda"), dtype)
            vae = loaded.pipe.vae
            vae.register_to_config(force_upcast=False)
            with torch.no_grad():
                vae.decoder.conv_in.weight.mul_(2e4)
            if guard:
                guard_vae_decode_blocking(loaded.pipe, model_id, dtype)
            params = GenerationParams("a red fox", "", model_id, 4, 4.0, 512, 512, 1)
            try:
                image = generate_blocking(loaded, params, on_step=lambda i, n: None, cancel=threading.Event())
                verdict = black.check_blocking(image)
                seen = f"black={verdict.flagged} ({verdict.detail})"
            except NonFiniteError as exc:
                seen = f"NonFiniteError: {exc.where}"
            print(f"A  {model_id:10s} {str(dtype):15s} guard={guard!s:5s} vae={vae.dtype}  {seen}", flush=True)
            del loaded
            torch.cuda.empty_cache()


def latent_check() -> None:
    import torch

    from engine.safety import check_latents_blocking

    latents = torch.randn(1, 4096, 64, device="cuda", dtype=torch.bfloat16)
    for _ in range(10):
        check_latents_blocking(latents, "flux_dev", 1)
    times = []
    for _ in range(200):
        torch.cuda.synchronize()
        started = time.perf_counter()
        check_latents_blocking(latents, "flux_dev", 1)
        times.append(time.perf_counter() - started)
    print(f"B  latent NaN check on CUDA (1x4096x64 bf16): median {statistics.median(times) * 1e6:.0f} us", flush=True)


def nudenet_cpu() -> None:
    import numpy as np
    from PIL import Image

    from engine.config import SafetyConfig
    from engine.safety import NudeNetDetector
    from engine.safety.detectors import _shared_nudenet

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (768, 768, 3), np.uint8))
    for threads in (4, 16):
        detector = NudeNetDetector(SafetyConfig().nudenet_thresholds,
                                   loader=functools.partial(_shared_nudenet, threads))
        detector.check_blocking(image)
        times = []
        for _ in range(30):
            started = time.perf_counter()
            detector.check_blocking(image)
            times.append(time.perf_counter() - started)
        print(f"C  NudeNet 768x768 on {os.cpu_count()} CPUs, {threads} threads: median "
              f"{statistics.median(times) * 1000:.1f} ms", flush=True)


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"{Path(__file__).name}: needs a CUDA GPU (torch.cuda.is_available() is False); nothing checked")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}", flush=True)
    for step in (lambda: overflow(tiny_config()), latent_check, nudenet_cpu):
        try:
            step()
        except Exception:
            traceback.print_exc()


if __name__ == "__main__":
    main()
