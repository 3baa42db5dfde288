"""The three released ControlNets' official configs (:data:`CONTROLNET_TYPES`) and :func:`load_controlnet`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .. import files
from ..checkpoints import _TensorInfo, _WrongCheckpointError
from ..file_checks import _check_present, _fetch_command, _inspect_file
from ..files import ModelFile
from ..models import Prior
from .model import ControlNet, resblock_order

_OFFICIAL_BLOCKS = (0, 4, 8, 12, 51, 55, 59, 63)  # the big Stage C's ResBlocks the released ones feed


@dataclass(frozen=True)
class _ControlNetType:
    """One official config (configs/inference/controlnet_c_3b_*.yaml): users pick it by name."""

    name: str
    file: ModelFile
    description: str
    c_in: int
    bottleneck_mode: str
    filter: str
    filter_params: Mapping[str, float] = field(default_factory=dict)
    proj_blocks: tuple[int, ...] = _OFFICIAL_BLOCKS


CONTROLNET_TYPES: dict[str, _ControlNetType] = {
    name: _ControlNetType(name, files._CONTROLNETS[name], *config)
    for name, *config in [
        ("canny", "follow the edges of a picture (OpenCV Canny)", 1, "effnet", "canny",
         {"resize": 224, "low": 100, "high": 200}),
        ("inpainting", "repaint the masked part of a picture (inpainting, outpainting)", 4, "effnet", "inpaint"),
        ("super_resolution", "EfficientNet features of the half-size picture → the full-size one", 16, "large",
         "super_resolution", {"scale_factor": 0.5}),
    ]
}  # fmt: skip


def _controlnet_type(kind: str) -> _ControlNetType:
    """A ControlNet by name; one message for a typo and for the never-released face_identity."""
    if kind in CONTROLNET_TYPES:
        return CONTROLNET_TYPES[kind]
    released = ", ".join(CONTROLNET_TYPES)
    if kind == "face_identity":
        raise ValueError(
            "the face_identity ControlNet is defined in the official code, but its checkpoint was never "
            f"published (it was uploaded to the Hub and deleted): there is nothing to load. Released: {released}"
        )
    raise ValueError(f"unknown ControlNet {kind!r}: use one of {released}")


def _fed_blocks(unet: nn.Module, kind: _ControlNetType) -> list[int]:
    """The official blocks this Stage C has (the tiny one: 0, 4): one projection each in a file."""
    count = len(resblock_order(unet))
    return [block for block in kind.proj_blocks if block < count]


def _controlnet_shape(tensors: Mapping[str, _TensorInfo]) -> tuple[str, int, int, int]:
    """Bottleneck, input channels, projection width and count from the header: what a file is."""
    try:
        c_proj = tensors["projections.0.2.weight"].shape[0]
        projections = len({m[1] for k in tensors if (m := re.fullmatch(r"projections\.(\d+)\.0\.weight", k))})
        if "backbone.0.1.running_mean" in tensors:  # EfficientNet: stem convolution + BatchNorm
            return "effnet", tensors["backbone.0.0.weight"].shape[1], c_proj, projections
        if "backbone.3.blocks.0.weight" in tensors:  # 1×1 convolutions, then residual blocks
            return "large", tensors["backbone.0.weight"].shape[1], c_proj, projections
    except KeyError as missing:
        raise _WrongCheckpointError(f"not an official ControlNet checkpoint: no {missing} tensor") from None
    raise _WrongCheckpointError("not a released ControlNet: its bottleneck is neither 'effnet' nor 'large'")


def _check_fits(
    path: Path, tensors: Mapping[str, _TensorInfo], kind: _ControlNetType, prior: Prior, command: str
) -> None:
    """Another type, another Stage C width or block count: each named before loading, with what to do."""
    bottleneck, c_in, c_proj, projections = _controlnet_shape(tensors)
    if (bottleneck, c_in) != (kind.bottleneck_mode, kind.c_in):
        known = [
            k.name for k in CONTROLNET_TYPES.values() if (k.bottleneck_mode, k.c_in) == (bottleneck, c_in)
        ]
        raise _WrongCheckpointError(
            f"{path} holds {f'the {known[0]}' if known else 'an unknown'} ControlNet ({bottleneck!r} bottleneck, "
            f"{c_in} input channels), but the {kind.name} ControlNet was asked for ({kind.bottleneck_mode!r} "
            f"bottleneck, {kind.c_in} input channels). Load it as the type it is, or fetch the {kind.name} one "
            f"with:\n  {command}"
        )
    width = prior.unet.config.block_out_channels[0]
    if c_proj != width:
        lite = " (Stage C lite)" if prior.architecture == "lite" else ""
        raise _WrongCheckpointError(
            f"{path} projects to Stage C width {c_proj}, but this prior{lite} has width {width}. The "
            f"released ControlNets were trained for the big Stage C only: load_prior(models_dir, 'big')."
        )
    if projections != len(blocks := _fed_blocks(prior.unet, kind)):
        raise _WrongCheckpointError(
            f"{path} has {projections} projections, but the {kind.name} config feeds {len(blocks)} blocks "
            f"of this Stage C {blocks}"
        )


def load_controlnet(source: str | Path, kind: str, prior: Prior) -> ControlNet:
    """A released ControlNet on the prior's device in its dtype, its file checked first: missing
    (``MissingModelFileError``, with the command that fetches it), damaged, of another type, or for another
    Stage C (``CheckpointError``; the released ones fit the big Stage C only).

    Args:
        source: a models folder (``controlnet/<name>.safetensors`` in it), or the file itself.
        kind: "canny", "inpainting" or "super_resolution" (a key of :data:`CONTROLNET_TYPES`).
        prior: the loaded prior it will steer.

    Returns:
        The ControlNet in eval mode, gradients off.
    """
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    kind = _controlnet_type(kind)
    path = Path(source)
    command = _fetch_command(path, [kind.file]) if path.is_dir() else files.download_command([kind.file])
    if path.is_dir():
        _check_present(path, [kind.file])
        path = path / kind.file.path
    info, _ = _inspect_file(path, "controlnet", None, lambda: command)
    _check_fits(path, info.tensors, kind, prior, command)
    width = prior.unet.config.block_out_channels[0]
    with init_empty_weights():
        controlnet = ControlNet(kind.c_in, width, _fed_blocks(prior.unet, kind), kind.bottleneck_mode)
    state = {k: v.to(prior.dtype) if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    controlnet.load_state_dict(state, strict=True, assign=True)
    return controlnet.to(prior.device).eval().requires_grad_(False)
