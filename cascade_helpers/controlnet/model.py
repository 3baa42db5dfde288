"""The official Stage C ControlNet module, and how its outputs reach diffusers' Stage C.

:class:`ControlNet` has the official parameter names and shapes, so the released files load strictly.
:func:`inject_controlnet` adds its outputs to a diffusers ``StableCascadeUNet`` with forward pre-hooks,
giving the official Stage C's output; :func:`controlled_denoiser` is the sampler's denoiser with that
hook, for the ``cnet`` input the official Stage C takes.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from ..effnet import _EFFNET_CHANNELS
from ..float16 import _hidden_scale
from ..sampling import Denoiser, unet_denoiser

BottleneckMode = Literal["effnet", "simple", "large"]
ControlOutputs = Sequence[torch.Tensor | None]

EFFNET_STEM_CHANNELS = 24
#: the Stage C ResBlocks the released ControlNets feed (of the big Stage C's 64)
OFFICIAL_BLOCKS = (0, 4, 8, 12, 51, 55, 59, 63)


@dataclass(frozen=True)
class LargeBottleneck:
    """Widths of the 'large' bottleneck (the super-resolution ControlNet's). The official code fixes
    them (169 M parameters; 203 M with the projections, the released 814 MB float32 file); only the
    tiny test models use smaller ones, with the same names."""

    expand: int = 4096 * 4
    hidden: int = 1024
    blocks: int = 8
    out: int = _EFFNET_CHANNELS


class _LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a B×C×H×W tensor (the official ``LayerNorm2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class CNetResBlock(nn.Module):
    """The residual block of the 'large' bottleneck (official ``CNetResBlock``)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            _LayerNorm2d(c),
            nn.GELU(),
            nn.Conv2d(c, c, kernel_size=3, padding=1),
            _LayerNorm2d(c),
            nn.GELU(),
            nn.Conv2d(c, c, kernel_size=3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.blocks(x)


def _effnet_backbone(c_in: int) -> nn.Module:
    # weights=None: nothing is downloaded, every value comes from the ControlNet checkpoint
    backbone = torchvision.models.efficientnet_v2_s(weights=None).features
    if c_in != 3:  # the official replacement stem has no padding, unlike torchvision's
        backbone[0][0] = nn.Conv2d(c_in, EFFNET_STEM_CHANNELS, kernel_size=3, stride=2, bias=False)
    return backbone


def _simple_backbone(c_in: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(c_in, c_in * 4, kernel_size=3, padding=1),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(c_in * 4, c_in, kernel_size=3, padding=1),
    )


def _large_backbone(c_in: int, size: LargeBottleneck) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(c_in, size.expand, kernel_size=1),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(size.expand, size.hidden, kernel_size=1),
        *[CNetResBlock(size.hidden) for _ in range(size.blocks)],
        nn.Conv2d(size.hidden, size.out, kernel_size=1),
    )


def _projection(channels: int, c_proj: int) -> nn.Sequential:
    projection = nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size=1, bias=False),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(channels, c_proj, kernel_size=1, bias=False),
    )
    nn.init.zeros_(projection[-1].weight)  # as in official training: a fresh ControlNet changes nothing
    return projection


class ControlNet(nn.Module):
    """The official Stage C ControlNet, with its parameter names and shapes.

    ``c_in`` channels of control picture go through the bottleneck (``'effnet'``: EfficientNetV2-S
    features, its stem replaced when ``c_in`` ≠ 3; ``'simple'``: two 3×3 convolutions; ``'large'``: 1×1
    convolutions and residual blocks, sized by ``large``), then one projection to ``c_proj`` channels
    (Stage C's width) per entry of ``proj_blocks``.

    ``forward`` returns a list of length ``max(proj_blocks) + 1``: at each position in ``proj_blocks``
    the projection for that Stage C ResBlock, at the bottleneck's resolution; None elsewhere.
    """

    def __init__(
        self,
        c_in: int = 3,
        c_proj: int = 2048,
        proj_blocks: Sequence[int] = OFFICIAL_BLOCKS,
        bottleneck_mode: BottleneckMode = "effnet",
        *,
        large: LargeBottleneck = LargeBottleneck(),
    ) -> None:
        super().__init__()
        if not proj_blocks or min(proj_blocks) < 0:
            raise ValueError(f"proj_blocks must list ResBlock positions (0, 1, ...), not {proj_blocks!r}")
        self.c_in = c_in
        self.proj_blocks = list(proj_blocks)
        if bottleneck_mode == "effnet":
            self.backbone, channels = _effnet_backbone(c_in), _EFFNET_CHANNELS
        elif bottleneck_mode == "simple":
            self.backbone, channels = _simple_backbone(c_in), c_in
        elif bottleneck_mode == "large":
            self.backbone, channels = _large_backbone(c_in, large), large.out
        else:
            raise ValueError(
                f"unknown bottleneck_mode {bottleneck_mode!r}: use 'effnet', 'simple' or 'large'"
            )
        self.projections = nn.ModuleList(_projection(channels, c_proj) for _ in self.proj_blocks)

    def forward(self, control_image: torch.Tensor) -> list[torch.Tensor | None]:
        features = self.backbone(control_image)
        outputs: list[torch.Tensor | None] = [None] * (max(self.proj_blocks) + 1)
        for block, projection in zip(self.proj_blocks, self.projections, strict=True):
            outputs[block] = projection(features)
        return outputs


# --- injection into diffusers' StableCascadeUNet -------------------------------------------------------


def resblock_order(unet: nn.Module) -> list[nn.Module]:
    """Stage C's ResBlocks in the order a forward pass runs them (down path, then up path, repeats
    included): position ``i`` is the official ControlNet's block ``i``."""
    from ..upstream import _SDCascadeResBlock

    order: list[nn.Module] = []
    paths = ((unet.down_blocks, unet.down_repeat_mappers), (unet.up_blocks, unet.up_repeat_mappers))
    for levels, repeat_mappers in paths:
        for blocks, mappers in zip(levels, repeat_mappers, strict=True):
            for _ in range(len(mappers) + 1):
                order += [block for block in blocks if isinstance(block, _SDCascadeResBlock)]
    return order


def _check_control_outputs(order: list[nn.Module], control_outputs: ControlOutputs) -> None:
    for position, control in enumerate(control_outputs):
        if control is None:
            continue
        if position >= len(order):
            raise ValueError(
                f"control features for ResBlock {position}, but this Stage C has {len(order)} ResBlocks "
                f"(0-{len(order) - 1}): the ControlNet's block list was made for a bigger Stage C"
            )
        channels = order[position].depthwise.in_channels
        if control.dim() != 4 or control.shape[1] != channels:
            raise ValueError(
                f"control features for ResBlock {position} have shape {tuple(control.shape)}, but that block "
                f"takes {channels} channels. The released ControlNets were trained for the big Stage C "
                f"(width 2048): they do not fit Stage C lite (1536)."
            )


def _add_control(x: torch.Tensor, control: torch.Tensor, position: int, scale: int) -> torch.Tensor:
    if control.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"control features for ResBlock {position} hold {control.shape[0]} pictures, but Stage C runs on "
            f"{x.shape[0]} (classifier-free guidance doubles the batch: pass the features in the conditional "
            f"and unconditional inputs, as generate_stage_c(control=...) does)"
        )
    resized = F.interpolate(control.float(), size=x.shape[-2:], mode="bilinear", align_corners=True)
    return x + (resized / scale).to(x.device, x.dtype)  # scale: the float16 rescale's (1 without it)


@contextlib.contextmanager
def inject_controlnet(unet: nn.Module, control_outputs: ControlOutputs) -> Iterator[nn.Module]:
    """While open, every call of ``unet`` (a diffusers ``StableCascadeUNet``) adds
    ``control_outputs[i]`` to the input of its ResBlock ``i``, bilinearly resized to that block's size,
    as the official Stage C does with its ``cnet`` argument. None entries, and positions past the end
    of a shorter list, add nothing. The count starts again at every UNet call (a sampling loop calls it
    many times); on leaving, the hooks are removed and the UNet is exactly as before.

    Each ResBlock module knows its own position(s), so blocks that gradient checkpointing runs again
    during the backward pass get the same control as in the forward pass: call ``backward`` inside the
    context too.

    Args:
        unet: Stage C's UNet.
        control_outputs: one entry per ResBlock position (:func:`resblock_order`): features
            B×2048×h×w for the big Stage C (B: 1 or the batch the UNet runs on), or None.

    Yields:
        ``unet``, hooked.

    Raises:
        ValueError: features for a position this Stage C lacks, or of the wrong channel count (a
            ControlNet for another Stage C width); on a call, features for another batch size.
    """
    order = resblock_order(unet)
    _check_control_outputs(order, control_outputs)
    positions: dict[nn.Module, list[int]] = {}
    for position, block in enumerate(order):
        positions.setdefault(block, []).append(position)
    calls: Counter[nn.Module] = Counter()

    def restart(_unet: nn.Module, _args: tuple) -> None:
        calls.clear()

    def add_control(block: nn.Module, args: tuple) -> tuple | None:
        block_positions = positions[block]
        position = block_positions[calls[block] % len(block_positions)]
        calls[block] += 1
        control = control_outputs[position] if position < len(control_outputs) else None
        if control is None:
            return None
        return (_add_control(args[0], control, position, _hidden_scale(block)), *args[1:])

    handles = []
    try:
        handles.append(unet.register_forward_pre_hook(restart))
        handles += [block.register_forward_pre_hook(add_control) for block in positions]
        yield unet
    finally:
        for handle in handles:
            handle.remove()


def controlled_denoiser(unet: nn.Module, dtype: torch.dtype) -> Denoiser:
    """:func:`cascade_helpers.sampling.unet_denoiser` that also takes a ``cnet`` input (ControlNet
    features, the official Stage C's argument name) and adds it to the UNet's ResBlocks during the
    call (:func:`inject_controlnet`).

    Args:
        unet: Stage C's UNet.
        dtype: the dtype it was loaded in.

    Returns:
        The denoiser, ``denoiser(x, r, cnet=None, **inputs)``; without ``cnet`` it is plain
        :func:`~cascade_helpers.sampling.unet_denoiser`.
    """
    denoise = unet_denoiser(unet, dtype)

    def controlled(
        x: torch.Tensor, r: torch.Tensor, cnet: ControlOutputs | None = None, **inputs: torch.Tensor
    ) -> torch.Tensor:
        with inject_controlnet(unet, cnet) if cnet is not None else contextlib.nullcontext():
            return denoise(x, r, **inputs)

    return controlled
