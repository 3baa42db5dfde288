"""Stage C in float16: a rescale of its last block group that keeps the function.

Stage C's float16 pictures come out black (diffusers#6970, StableCascade#128, ComfyUI#2824): the hidden
states of the last up-block group grow past float16's largest number, 65504. Their size does not
matter to what follows, because ``clf`` starts with a LayerNorm. So the group's hidden state is divided
by a power of two ``s``, and the weights change so that each block computes its old result ÷ s
(diffusers' ``StableCascadeUNet``, block for block as the official ``StageC``):

- the previous upscaler ends in a 1×1 convolution, whose output starts the group: weight and bias ÷ s;
- ResBlock ``x + MLP(LN(depthwise(x)) ‖ skip)``: the depthwise bias ÷ s gives depthwise(x)/s, and
  LayerNorm with eps ÷ s² gives exactly LN(z) for z/s, so the MLP sees its old input (the skip, the
  down path's output, enters unnormalized and unchanged); the MLP's last linear ÷ s;
- TimestepBlock ``x·(1 + a) + b`` is not residual: the ``b`` half of every mapper ÷ s. The scale
  could change here (``1 + a`` times a ratio), but one scale does: float16's normal numbers span
  2^30, and it leaves ``a`` exact;
- AttnBlock ``x + out(attention(LN(x), kv))``: eps ÷ s², the output projection ÷ s (queries, keys and
  values come from LN(x) and the text, unchanged);
- ``clf``'s LayerNorm: eps ÷ s², and what it returns is what it returned before.

A power of two scales every product and sum exactly, so in float32 the rescaled UNet computes the
same numbers (only weights pushed below float16's normal range by ÷ s lose bits in float16).

Weights alone cannot say how large the hidden states grow, so the scale comes from one calibration
pass at load (float32, layer by layer: a float16 model needs no float32 copy; 72 s for the big Stage C
on a 2-core CPU, not cached): the group's largest |hidden| times 16 (headroom for other prompts and
sizes) must fit float16. Outside the group nothing changes: a calibrated value there beyond float16's
range refuses float16, naming the layer.

ControlNet features added to the group's ResBlocks (59 and 63 of the big Stage C) go in divided by
``s``; LoRA factors on rescaled layers are scaled like the layers' weights, and read back unscaled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .devices import UnsupportedPrecisionError
from .float8 import _last_group, _stored_in_float8

_FLOAT16_MAX = 65504.0
_HEADROOM = 16
_TIMES = (1.0, 0.5, 0.05)  # the calibration's noise levels: first, middle and last steps
_SCALE = "_float16_scale"  # the attribute a rescaled UNet carries
_CONVS = (nn.Conv2d, nn.ConvTranspose2d)


def _group(unet: nn.Module) -> int:
    """The index of the last up-block group, after checking that the derivation above covers the UNet."""
    from .upstream import StableCascadeUNet, _SDCascadeAttnBlock, _SDCascadeResBlock, _SDCascadeTimestepBlock

    last = len(getattr(unet, "up_blocks", ())) - 1
    known = (_SDCascadeResBlock, _SDCascadeTimestepBlock, _SDCascadeAttnBlock)
    if not isinstance(unet, StableCascadeUNet) or last < 1 or unet.config.clip_text_in_channels is None:
        why = "it is not a Stable Cascade Stage C (diffusers' StableCascadeUNet with two or more levels)"
    elif not all(type(block) in known for block in unet.up_blocks[last]):
        why = "its last block group holds blocks other than ResBlock, TimestepBlock and AttnBlock"
    elif (
        hasattr(unet, _SCALE)
        or _stored_in_float8(unet)
        or any(hasattr(m, "base_layer") for m in unet.modules())
    ):
        why = "it is rescaled already, or carries a LoRA or float8 weights (rescale first, then add those)"
    else:
        return last
    raise UnsupportedPrecisionError(
        f"the float16 rescale cannot be applied to this model: {why}. Use bfloat16 or float32"
    )


def _changes(unet: nn.Module, last: int) -> Iterator[tuple[str, str]]:
    """(module name, what changes) for every layer the rescale touches, in the order they run."""
    from .upstream import _SDCascadeAttnBlock, _SDCascadeResBlock

    upscaler = unet.up_upscalers[last - 1].named_modules()  # its last convolution, under a LoRA or not:
    convs = [
        n.removesuffix(".base_layer") for n, m in upscaler if isinstance(m, _CONVS) and ".lora_" not in n
    ]
    yield f"up_upscalers.{last - 1}.{convs[-1]}", "output"
    for k, block in enumerate(unet.up_blocks[last]):
        name = f"up_blocks.{last}.{k}"
        if isinstance(block, _SDCascadeResBlock):
            yield from ((f"{name}.depthwise", "bias"), (f"{name}.norm", "eps"))
            yield f"{name}.channelwise.{len(block.channelwise) - 1}", "output"
        elif isinstance(block, _SDCascadeAttnBlock):
            yield from ((f"{name}.norm", "eps"), (f"{name}.attention.to_out.0", "output"))
        else:  # a TimestepBlock
            yield from ((f"{name}.mapper{c}", "b half") for c in ["", *(f"_{c}" for c in block.conds)])
    yield from ((f"up_repeat_mappers.{last}.{j}", "bias") for j in range(len(unet.up_repeat_mappers[last])))
    yield "clf.0", "eps"


def _row_factors(module: nn.Module, change: str, scale: int) -> torch.Tensor:
    """A TimestepBlock mapper's output is ``a`` then ``b``: only its ``b`` rows scale (LoRA factors too)."""
    rows = torch.ones(module.weight.shape[0])
    rows[rows.shape[0] // 2 if change == "b half" else 0 :] = 1 / scale
    return rows.view(-1, *[1] * (module.weight.dim() - 1))


@torch.no_grad()
def _rescale(unet: nn.Module, last: int, scale: int) -> None:
    """Divide the group's hidden state by ``scale`` through the weights (the module docstring's list)."""
    modules = dict(unet.named_modules())
    for name, change in _changes(unet, last):
        module = modules[name]
        if change == "eps":
            module.eps /= scale**2
        elif change == "bias":
            module.bias /= scale
        else:
            rows = _row_factors(module, change, scale).to(module.weight.device, module.weight.dtype)
            module.weight.mul_(rows)
            module.bias.mul_(rows.flatten())
    for module in (*unet.up_blocks[last], unet):
        setattr(module, _SCALE, scale)


def _calibration_inputs(unet: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    """What a 1024² sampling run feeds Stage C, seeded so that a load always picks the same scale."""
    config, batch = unet.config, len(_TIMES)
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn(batch, config.in_channels, 24, 24, generator=generator),
        "timestep_ratio": torch.tensor(_TIMES),
        "clip_text_pooled": torch.randn(batch, 1, config.clip_text_pooled_in_channels, generator=generator),
        "clip_text": torch.randn(batch, 77, config.clip_text_in_channels, generator=generator),
        "clip_img": torch.zeros(batch, 1, config.clip_image_in_channels),
    }
    return {k: v.to(device) for k, v in inputs.items()}


@torch.no_grad()
def _largest_outputs(unet: nn.Module, device: torch.device) -> dict[str, float]:
    """Each layer moves to ``device`` in float32 only while it runs: float16 Stage C needs no float32 copy."""
    largest: dict[str, float] = {}
    homes: dict[nn.Module, tuple[torch.device, torch.dtype]] = {}

    def upcast(module: nn.Module, args: tuple) -> None:
        weight = next(module.parameters(recurse=False))
        homes[module] = weight.device, weight.dtype
        module.to(device, torch.float32)

    def record(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if module in homes:
                module.to(*homes[module])
            if isinstance(output, torch.Tensor):
                largest[name] = max(largest.get(name, 0.0), output.abs().max().item())

        return hook

    handles = []
    try:
        for name, module in unet.named_modules():
            if any(True for _ in module.parameters(recurse=False)):
                handles.append(module.register_forward_pre_hook(upcast))
            handles.append(module.register_forward_hook(record(name)))
        unet(**_calibration_inputs(unet, device), return_dict=False)
    finally:
        for handle in handles:
            handle.remove()
    return largest


def _refuse_overflow_outside(largest: dict[str, float], last: int) -> None:
    """Refuse float16 when a layer outside the group, which the rescale leaves alone, overflows it."""
    group = _last_group(last)
    over = [n for n, v in largest.items() if not f"{n}.".startswith(group) and not v <= _FLOAT16_MAX]
    if over:  # in the order the layers ran: the first is where the overflow starts
        raise UnsupportedPrecisionError(
            f"Stage C cannot run in float16 even rescaled: {over[0]} reaches {largest[over[0]]:.3g} in a "
            "calibration pass, outside the last block group the rescale covers (float16 ends at 65504). Use "
            "dtype=torch.bfloat16 or torch.float32"
        )


def _choose_scale(largest: dict[str, float], last: int) -> int:
    """The power of two that brings the group's largest |hidden| to float16's range with headroom."""
    _refuse_overflow_outside(largest, last)
    blocks = [name for name in largest if name.startswith(f"up_blocks.{last}.") and name.count(".") == 2]
    hidden = [largest[name] for name in [f"up_upscalers.{last - 1}", *blocks]]  # the group's input, outputs
    if not all(math.isfinite(value) for value in hidden):
        raise UnsupportedPrecisionError(
            "Stage C's calibration pass gave NaN or infinite values in float32: its weights hold some (a damaged "
            "file: run your download command again with --verify)"
        )
    need = max(hidden) * _HEADROOM / _FLOAT16_MAX
    return 2 ** math.ceil(math.log2(need)) if need > 1 else 1


def rescale_for_float16(
    unet: nn.Module, scale: int | None = None, *, device: str | torch.device | None = None
) -> int:
    """Rescale Stage C's last block group in place so that float16 does not overflow, computing the same
    function (derived in the module docstring). ``load_prior(dtype="float16")`` calls it.

    Args:
        unet: Stage C's UNet (big, lite or tiny), without a LoRA or float8 weights (add them after).
        scale: the power of two to divide the group's hidden state by; None calibrates it (one pass).
        device: where the calibration computes (default: where the weights are); the weights stay put.

    Returns:
        The scale applied (1: nothing needed it).

    Raises:
        UnsupportedPrecisionError: not a Stage C the rescale covers, rescaled already, with a LoRA or
            float8 weights, or a calibrated value outside the group past float16's limit.
        ValueError: a scale that is not a power of two.
    """
    last = _group(unet)
    if scale is None:
        weight = next(unet.parameters())
        scale = _choose_scale(_largest_outputs(unet, torch.device(device or weight.device)), last)
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1 or scale & (scale - 1):
        raise ValueError(f"scale={scale!r}: use a power of two (1, 2, 4 ...), which rescales exactly")
    _rescale(unet, last, scale)
    return scale


def _hidden_scale(module: nn.Module) -> int:
    """ControlNet features added to a rescaled block must be divided as its hidden state is."""
    return getattr(module, _SCALE, 1)


def _lora_rows(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA up factors on rescaled layers scale like their rows; other layers keep their inputs' and
    outputs' size, or (a depthwise convolution) a LoRA delta scales with its input as the layer does."""
    scale = getattr(model, _SCALE, None)
    if scale is None:
        return {}
    modules = dict(model.named_modules())
    changes = _changes(model, len(model.up_blocks) - 1)
    return {n: _row_factors(modules[n], c, scale) for n, c in changes if c in ("output", "b half")}
