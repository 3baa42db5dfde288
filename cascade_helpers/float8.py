"""Stage C and Stage B weights stored in float8 (``torch.float8_e4m3fn``): one byte a weight instead of
two, each layer cast up to the compute dtype only while it runs (as ComfyUI's ``--fp8_e4m3fn-unet``).
``load_prior(..., float8=True)`` / ``load_decoder(..., float8=True)``.

Each weight tensor is multiplied by a power of two before the cast, so that its largest value lands
near float8's largest (448), and divided by it again (exactly) when cast up. Why not the libraries:
diffusers' layerwise casting (``enable_layerwise_casting``) casts without a scale, and Stable
Cascade's weights (about 0.01) then fall among float8's subnormals, 2⁻⁹ apart: one call of the big
Stage C erred 0.30 against float32, 16 times bfloat16's (``benchmarks/precision.py``; random weights,
official init, bound the arithmetic, not the pictures' quality); torchao's scaled float8 would be a new
dependency whose tensor subclasses the offload hooks and peft's LoRA layers must all handle. Biases
stay in the compute dtype (few bytes), and so do the last up-block group and the upscaler feeding it
(KBlueLeaf's advice: its hidden states are the largest, and the float16 rescale divides those
weights), and a weight holding NaN or inf (a damaged file, which the NaN diagnosis then names).
"""

from __future__ import annotations

import math

import torch
from torch import nn

_FLOAT8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_LAYERS = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)


def store_in_float8(unet: nn.Module, compute_dtype: torch.dtype) -> int:
    """Store most of ``unet``'s Linear and Conv weights in float8 (the module docstring says which and how).

    Args:
        unet: a Stage C or Stage B (diffusers ``StableCascadeUNet``), before it is placed or offloaded.
        compute_dtype: the dtype the UNet computes in (bfloat16, float16 or float32).

    Returns:
        The bytes its parameters and buffers take now.
    """
    kept = _last_group(len(unet.up_blocks) - 1)
    for name, module in unet.named_modules():
        if isinstance(module, _LAYERS) and not name.startswith(kept):
            _store(module, compute_dtype)
    return sum(t.numel() * t.element_size() for t in (*unet.parameters(), *unet.buffers()))


def _last_group(last: int) -> tuple[str, ...]:
    """What float8 keeps out is what the float16 rescale covers (a value there may pass float16's range)."""
    upscalers = f"up_upscalers.{last - 1}.", f"up_upscalers.{last}."
    return f"up_blocks.{last}.", f"up_repeat_mappers.{last}.", *upscalers


def _store(module: nn.Module, compute_dtype: torch.dtype) -> None:
    """The stored float8 tensor stays the parameter, so moves reach it; the hook swaps it back on errors."""
    weight = module.weight.data
    peak = weight.abs().max().item()
    if not peak < math.inf:  # NaN or inf (float8 turns inf into 448): kept, for the NaN diagnosis to name
        return
    exponent = math.floor(math.log2(_FLOAT8_MAX / peak)) if peak > 0 else 0
    scale = 2.0 ** min(exponent, 126)  # within float32's range
    module.weight.data = (weight.float() * scale).to(torch.float8_e4m3fn)
    stored: list[torch.Tensor] = []

    def upcast(layer: nn.Module, args: tuple) -> None:
        stored.append(layer.weight.data)
        layer.weight.data = stored[-1].to(compute_dtype).div_(scale)  # exact: a power of two

    def restore(layer: nn.Module, args: tuple, output: object) -> None:
        layer.weight.data = stored.pop()

    module.register_forward_pre_hook(upcast)
    module.register_forward_hook(restore, always_call=True)


def _check_float8(float8: object, memory: str) -> None:
    """Before any file is read; accelerate's sequential offload streams stored weights itself (untested)."""
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
