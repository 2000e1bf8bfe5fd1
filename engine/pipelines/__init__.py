"""The diffusers side: load a model family, run one generation, show its latents.

    loaders.py    one loader per family, placement on the device, LoadedPipeline, device/dtype
    run.py        generate_blocking: the step callback (progress, previews, NaN check), cancel
    quantise.py   [models.<id>.quant] -> diffusers/transformers quantisation configs; regional compile
    quant_cache.py  int8/fp8 parts saved once under <data_dir>/quantised, read back at later loads
    sizes.py      bytes a loaded pipeline holds (quantised tensor subclasses counted by their parts)
    errors.py     foreign errors -> the engine's (out of memory, a broken or missing model)
    previews.py   latent -> small RGB previews from the step callback, without the VAE
    preview_gate.py  [previews] policy: which previews may leave the GPU thread (checked first)
"""

from engine.pipelines.errors import is_out_of_memory, translate_error
from engine.pipelines.loaders import (
    LoadedPipeline,
    configure_torch_blocking,
    free_memory_blocking,
    load_pipeline_blocking,
    release_blocking,
    resolve_device_blocking,
    resolve_dtype,
)
from engine.pipelines.quantise import quantised_parts
from engine.pipelines.sizes import is_quantised, module_nbytes, pipeline_nbytes, tensor_nbytes
from engine.pipelines.previews import LatentPreviewer, Preview
from engine.pipelines.run import PreviewCallback, StepCallback, generate_blocking
from engine.pipelines.preview_gate import CheckedPreviews, PreviewCheck, preview_callback

__all__ = [
    "CheckedPreviews", "LatentPreviewer", "LoadedPipeline", "Preview", "PreviewCallback", "PreviewCheck",
    "StepCallback", "preview_callback",
    "configure_torch_blocking", "free_memory_blocking", "generate_blocking", "is_out_of_memory",
    "is_quantised", "module_nbytes", "quantised_parts", "tensor_nbytes",
    "load_pipeline_blocking", "pipeline_nbytes", "release_blocking",
    "resolve_device_blocking", "resolve_dtype", "translate_error",
]
