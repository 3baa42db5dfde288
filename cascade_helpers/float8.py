"""Stage C and Stage B weights stored in float8 (``torch.float8_e4m3fn``): one byte a weight instead of
two, each layer cast up to the compute dtype only while it runs, as ComfyUI's ``--fp8_e4m3fn-unet``
does. ``load_prior(..., float8=True)`` / ``load_decoder(..., float8=True)``.

This is diffusers' layerwise casting (``ModelMixin.enable_layerwise_casting``), not code of ours. It
casts without a per-channel scale; torchao's weight-only int8 (per-row scales) errs less, but would
be a new dependency whose tensor subclasses the offload hooks and peft's LoRA layers must all
handle. What stays in the compute dtype: the last up-block group and the upscaler feeding it (as
KBlueLeaf's float16 fix advises: its hidden states are the largest, and the float16 rescale divides
those weights, which float8's few exponent bits would round to zero), LayerNorms, and LoRA layers.

Random weights bound the arithmetic (``benchmarks/precision.py``), not the pictures' quality.
"""

from __future__ import annotations

import torch
from torch import nn


def store_in_float8(unet: nn.Module, compute_dtype: torch.dtype) -> int:
    """Store ``unet``'s Linear and Conv weights in float8, cast up to ``compute_dtype`` per layer when
    it runs; the last up-block group and the upscaler feeding it stay as they are.

    Args:
        unet: a Stage C or Stage B (diffusers ``StableCascadeUNet``), before it is placed or offloaded.
        compute_dtype: the dtype the UNet computes in (bfloat16, float16 or float32).

    Returns:
        The bytes its parameters and buffers take now.
    """
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    last = len(unet.up_blocks) - 1
    group = (
        rf"^up_blocks\.{last}\.",
        rf"^up_repeat_mappers\.{last}\.",
        rf"^up_upscalers\.({last - 1}|{last})\.",
    )
    keep = (*DEFAULT_SKIP_MODULES_PATTERN, *group)
    unet.enable_layerwise_casting(torch.float8_e4m3fn, compute_dtype, skip_modules_pattern=keep)
    tensors = [*unet.parameters(), *unet.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _check_float8(float8: object, memory: str) -> None:
    """Refuse, before any file is read, a flag that is not a bool and float8 with sequential offload
    (accelerate streams each layer's stored weights itself; that pairing is untested)."""
    if not isinstance(float8, bool):
        raise TypeError(f"float8={float8!r}: use True or False")
    if float8 and memory == "sequential_offload":
        raise ValueError(
            "float8=True with memory='sequential_offload' is not supported: use memory='model_offload' (one "
            "model on the GPU at a time, in float8: half the bytes)"
        )


def _stored_in_float8(model: nn.Module) -> bool:
    """Whether some of ``model``'s weights are float8: layers added later (LoRA) must not inherit it."""
    return any(p.dtype == torch.float8_e4m3fn for p in model.parameters())
