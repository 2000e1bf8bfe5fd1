"""The real device for the residency manager: loads through engine.pipelines, parks in
page-locked RAM, measures CUDA memory, and estimates sizes from weight files."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.config import ModelSpec
from engine.residency.model import LOAD_PHASE, OFFLOADED

if TYPE_CHECKING:
    from engine.pipelines import LoadedPipeline

log = logging.getLogger(__name__)


class TorchOps:
    """``DeviceOps`` for torch: loads through engine.pipelines, moves with ``pipe.to``."""

    def __init__(self, device: Any, *, quant_cache: Path | None = None) -> None:
        self._device = device
        self._quant_cache = quant_cache  # engine/pipelines/quant_cache.py; None: off
        self.can_park = self.keeps_host_copy = getattr(device, "type", None) == "cuda"
        self._host: dict[int, _PinnedCopy] = {}  # id(LoadedPipeline) -> its page-locked RAM copy

    def load(self, spec: ModelSpec, device: Any, dtype: Any) -> LoadedPipeline:
        from engine.pipelines import load_pipeline_blocking

        return load_pipeline_blocking(spec, device, dtype, quant_cache=self._quant_cache)

    def release(self, loaded: LoadedPipeline) -> None:
        from engine.pipelines import release_blocking

        self._host.pop(id(loaded), None)
        release_blocking(loaded)

    def park(self, loaded: LoadedPipeline) -> None:
        """Into page-locked RAM, kept for the next time: measured on an H200 host, parking the
        FLUX transformer (23.8 GB) takes 13.6 s through ``pipe.to("cpu")`` (pageable memory,
        1.8 GB/s) but 0.43 s into buffers pinned once (16.8 s the first time)."""
        if loaded.placement in OFFLOADED:  # an offloaded pipeline already lives in RAM
            return
        import torch

        from engine.pipelines import is_quantised

        if any(is_quantised(m) for m in _modules(loaded.pipe)):
            # a quantised weight is a tensor subclass: a copy into a plain buffer would dequantise
            # it, so it moves as itself (pageable memory, slower, the quantisation kept)
            loaded.pipe.to("cpu")
            return

        copy = self._host.setdefault(id(loaded), _PinnedCopy())
        try:
            moves = [(t, copy.buffer_for(key, t).copy_(t.detach(), non_blocking=True))
                     for key, t in _named_tensors(loaded.pipe)]
            torch.cuda.synchronize(self._device)
        except Exception:  # no pinned memory to be had: the pageable way, slower but sure
            log.warning("%s: pinned RAM copy failed; parking through pageable memory", loaded.spec.id, exc_info=True)
            self._host.pop(id(loaded), None)
            loaded.pipe.to("cpu")
            return
        for tensor, host in moves:
            tensor.data = host  # every copy is complete before any tensor leaves the GPU

    def forget_host_copy(self, loaded: LoadedPipeline) -> None:
        self._host.pop(id(loaded), None)

    def unpark(self, loaded: LoadedPipeline) -> None:
        if loaded.placement in OFFLOADED:
            return
        try:
            loaded.pipe.to(loaded.device)
        except BaseException as exc:
            from engine.pipelines import translate_error

            try:  # never half on the GPU: every component back to RAM, then report
                loaded.pipe.to("cpu")
            except BaseException:
                log.exception("%s: could not move back to RAM after a failed move", loaded.spec.id)
            self.clear_cache()
            raise translate_error(exc, loaded.spec.id, LOAD_PHASE) from exc

    def offload(self, loaded: LoadedPipeline) -> bool:
        if self._device.type != "cuda" or loaded.placement in OFFLOADED:
            return False
        loaded.pipe.enable_model_cpu_offload(device=loaded.device)
        loaded.placement = "model-offload"
        return True

    def free_bytes(self) -> int | None:
        if self._device.type != "cuda":
            return None
        import torch

        free, _total = torch.cuda.mem_get_info(self._device)
        # memory torch has cached but no tensor uses is free to us, though the driver counts it used
        return free + torch.cuda.memory_reserved(self._device) - torch.cuda.memory_allocated(self._device)

    def allocated_bytes(self) -> int | None:
        if self._device.type != "cuda":
            return None
        import torch

        torch.cuda.synchronize(self._device)
        return torch.cuda.memory_allocated(self._device)

    def clear_cache(self) -> None:
        if self._device.type != "cuda":
            return  # nothing is cached off CUDA; release_blocking already collects what it drops
        from engine.pipelines import free_memory_blocking

        free_memory_blocking(self._device)

    def expected_bytes(self, spec: ModelSpec, dtype: Any) -> int | None:
        """From the weight files' headers (nothing is loaded), in the dtype the load will use,
        each component at its configured quantisation."""
        import torch

        size = torch.empty((), dtype=dtype).element_size()
        parts: list[int] = []
        for source in filter(None, (spec.source, spec.text_encoder_source)):
            folder = _local_snapshot(source)
            if folder is None:
                return None
            found = weights_nbytes(folder, size)
            if source == spec.text_encoder_source:  # HiDream's Llama: one folder, text_encoder_4
                found = {"text_encoder_4": sum(found.values())}
            parts += _quantised(spec, found, size).values()
        if self._device.type != "cuda" or spec.offload == "none":
            return sum(parts)
        return 0 if spec.offload == "sequential" else max(parts, default=0)

    def device_bytes(self, loaded: LoadedPipeline, measured: int | None) -> int:
        if loaded.placement == "sequential-offload":
            return 0  # one layer at a time: the reserve covers it
        if loaded.placement == "model-offload":
            return max(_module_nbytes(m) for m in _modules(loaded.pipe)) if _modules(loaded.pipe) else 0
        return measured if measured else loaded.nbytes


class _PinnedCopy:
    """Page-locked host buffers for one pipeline's tensors, packed first-fit into 256 MiB
    arenas: the pinned allocator rounds every allocation up to a power of two, so a buffer per
    tensor (or one for everything) could waste up to half."""

    ARENA = 256 * 2**20
    ALIGN = 512

    def __init__(self) -> None:
        self.views: dict[str, Any] = {}
        self.arenas: list[Any] = []
        self.free: list[int] = []  # bytes left at the end of each arena

    def buffer_for(self, key: str, t: Any) -> Any:
        view = self.views.get(key)
        if view is None or view.shape != t.shape or view.dtype != t.dtype:
            view = self.views[key] = self._carve(t)
        return view

    def _carve(self, t: Any) -> Any:
        import torch

        size = t.numel() * t.element_size()
        padded = -(-size // self.ALIGN) * self.ALIGN
        if padded > self.ARENA:  # a buffer of its own
            self.arenas.append(torch.empty(padded, dtype=torch.uint8, pin_memory=True))
            self.free.append(0)
            raw, offset = self.arenas[-1], 0
        else:
            i = next((i for i, free in enumerate(self.free) if free >= padded), None)
            if i is None:
                self.arenas.append(torch.empty(self.ARENA, dtype=torch.uint8, pin_memory=True))
                self.free.append(self.ARENA)
                i = len(self.arenas) - 1
            raw, offset = self.arenas[i], self.arenas[i].numel() - self.free[i]
            self.free[i] -= padded
        return raw[offset:offset + size].view(t.dtype).view(t.shape)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() for a in self.arenas)


def _named_tensors(pipe: Any) -> list[tuple[str, Any]]:
    out = []
    for name, component in getattr(pipe, "components", {}).items():
        if hasattr(component, "named_parameters"):
            out += [(f"{name}.{k}", t) for k, t in component.named_parameters()]
            out += [(f"{name}.{k}", t) for k, t in component.named_buffers()]
    return out


def _modules(pipe: Any) -> list[Any]:
    import torch

    return [c for c in getattr(pipe, "components", {}).values() if isinstance(c, torch.nn.Module)]


def _module_nbytes(module: Any) -> int:
    from engine.pipelines import module_nbytes

    return module_nbytes(module)


# -- size estimates from weight files --------------------------------------------------------


def _quantised(spec: ModelSpec, parts: dict[str, int], element_size: int) -> dict[str, int]:
    """Each component's estimate at its configured quantisation (engine/placement's byte ratios:
    8-bit ~ half of bf16, nf4 ~ a quarter, plus scales and the layers left unquantised)."""
    from engine.placement import bytes_per_param

    return {name: int(n * min(1.0, bytes_per_param(spec.quant.of(name, spec.family)) / element_size))
            if spec.quant.of(name, spec.family) != "bf16" else n for name, n in parts.items()}

_INT_SIZES = {"I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def weights_nbytes(folder: Path, element_size: int) -> dict[str, int]:
    """Bytes per component once loaded with floats of ``element_size`` bytes, from the
    safetensors headers alone. Variant files (``*.fp16.safetensors``) are skipped: the
    loader reads the plain ones."""
    index = folder / "model_index.json"
    names = ["."]
    if index.is_file():
        names = [k for k, v in json.loads(index.read_text(encoding="utf-8")).items()
                 if isinstance(v, list) and v[0] is not None and (folder / k).is_dir()]
    return {name: sum(_safetensors_nbytes(f, element_size) for f in sorted((folder / name).glob("*.safetensors"))
                      if "." not in f.stem) for name in names}


def _safetensors_nbytes(path: Path, element_size: int) -> int:
    with path.open("rb") as fh:
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    total = 0
    for name, meta in header.items():
        if name != "__metadata__":
            dtype = meta["dtype"]
            total += math.prod(meta["shape"]) * (_INT_SIZES.get(dtype, 4) if dtype in _INT_SIZES else element_size)
    return total


def _local_snapshot(source: str) -> Path | None:
    if os.path.isdir(source):
        return Path(source)
    try:  # a hub id: its downloaded snapshot, never the network
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception:
        return None
