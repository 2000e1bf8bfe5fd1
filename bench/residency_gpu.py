"""One-shot CUDA check of the residency manager, and the copy and load speeds its cost model uses.
Not a test (CI has no GPU); figures go to docs/PERFORMANCE.md.

    python bench/residency_gpu.py [--out DIR] [--skip LETTERS]

Sections, each independent (a failure is printed and the next runs):
  A. RAM <-> GPU: parking and bringing back full-size random-weight denoisers (FLUX.1-dev
     transformer, SDXL UNet) with ``module.to`` - what the RAM tier costs per swap.
  B. Disk -> GPU: ``from_pretrained`` of the same modules saved as safetensors, cold (page cache
     dropped, where the kernel allows) and warm.
  D. The same copies through page-locked host buffers.
  E. TorchOps.park / unpark (the RAM tier's own code) on the full-size FLUX transformer:
     first parking (pins), later ones (reuse), weights unchanged after the round trips.
  C. The real ResidencyManager on CUDA with the tiny twins: measured allocation against
     parameter bytes, a budget that holds two of three, eviction into the RAM tier and back
     (same seed, same bytes), a move back that runs out of memory (nothing left half on the
     GPU, the model still whole in RAM), and out of memory while generating (recovery by phase).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS: dict[str, Any] = {}
GB = 1e9


def section(name: str):
    def wrap(fn):
        def run(*args: Any) -> None:
            print(f"\n== {name}", flush=True)
            started = time.perf_counter()
            try:
                RESULTS[name] = fn(*args)
            except Exception:
                traceback.print_exc()
                RESULTS[name] = {"error": traceback.format_exc(limit=4)}
            print(json.dumps(RESULTS[name], indent=1, default=str), f"({time.perf_counter() - started:.1f} s)", flush=True)
        return run
    return wrap


def timed(fn) -> float:
    import torch

    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def build_on_gpu(cls: Any, **config: Any) -> Any:
    import torch

    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            return cls(**config).eval()
    finally:
        torch.set_default_dtype(torch.float32)


def flux_transformer() -> Any:
    from diffusers import FluxTransformer2DModel

    return build_on_gpu(FluxTransformer2DModel, patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                        pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def sdxl_unet() -> Any:
    from diffusers import UNet2DConditionModel

    return build_on_gpu(UNet2DConditionModel, sample_size=128, in_channels=4, out_channels=4,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                        block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                        projection_class_embeddings_input_dim=2816)


def nbytes(module: Any) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@section("A. RAM <-> GPU copies (park / bring back), full-size bf16")
def check_copies() -> dict[str, Any]:
    import torch

    out = {}
    for name, make in (("sdxl_unet", sdxl_unet), ("flux_transformer", flux_transformer)):
        module = make()
        size = nbytes(module)
        rows = []
        for _ in range(2):
            park = timed(lambda: module.to("cpu"))
            back = timed(lambda: module.to("cuda"))
            rows.append((park, back))
        park, back = min(r[0] for r in rows), min(r[1] for r in rows)
        out[name] = {"gb": round(size / GB, 2), "park_s": round(park, 2), "back_s": round(back, 2),
                     "park_gbps": round(size / GB / park, 1), "back_gbps": round(size / GB / back, 1)}
        del module
        torch.cuda.empty_cache()
    return out


@section("B. disk -> GPU (from_pretrained, safetensors)")
def check_disk(workdir: Path) -> dict[str, Any]:
    import torch
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    out: dict[str, Any] = {}
    for name, make, cls in (("sdxl_unet", sdxl_unet, UNet2DConditionModel),
                            ("flux_transformer", flux_transformer, FluxTransformer2DModel)):
        folder = workdir / name
        module = make()
        size = nbytes(module)
        started = time.perf_counter()
        module.save_pretrained(folder)
        save_s = time.perf_counter() - started
        del module
        torch.cuda.empty_cache()
        dropped = drop_page_cache()
        cold = timed(lambda: cls.from_pretrained(folder, dtype=torch.bfloat16).to("cuda"))
        torch.cuda.empty_cache()
        warm = timed(lambda: cls.from_pretrained(folder, dtype=torch.bfloat16).to("cuda"))
        torch.cuda.empty_cache()
        out[name] = {"gb": round(size / GB, 2), "save_s": round(save_s, 1), "page_cache_dropped": dropped,
                     "cold_s": round(cold, 2), "warm_s": round(warm, 2), "cold_gbps": round(size / GB / cold, 2)}
        subprocess.run(["rm", "-rf", str(folder)], check=False)
    return out


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except Exception:
        return False


@section("C. ResidencyManager on CUDA, tiny twins")
def check_manager(workdir: Path) -> dict[str, Any]:
    import torch

    from engine.config import ResidencySettings, load_config, with_tiny_models
    from engine.errors import OutOfMemoryError
    from engine.jobs import GenerationParams
    from engine.pipelines import configure_torch_blocking, generate_blocking
    from engine.residency import GiB, ResidencyManager
    from engine.tiny import ensure_tiny_models

    config = with_tiny_models(load_config(REPO / "config.toml", env={}), ensure_tiny_models(workdir / "tiny"))
    device = torch.device("cuda")
    configure_torch_blocking(device)
    out: dict[str, Any] = {}
    logs = _capture_logs("engine.residency")

    def make(**settings: Any) -> ResidencyManager:
        return ResidencyManager(device, torch.bfloat16, settings=ResidencySettings(**settings))

    def render(rm: ResidencyManager, model_id: str, size: int = 256) -> str:
        spec = config.model(model_id)
        rm.acquire_blocking(spec)
        params = GenerationParams("a lighthouse at dusk", "", model_id, 4, 4.5, size, size, 7)
        image = rm.run_with_recovery_blocking(spec, lambda loaded, tiled: generate_blocking(
            loaded, params, on_step=lambda i, n: None, cancel=threading.Event(), tiled_decode=tiled))
        return hashlib.sha256(image.tobytes()).hexdigest()[:16]

    # 1. measured sizes against parameter bytes
    probe = make()
    sizes = {}
    for mid in ("flux_dev", "realvis_xl", "sd3_medium"):
        before = torch.cuda.memory_allocated()
        loaded, load_s = probe.acquire_blocking(config.model(mid))
        row = next(r for r in probe.snapshot() if r.model_id == mid)
        sizes[mid] = row.device_bytes
        out[f"size_{mid}"] = {"param_bytes": loaded.nbytes, "measured_bytes": row.device_bytes,
                              "allocated_delta": torch.cuda.memory_allocated() - before, "load_s": round(load_s, 3)}
    probe.unload_all_blocking()
    out["allocated_after_unload_all"] = torch.cuda.memory_allocated()

    # 2. a budget that holds flux + realvis but not sd3 too; evicted into the RAM tier and back
    budget_gb = (sizes["flux_dev"] + sizes["realvis_xl"]) * 1.02 / GiB
    rm = make(gpu_budget_gb=budget_gb, cpu_ram_gb=4)
    first = render(rm, "flux_dev")
    render(rm, "realvis_xl")
    both = {r.model_id: r.where for r in rm.snapshot()}
    allocated_with_two = torch.cuda.memory_allocated()
    render(rm, "sd3_medium")
    after_sd3 = {r.model_id: r.where for r in rm.snapshot()}
    started = time.perf_counter()
    rm.acquire_blocking(config.model("flux_dev"))
    back_s = time.perf_counter() - started
    again = render(rm, "flux_dev")
    out["budget"] = {"budget_gb": budget_gb, "with_two": both, "after_sd3": after_sd3,
                     "allocated_with_two": allocated_with_two, "flux_back_from_ram_s": round(back_s, 3),
                     "same_bytes_after_ram_round_trip": first == again,
                     "status": dataclasses.asdict(rm.status())}

    # 3. moving back from RAM runs out of memory: nothing half on the GPU, the model still parked
    rm.unload_all_blocking()
    rm = make(cpu_ram_gb=4)
    rm.acquire_blocking(config.model("sd3_medium"))
    rm.free_others_blocking(keep="none")  # sd3 parks
    torch.cuda.empty_cache()
    held = torch.cuda.memory_allocated()
    torch.cuda.set_per_process_memory_fraction(torch.cuda.memory_reserved() / torch.cuda.get_device_properties(0).total_memory)
    try:
        rm.acquire_blocking(config.model("sd3_medium"))
        oom = "no error"
    except OutOfMemoryError as exc:
        oom = exc.user_message
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    out["oom_moving_back"] = {"error": oom, "allocated_before": held, "allocated_after": torch.cuda.memory_allocated(),
                              "where_after": {r.model_id: r.where for r in rm.snapshot()},
                              "next_acquire_ok": bool(rm.acquire_blocking(config.model("sd3_medium")))}

    # 4. out of memory while generating: recovery by phase (the log says which remedy ran)
    rm.unload_all_blocking()
    rm = make(cpu_ram_gb=4)
    render(rm, "sd3_medium", 64)
    render(rm, "flux_dev", 64)
    held = torch.cuda.memory_allocated()
    torch.cuda.set_per_process_memory_fraction((held + 4 * 2**20) / torch.cuda.get_device_properties(0).total_memory)
    logs.clear()
    try:
        result = render(rm, "flux_dev", 768)
    except OutOfMemoryError as exc:
        result = f"OutOfMemoryError: {exc.user_message}"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    out["oom_generating"] = {"result": result, "log": list(logs),
                             "where_after": {r.model_id: r.where for r in rm.snapshot()}}
    rm.unload_all_blocking()
    out["allocated_at_end"] = torch.cuda.memory_allocated()
    return out


@section("D. RAM <-> GPU through pinned host memory, full-size bf16")
def check_pinned() -> dict[str, Any]:
    import torch

    out = {}
    for name, make in (("sdxl_unet", sdxl_unet), ("flux_transformer", flux_transformer)):
        module = make()
        tensors = [*module.parameters(), *module.buffers()]
        size = nbytes(module)
        hosts: list[Any] = []
        alloc = timed(lambda: hosts.extend(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors))
        d2h = timed(lambda: [h.copy_(t.data, non_blocking=True) for h, t in zip(hosts, tensors)])
        gpu = [t.data for t in tensors]
        for t, h in zip(tensors, hosts):
            t.data = h
        del gpu
        torch.cuda.empty_cache()
        h2d = timed(lambda: module.to("cuda", non_blocking=True))
        again = timed(lambda: [h.copy_(t.data, non_blocking=True) for h, t in zip(hosts, tensors)])
        out[name] = {"gb": round(size / GB, 2), "pin_alloc_s": round(alloc, 2), "park_s": round(d2h, 2),
                     "park_again_s": round(again, 2), "back_s": round(h2d, 2),
                     "park_gbps": round(size / GB / d2h, 1), "back_gbps": round(size / GB / h2d, 1)}
        del module, hosts, tensors
        torch.cuda.empty_cache()
    return out


class _Pipe:
    """Just enough of a pipeline for TorchOps: named components and ``to``."""

    def __init__(self, **components: Any) -> None:
        self.components = components

    def to(self, device: Any) -> _Pipe:
        for module in self.components.values():
            module.to(device)
        return self


@section("E. TorchOps.park / unpark (pinned arenas), full-size FLUX transformer")
def check_torch_ops() -> dict[str, Any]:
    import torch

    from engine.config import load_config
    from engine.pipelines import LoadedPipeline
    from engine.residency import TorchOps

    module = flux_transformer()
    size = nbytes(module)
    spec = load_config(REPO / "config.toml", env={}).model("flux_dev")
    loaded = LoadedPipeline(spec, _Pipe(transformer=module), torch.device("cuda"), torch.bfloat16, "gpu", size, 0.0)
    ops = TorchOps(torch.device("cuda"))

    def fingerprint() -> list[float]:
        return [float(p.detach().float().sum()) for p in list(module.parameters())[::40]]

    before, allocated = fingerprint(), torch.cuda.memory_allocated()
    rows = {"gb": round(size / GB, 2)}
    for n in (1, 2, 3):
        rows[f"park_{n}_s"] = round(timed(lambda: ops.park(loaded)), 2)
        torch.cuda.empty_cache()
        rows[f"allocated_parked_{n}_gb"] = round(torch.cuda.memory_allocated() / GB, 2)
        rows[f"back_{n}_s"] = round(timed(lambda: ops.unpark(loaded)), 2)
    copy = ops._host[id(loaded)]
    rows.update(allocated_before_gb=round(allocated / GB, 2), pinned_gb=round(sum(a.numel() for a in copy.arenas) / GB, 2),
                arenas=len(copy.arenas), same_weights_after_round_trips=fingerprint() == before,
                device_after=str(next(module.parameters()).device))
    ops.release(loaded)
    return rows


def _capture_logs(name: str) -> list[str]:
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"{record.levelname} {record.getMessage()}")

    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.addHandler(Keep())
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--skip", default="", help="letters of sections to skip, e.g. 'B'")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = Path(tempfile.mkdtemp(prefix="pp-residency-"))
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"{Path(__file__).name}: needs a CUDA GPU (torch.cuda.is_available() is False); nothing checked")
    RESULTS["device"] = {"name": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for letter, fn, extra in (("C", check_manager, (workdir,)), ("E", check_torch_ops, ()), ("D", check_pinned, ()),
                              ("A", check_copies, ()), ("B", check_disk, (workdir,))):
        if letter not in args.skip:
            fn(*extra)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "residency_gpu.json").write_text(json.dumps(RESULTS, indent=1, default=str))


if __name__ == "__main__":
    main()
