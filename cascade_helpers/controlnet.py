"""Stage C ControlNet: the official checkpoints (canny, inpainting, super-resolution) on diffusers' UNet.

diffusers has no ControlNet for Stable Cascade; the official code has a small one. It encodes a control
picture with a "bottleneck" (EfficientNetV2-S features; two convolutions; or, for the super-resolution
model, 1×1 convolutions around eight residual blocks of 3×3 convolutions), then one projection per
chosen Stage C ResBlock; each projection is added to the input of its ResBlock, resized bilinearly to
the block's resolution. The ResBlocks are numbered in the order a forward pass runs them, down path
then up path: the big Stage C has 64, and the released ControlNets feed blocks 0, 4, 8, 12, 51, 55,
59 and 63.

Here:

- :class:`ControlNet` has the official parameter names and shapes, so the released files load strictly;
- :func:`inject_controlnet` adds its outputs to a diffusers ``StableCascadeUNet`` with forward pre-hooks,
  giving the official Stage C's output;
- :data:`CONTROLNET_TYPES` holds the official configs (checkpoint, filter, blocks) in one place;
- the filters turn a picture into what each ControlNet sees, as the official ``CannyFilter``,
  ``InpaintFilter`` and ``SREffnetFilter`` do, and the mask helpers make inpainting and outpainting masks;
- :func:`load_controlnet` checks a file before loading it, and :func:`control_features` runs the
  ControlNet once per generation, as the official notebook does.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageOps
import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torchvision.transforms import functional as TF

from . import files
from .checkpoints import TensorInfo, WrongCheckpointError
from .effnet import IMAGENET_MEAN, IMAGENET_STD, encoder_input_size
from .files import ModelFile
from .images import ImageInput, batch_images, image_to_tensor, resize_and_crop
from .loading import Prior, check_present, fetch_command, inspect_file

BottleneckMode = Literal["effnet", "simple", "large"]
ControlOutputs = Sequence[torch.Tensor | None]

EFFNET_CHANNELS = 1280  # EfficientNetV2-S features, also the width the 'large' bottleneck maps to
EFFNET_STEM_CHANNELS = 24


class ControlNetNotReleasedError(FileNotFoundError):
    """The official code defines this ControlNet, but no checkpoint was ever published."""


# --- the official module -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LargeBottleneck:
    """Widths of the 'large' bottleneck (the super-resolution ControlNet's). The official code fixes
    them (169 M parameters; 203 M with the projections, the released 814 MB float32 file); only the
    tiny test models use smaller ones, with the same names."""

    expand: int = 4096 * 4
    hidden: int = 1024
    blocks: int = 8
    out: int = EFFNET_CHANNELS


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
        proj_blocks: Sequence[int] = (0, 4, 8, 12, 51, 55, 59, 63),
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
            self.backbone, channels = _effnet_backbone(c_in), EFFNET_CHANNELS
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
    from .upstream import SDCascadeResBlock

    order: list[nn.Module] = []
    paths = ((unet.down_blocks, unet.down_repeat_mappers), (unet.up_blocks, unet.up_repeat_mappers))
    for levels, repeat_mappers in paths:
        for blocks, mappers in zip(levels, repeat_mappers, strict=True):
            for _ in range(len(mappers) + 1):
                order += [block for block in blocks if isinstance(block, SDCascadeResBlock)]
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


def _add_control(x: torch.Tensor, control: torch.Tensor, position: int) -> torch.Tensor:
    if control.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"control features for ResBlock {position} hold {control.shape[0]} pictures, but Stage C runs on "
            f"{x.shape[0]} (classifier-free guidance doubles the batch: pass the features in the conditional "
            f"and unconditional inputs, as generate_stage_c(control=...) does)"
        )
    resized = F.interpolate(control.float(), size=x.shape[-2:], mode="bilinear", align_corners=True)
    return x + resized.to(x.device, x.dtype)


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
        return (_add_control(args[0], control, position), *args[1:])

    handles = []
    try:
        handles.append(unet.register_forward_pre_hook(restart))
        handles += [block.register_forward_pre_hook(add_control) for block in positions]
        yield unet
    finally:
        for handle in handles:
            handle.remove()


# --- the official configs ------------------------------------------------------------------------------

Filter = Literal["canny", "inpaint", "super_resolution", "identity"]

#: the Stage C ResBlocks the released ControlNets feed (of the big Stage C's 64)
OFFICIAL_BLOCKS = (0, 4, 8, 12, 51, 55, 59, 63)
#: the same pattern for the tiny test Stage C (8 ResBlocks: 0-3 down, 4-7 up): first and last of each half
TINY_BLOCKS = (0, 2, 5, 7)


@dataclass(frozen=True)
class ControlNetType:
    """One official ControlNet config (``configs/inference/controlnet_c_3b_*.yaml``): which checkpoint,
    which bottleneck and input channels, which Stage C blocks, which filter with which settings."""

    name: str
    description: str
    file: ModelFile | None  # None: defined in the official code, never released
    c_in: int
    bottleneck_mode: BottleneckMode
    proj_blocks: tuple[int, ...]
    filter: Filter
    filter_params: Mapping[str, float] = field(default_factory=dict)


CONTROLNET_TYPES: dict[str, ControlNetType] = {
    "canny": ControlNetType(
        "canny",
        "follow the edges of a picture (OpenCV Canny)",
        files.CONTROLNETS["canny"],
        c_in=1,
        bottleneck_mode="effnet",
        proj_blocks=OFFICIAL_BLOCKS,
        filter="canny",
        filter_params={"resize": 224, "low": 100, "high": 200},
    ),
    "inpainting": ControlNetType(
        "inpainting",
        "repaint the masked part of a picture (inpainting, outpainting)",
        files.CONTROLNETS["inpainting"],
        c_in=4,
        bottleneck_mode="effnet",
        proj_blocks=OFFICIAL_BLOCKS,
        filter="inpaint",
    ),
    "super_resolution": ControlNetType(
        "super_resolution",
        "EfficientNet features of the half-size picture → the full-size picture",
        files.CONTROLNETS["super_resolution"],
        c_in=16,
        bottleneck_mode="large",
        proj_blocks=OFFICIAL_BLOCKS,
        filter="super_resolution",
        filter_params={"scale_factor": 0.5},
    ),
    "face_identity": ControlNetType(
        "face_identity",
        "ArcFace identity vectors of detected faces (never released)",
        None,
        c_in=512,
        bottleneck_mode="simple",
        proj_blocks=tuple(range(64)),
        filter="identity",
    ),
}


def controlnet_type(kind: str | ControlNetType) -> ControlNetType:
    if isinstance(kind, ControlNetType):
        return kind
    if kind not in CONTROLNET_TYPES:
        raise KeyError(f"unknown ControlNet {kind!r}: use one of {', '.join(CONTROLNET_TYPES)}")
    return CONTROLNET_TYPES[kind]


def _check_released(kind: ControlNetType) -> ModelFile:
    if kind.file is None:
        raise ControlNetNotReleasedError(
            f"the {kind.name} ControlNet is defined in the official code, but its checkpoint was never "
            f"published (it was uploaded to the Hub and deleted): there is nothing to load"
        )
    return kind.file


# --- reading a checkpoint ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControlNetShape:
    """What a ControlNet file holds, read from its safetensors header."""

    bottleneck_mode: BottleneckMode
    c_in: int
    c_proj: int
    projections: int
    large: LargeBottleneck | None = None

    def matches(self, kind: ControlNetType) -> bool:
        return (self.bottleneck_mode, self.c_in) == (kind.bottleneck_mode, kind.c_in)

    def describe(self) -> str:
        known = [k.name for k in CONTROLNET_TYPES.values() if self.matches(k)]
        what = f"the {known[0]} ControlNet" if known else "an unknown ControlNet"
        return f"{what} ({self.bottleneck_mode!r} bottleneck, {self.c_in} input channels)"


def _count(tensors: Mapping[str, TensorInfo], pattern: str) -> int:
    return len({m.group(1) for key in tensors if (m := re.fullmatch(pattern, key))})


def controlnet_shape(tensors: Mapping[str, TensorInfo]) -> ControlNetShape:
    """Bottleneck mode, input channels, projection width and count (and 'large' widths) of a file."""
    try:
        c_proj = tensors["projections.0.2.weight"].shape[0]
        projections = _count(tensors, r"projections\.(\d+)\.0\.weight")
        if "backbone.0.1.running_mean" in tensors:  # EfficientNet: stem convolution + BatchNorm
            return ControlNetShape("effnet", tensors["backbone.0.0.weight"].shape[1], c_proj, projections)
        first = tensors["backbone.0.weight"].shape
        if "backbone.3.blocks.0.weight" in tensors:
            blocks = _count(tensors, r"backbone\.(\d+)\.blocks\.0\.weight")
            large = LargeBottleneck(
                expand=first[0],
                hidden=tensors["backbone.2.weight"].shape[0],
                blocks=blocks,
                out=tensors[f"backbone.{3 + blocks}.weight"].shape[0],
            )
            return ControlNetShape("large", first[1], c_proj, projections, large)
        return ControlNetShape("simple", first[1], c_proj, projections)
    except KeyError as missing:
        raise WrongCheckpointError(f"not an official ControlNet checkpoint: no {missing} tensor") from None


# --- loading -------------------------------------------------------------------------------------------


def _blocks_for(prior: Prior, kind: ControlNetType) -> tuple[int, ...]:
    return TINY_BLOCKS if prior.architecture == "tiny" else kind.proj_blocks


def _check_fits(path: Path, shape: ControlNetShape, kind: ControlNetType, prior: Prior, command: str) -> None:
    if not shape.matches(kind):
        raise WrongCheckpointError(
            f"{path} holds {shape.describe()}, but the {kind.name} ControlNet was asked for "
            f"({kind.bottleneck_mode!r} bottleneck, {kind.c_in} input channels). Load it as the type it is, "
            f"or fetch the {kind.name} one with:\n  {command}"
        )
    width = prior.unet.config.block_out_channels[0]
    if shape.c_proj != width:
        lite = " (Stage C lite)" if prior.architecture == "lite" else ""
        raise WrongCheckpointError(
            f"{path} projects to Stage C width {shape.c_proj}, but this prior{lite} has width {width}. The "
            f"released ControlNets were trained for the big Stage C only: load_prior(models_dir, 'big')."
        )
    blocks = _blocks_for(prior, kind)
    if shape.projections != len(blocks):
        raise WrongCheckpointError(
            f"{path} has {shape.projections} projections, but the {kind.name} config feeds "
            f"{len(blocks)} Stage C blocks {list(blocks)}"
        )


def load_controlnet(source: str | Path, kind: str | ControlNetType, prior: Prior) -> ControlNet:
    """A released ControlNet from a models folder (``controlnet/<name>.safetensors``) or a file, on the
    prior's device in the prior's dtype. Checked first: the file is complete, it holds the ControlNet
    type asked for, and it fits this Stage C (the released ones fit the big Stage C only)."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    kind = controlnet_type(kind)
    file = _check_released(kind)
    path = Path(source)
    command = fetch_command(path, [file]) if path.is_dir() else files.download_command([file])
    if path.is_dir():
        check_present(path, [file])
        path = path / file.path
    info, _ = inspect_file(path, "controlnet", None, command)
    shape = controlnet_shape(info.tensors)
    _check_fits(path, shape, kind, prior, command)
    with init_empty_weights():
        controlnet = ControlNet(
            kind.c_in,
            shape.c_proj,
            _blocks_for(prior, kind),
            kind.bottleneck_mode,
            large=shape.large or LargeBottleneck(),
        )
    state = {k: v.to(prior.dtype) if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    controlnet.load_state_dict(state, strict=True, assign=True)
    return controlnet.to(prior.device).eval().requires_grad_(False)


# --- masks ---------------------------------------------------------------------------------------------

Box = tuple[float, float, float, float]  # left, top, right, bottom as fractions of the width / height


def _mask_picture(height: int, width: int, draw) -> PIL.Image.Image:
    mask = PIL.Image.new("L", (width, height), 0)
    draw(PIL.ImageDraw.Draw(mask))
    return mask


def _pixels(box: Box, height: int, width: int) -> tuple[int, int, int, int]:
    left, top, right, bottom = box
    if not (0 <= left < right <= 1 and 0 <= top < bottom <= 1):
        raise ValueError(
            f"box {box}: (left, top, right, bottom) as fractions, 0 ≤ left < right ≤ 1, same for top/bottom"
        )
    return round(left * width), round(top * height), round(right * width) - 1, round(bottom * height) - 1


def rectangle_mask(height: int, width: int, box: Box) -> PIL.Image.Image:
    """White (regenerate) inside ``box`` = (left, top, right, bottom) in fractions, black elsewhere."""
    return _mask_picture(height, width, lambda d: d.rectangle(_pixels(box, height, width), fill=255))


def ellipse_mask(height: int, width: int, box: Box) -> PIL.Image.Image:
    """White inside the ellipse that fills ``box`` (fractions), black elsewhere."""
    return _mask_picture(height, width, lambda d: d.ellipse(_pixels(box, height, width), fill=255))


def _inner_box(top: float, bottom: float, left: float, right: float) -> Box:
    return left, top, 1 - right, 1 - bottom


def border_mask(
    height: int, width: int, top: float, bottom: float, left: float, right: float
) -> PIL.Image.Image:
    """White on the borders (fractions of the height / width), black inside: outpainting."""
    return PIL.ImageOps.invert(rectangle_mask(height, width, _inner_box(top, bottom, left, right)))


def outpainting_canvas(
    image: ImageInput, height: int, width: int, *, top: float, bottom: float, left: float, right: float
) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """The picture shrunk into the middle of a black height×width canvas, and the border mask around it
    (the official outpainting example pastes the picture on a larger black canvas the same way)."""
    x0, y0, x1, y1 = _pixels(_inner_box(top, bottom, left, right), height, width)
    inner = resize_and_crop(image_to_tensor(image), y1 + 1 - y0, x1 + 1 - x0)
    canvas = PIL.Image.new("RGB", (width, height), "black")
    canvas.paste(TF.to_pil_image(inner), (x0, y0))
    return canvas, border_mask(height, width, top, bottom, left, right)


def mask_tensor(mask: ImageInput, height: int, width: int) -> torch.Tensor:
    """Any black-and-white picture (PIL of any mode, array, tensor, bool or float, file) → a 1×1×H×W
    bool mask at height×width, scaled and centre-cropped like the picture. True (white) = regenerate."""
    if isinstance(mask, PIL.Image.Image):
        mask = mask.convert("L")
    if isinstance(mask, (torch.Tensor, np.ndarray)) and mask.dtype in (torch.bool, np.bool_):
        mask = torch.as_tensor(mask).float()
    gray = image_to_tensor(mask).mean(0, keepdim=True)
    return resize_and_crop(gray, height, width)[None] > 0.5


# --- filters: picture → what the ControlNet sees ------------------------------------------------------


@dataclass
class ControlInput:
    """What the ControlNet sees (``tensor``, B×c_in×h×w) and a picture of it to show (``preview``, B×3×h×w)."""

    tensor: torch.Tensor
    preview: torch.Tensor


def canny_edges(
    images: torch.Tensor, resize: int | None = 224, low: int = 100, high: int = 200
) -> torch.Tensor:
    """The official ``CannyFilter``: bilinear resize to resize×resize, ``cv2.Canny(low, high)`` on the
    8-bit RGB picture (truncated, not rounded, as there), resized back bilinearly. B×1×H×W in [0, 1]."""
    import cv2

    size = images.shape[-2:]
    pictures = images.detach().float().cpu()
    if resize is not None:
        pictures = F.interpolate(pictures, size=(resize, resize), mode="bilinear")
    edges = [
        torch.from_numpy(cv2.Canny(p.mul(255).permute(1, 2, 0).numpy().astype(np.uint8), low, high))
        for p in pictures
    ]
    result = torch.stack(edges)[:, None].float() / 255
    return F.interpolate(result, size=size, mode="bilinear") if resize is not None else result


def inpaint_control(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The official ``InpaintFilter`` with a given mask: masked pixels set to white, the mask appended
    as a fourth channel (B×4×H×W). The official filter can also guess a mask with a saliency model
    kept in its git repository; here the mask is always the user's."""
    mask = mask.to(images.device).bool()
    masked = torch.where(mask, torch.ones_like(images), images)
    return torch.cat([masked, mask.to(images.dtype).expand(images.shape[0], -1, -1, -1)], dim=1)


@torch.no_grad()
def super_resolution_control(
    prior: Prior, half_size: torch.Tensor, scale_factor: float = 0.5
) -> ControlInput:
    """The official ``SREffnetFilter`` from the half-size picture on: EfficientNet features of it,
    enlarged 1/scale_factor× (nearest), and the picture enlarged the same way to show."""
    if prior.effnet is None:
        raise ValueError("super-resolution needs the EfficientNet encoder: load_prior(..., effnet=True)")
    pictures = half_size.to(prior.device, torch.float32)
    features = prior.effnet(TF.normalize(pictures, IMAGENET_MEAN, IMAGENET_STD)).float()
    up = 1 / scale_factor
    return ControlInput(
        F.interpolate(features, scale_factor=up, mode="nearest"),
        F.interpolate(pictures, scale_factor=up, mode="nearest").cpu(),
    )


def control_size(height: int, width: int) -> tuple[int, int]:
    """The size control pictures are prepared at: the EfficientNet input size of the generation (768²
    for 1024²), the size the official examples ran the ControlNets at."""
    return encoder_input_size(height, width)


def control_input(
    kind: str | ControlNetType,
    image: ImageInput,
    height: int = 1024,
    width: int = 1024,
    *,
    mask: ImageInput | None = None,
    prior: Prior | None = None,
) -> ControlInput:
    """Apply ``kind``'s official filter to a picture (any size: scaled and centre-cropped) for a
    height×width generation. Inpainting needs a ``mask`` (white = regenerate); super-resolution needs
    the ``prior`` (its EfficientNet encoder) and treats the picture as the half-size one."""
    kind = controlnet_type(kind)
    size = control_size(height, width)
    params = dict(kind.filter_params)
    if kind.filter == "canny":
        edges = canny_edges(batch_images(image, *size), **params)
        return ControlInput(edges, edges.expand(-1, 3, -1, -1))
    if kind.filter == "inpaint":
        if mask is None:
            raise ValueError(
                "inpainting needs a mask, white where the picture is regenerated: rectangle_mask, "
                "ellipse_mask, border_mask, or any black-and-white picture"
            )
        control = inpaint_control(batch_images(image, *size), mask_tensor(mask, *size))
        return ControlInput(control, control[:, :3])
    if kind.filter == "super_resolution":
        if prior is None:
            raise ValueError(
                "super-resolution needs the prior (its EfficientNet encoder): control_input(..., prior=prior)"
            )
        half = [round(side * params["scale_factor"]) for side in size]
        return super_resolution_control(prior, batch_images(image, *half), params["scale_factor"])
    _check_released(kind)
    raise NotImplementedError(kind.filter)


@torch.no_grad()
def control_features(
    controlnet: ControlNet, control: ControlInput | torch.Tensor, strength: float = 1.0, batch: int = 1
) -> list[torch.Tensor | None]:
    """Run the ControlNet once and scale its outputs by ``strength`` (the official ``cnet_multiplier``:
    1.0, or 0.8 / 0.6 / 0.3 for a looser hold), repeated for ``batch`` pictures from one control picture."""
    tensor = control.tensor if isinstance(control, ControlInput) else control
    if tensor.dim() != 4 or tensor.shape[1] != controlnet.c_in:
        raise ValueError(
            f"this ControlNet takes B×{controlnet.c_in}×H×W control input, got {tuple(tensor.shape)}: "
            f"prepare it with control_input() for the same ControlNet type"
        )
    if batch % tensor.shape[0]:
        raise ValueError(f"{tensor.shape[0]} control pictures cannot be spread over a batch of {batch}")
    weight = next(controlnet.parameters())
    outputs = controlnet(tensor.to(weight.device, weight.dtype))
    repeats = batch // tensor.shape[0]
    return [None if o is None else (o * strength).repeat_interleave(repeats, 0) for o in outputs]
