"""What a loaded pipeline really holds: bytes of its parameters and buffers, quantised ones
included (a torchao weight is a tensor subclass whose ``dtype`` is the float it stands for,
so ``numel() * element_size()`` would count an int8 weight at float size)."""

from __future__ import annotations

from typing import Any


def tensor_nbytes(t: Any) -> int:
    """Bytes behind ``t``: a wrapper subclass (torchao's ``Int8Tensor``, ``Float8Tensor``, ...) is
    the sum of the inner tensors it flattens to (``qdata``, ``scale``, ...)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _meta = t.__tensor_flatten__()
        return sum(tensor_nbytes(getattr(t, name)) for name in names)
    return int(t.numel() * t.element_size())


def module_nbytes(module: Any) -> int:
    return sum(tensor_nbytes(t) for t in (*module.parameters(), *module.buffers()))


def pipeline_nbytes(pipe: Any) -> int:
    """Bytes of every parameter and buffer of every torch module in the pipeline."""
    import torch

    return sum(module_nbytes(c) for c in pipe.components.values() if isinstance(c, torch.nn.Module))


def is_quantised(module: Any) -> bool:
    """Whether any weight of ``module`` is a quantised tensor subclass (it cannot be copied into a
    plain pinned buffer: the copy would be dequantised)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return any(is_traceable_wrapper_subclass(t) for t in module.parameters()) or \
        getattr(module, "is_loaded_in_4bit", False) or getattr(module, "is_quantized", False)
