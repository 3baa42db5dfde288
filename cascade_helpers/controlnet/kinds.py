"""The official ControlNet configs, what a ControlNet file holds, and loading one.

:data:`CONTROLNET_TYPES` holds the official configs (``configs/inference/controlnet_c_3b_*.yaml``:
checkpoint, filter, bottleneck, Stage C blocks) in one place. :func:`load_controlnet` checks a file
before loading it: complete, the type asked for, and fitting this Stage C.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .. import files
from ..checkpoints import _TensorInfo, _WrongCheckpointError
from ..file_checks import _check_present, _fetch_command, _inspect_file
from ..files import ModelFile
from ..models import Prior
from .model import OFFICIAL_BLOCKS, BottleneckMode, ControlNet, LargeBottleneck


class ControlNetNotReleasedError(FileNotFoundError):
    """The official code defines this ControlNet, but no checkpoint was ever published."""


# --- the official configs ------------------------------------------------------------------------------

Filter = Literal["canny", "inpaint", "super_resolution", "identity"]

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
        files._CONTROLNETS["canny"],
        c_in=1,
        bottleneck_mode="effnet",
        proj_blocks=OFFICIAL_BLOCKS,
        filter="canny",
        filter_params={"resize": 224, "low": 100, "high": 200},
    ),
    "inpainting": ControlNetType(
        "inpainting",
        "repaint the masked part of a picture (inpainting, outpainting)",
        files._CONTROLNETS["inpainting"],
        c_in=4,
        bottleneck_mode="effnet",
        proj_blocks=OFFICIAL_BLOCKS,
        filter="inpaint",
    ),
    "super_resolution": ControlNetType(
        "super_resolution",
        "EfficientNet features of the half-size picture → the full-size picture",
        files._CONTROLNETS["super_resolution"],
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


def released_file(kind: ControlNetType) -> ModelFile:
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


def _count(tensors: Mapping[str, _TensorInfo], pattern: str) -> int:
    return len({m.group(1) for key in tensors if (m := re.fullmatch(pattern, key))})


def controlnet_shape(tensors: Mapping[str, _TensorInfo]) -> ControlNetShape:
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
        raise _WrongCheckpointError(f"not an official ControlNet checkpoint: no {missing} tensor") from None


# --- loading -------------------------------------------------------------------------------------------


def _blocks_for(prior: Prior, kind: ControlNetType) -> tuple[int, ...]:
    return TINY_BLOCKS if prior.architecture == "tiny" else kind.proj_blocks


def _check_fits(path: Path, shape: ControlNetShape, kind: ControlNetType, prior: Prior, command: str) -> None:
    if not shape.matches(kind):
        raise _WrongCheckpointError(
            f"{path} holds {shape.describe()}, but the {kind.name} ControlNet was asked for "
            f"({kind.bottleneck_mode!r} bottleneck, {kind.c_in} input channels). Load it as the type it is, "
            f"or fetch the {kind.name} one with:\n  {command}"
        )
    width = prior.unet.config.block_out_channels[0]
    if shape.c_proj != width:
        lite = " (Stage C lite)" if prior.architecture == "lite" else ""
        raise _WrongCheckpointError(
            f"{path} projects to Stage C width {shape.c_proj}, but this prior{lite} has width {width}. The "
            f"released ControlNets were trained for the big Stage C only: load_prior(models_dir, 'big')."
        )
    blocks = _blocks_for(prior, kind)
    if shape.projections != len(blocks):
        raise _WrongCheckpointError(
            f"{path} has {shape.projections} projections, but the {kind.name} config feeds "
            f"{len(blocks)} Stage C blocks {list(blocks)}"
        )


def load_controlnet(source: str | Path, kind: str | ControlNetType, prior: Prior) -> ControlNet:
    """A released ControlNet from a models folder (``controlnet/<name>.safetensors``) or a file, on the
    prior's device in the prior's dtype. Checked first: the file is complete, it holds the ControlNet
    type asked for, and it fits this Stage C (the released ones fit the big Stage C only).

    Args:
        source: a models folder, or the ControlNet's safetensors file itself.
        kind: "canny", "inpainting" or "super_resolution" (a key of :data:`CONTROLNET_TYPES`), or a type.
        prior: the loaded prior it will steer: its device, dtype, width and architecture.

    Returns:
        The ControlNet in eval mode, gradients off.

    Raises:
        MissingModelFileError: the folder lacks the file (with the command that fetches it).
        WrongCheckpointError: another ControlNet type, or one for another Stage C width or block count.
        CheckpointError: the file is damaged or cut short.
        ControlNetNotReleasedError: a type never published (face_identity).
        KeyError: an unknown kind.
    """
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    kind = controlnet_type(kind)
    file = released_file(kind)
    path = Path(source)
    command = _fetch_command(path, [file]) if path.is_dir() else files.download_command([file])
    if path.is_dir():
        _check_present(path, [file])
        path = path / file.path
    info, _ = _inspect_file(path, "controlnet", None, lambda: command)
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
