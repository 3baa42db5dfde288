"""The official Stage C ControlNet (its parameter names: the released files load strictly), and
:func:`inject_controlnet`, which adds its outputs to diffusers' Stage C as the official one adds ``cnet``.
ResBlocks are numbered in the order a forward pass runs them: the big Stage C has 64."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from ..effnet import _EFFNET_CHANNELS
from ..float16 import _hidden_scale
from ..sampling import Denoiser, unet_denoiser

ControlOutputs = Sequence[torch.Tensor | None]


class _LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a B×C×H×W tensor (the official ``LayerNorm2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _CNetResBlock(nn.Module):
    """The residual block of the 'large' bottleneck (official ``CNetResBlock``): its names are the file's."""

    def __init__(self, c: int) -> None:
        super().__init__()
        twice = [
            layer for _ in range(2) for layer in (_LayerNorm2d(c), nn.GELU(), nn.Conv2d(c, c, 3, padding=1))
        ]
        self.blocks = nn.Sequential(*twice)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.blocks(x)


def _effnet_backbone(c_in: int) -> nn.Module:
    """torchvision's EfficientNetV2-S, not downloaded (the checkpoint has every value), official stem."""
    backbone = torchvision.models.efficientnet_v2_s(weights=None).features
    if c_in != 3:  # the official replacement stem has no padding, unlike torchvision's
        backbone[0][0] = nn.Conv2d(c_in, backbone[0][0].out_channels, kernel_size=3, stride=2, bias=False)
    return backbone


def _large_backbone(c_in: int) -> nn.Module:
    """Super-resolution's bottleneck, its sizes fixed by the official code (the 814 MB float32 file)."""
    return nn.Sequential(
        nn.Conv2d(c_in, 4096 * 4, kernel_size=1),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(4096 * 4, 1024, kernel_size=1),
        *[_CNetResBlock(1024) for _ in range(8)],
        nn.Conv2d(1024, _EFFNET_CHANNELS, kernel_size=1),
    )


def _projection(channels: int, c_proj: int) -> nn.Sequential:
    """One block's projection; its last layer starts at zero, as in official training."""
    projection = nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size=1, bias=False),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(channels, c_proj, kernel_size=1, bias=False),
    )
    nn.init.zeros_(projection[-1].weight)  # a fresh ControlNet changes nothing
    return projection


class ControlNet(nn.Module):
    """The official ControlNet: ``c_in`` channels through the bottleneck (``'effnet'``: EfficientNetV2-S,
    canny's and inpainting's; ``'large'``: super-resolution's), then a projection to ``c_proj`` channels per
    entry of ``proj_blocks``. ``forward`` returns ``max(proj_blocks) + 1`` entries, None where none is fed."""

    def __init__(
        self, c_in: int, c_proj: int, proj_blocks: Sequence[int], bottleneck_mode: str = "effnet"
    ) -> None:
        super().__init__()
        if not proj_blocks or min(proj_blocks) < 0:
            raise ValueError(f"proj_blocks must list ResBlock positions (0, 1, ...), not {proj_blocks!r}")
        if bottleneck_mode not in ("effnet", "large"):
            raise ValueError(f"unknown bottleneck_mode {bottleneck_mode!r}: use 'effnet' or 'large'")
        self.c_in = c_in
        self.proj_blocks = list(proj_blocks)
        self.backbone = _effnet_backbone(c_in) if bottleneck_mode == "effnet" else _large_backbone(c_in)
        self.projections = nn.ModuleList(_projection(_EFFNET_CHANNELS, c_proj) for _ in self.proj_blocks)

    def forward(self, control_image: torch.Tensor) -> list[torch.Tensor | None]:
        features = self.backbone(control_image)
        outputs: list[torch.Tensor | None] = [None] * (max(self.proj_blocks) + 1)
        for block, projection in zip(self.proj_blocks, self.projections, strict=True):
            outputs[block] = projection(features)
        return outputs


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
    """Controls that do not fit this Stage C are named before it runs, not met as a shape error inside."""
    for position, control in enumerate(control_outputs):
        if control is None:
            continue
        if not control.is_floating_point():  # int8 features would be added as their integer values
            raise ValueError(
                f"control features for ResBlock {position} are {control.dtype}, not floating point: pass "
                "what the ControlNet returns (control_features)"
            )
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
    """The official ``x + F.interpolate(cnet, x.shape[-2:])``, with the batch the call runs on checked."""
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
    """While open, every call of ``unet`` adds ``control_outputs[i]``, bilinearly resized, to the input of
    its ResBlock ``i``, as the official Stage C does with ``cnet``. Gradient checkpointing's reruns get the
    same control, so call ``backward`` inside the context too.

    Args:
        unet: Stage C's UNet (diffusers' ``StableCascadeUNet``).
        control_outputs: per ResBlock position (:func:`resblock_order`): B×2048×h×w features for the big
            Stage C (B: 1 or the UNet's batch), or None (adds nothing; nor do positions past the end).
            Features that do not fit this Stage C (position, width, batch, dtype) raise a ValueError.

    Yields:
        ``unet``, hooked.
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


def _controlled_denoiser(unet: nn.Module, dtype: torch.dtype) -> Denoiser:
    """The sampler joins cnet (the official name) into the guidance batch; this adds it."""
    denoise = unet_denoiser(unet, dtype)

    def controlled(
        x: torch.Tensor, r: torch.Tensor, cnet: ControlOutputs | None = None, **inputs: torch.Tensor
    ) -> torch.Tensor:
        with inject_controlnet(unet, cnet) if cnet is not None else contextlib.nullcontext():
            return denoise(x, r, **inputs)

    return controlled
