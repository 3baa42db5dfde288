"""controlnet_aux's detectors (what SD/SDXL users make control pictures with) for the canny ControlNet, and
:func:`edge_agreement`: how far their edges are from the official filter's, which canny was trained on."""

from __future__ import annotations

import difflib
import inspect
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from .. import values
from ..images import ImageInput, _to_unit, batch_images, image_to_tensor, to_pil
from .filters import ControlInput, _control_size

_WEIGHT_FREE = {"canny": "CannyDetector", "lineart_standard": "LineartStandardDetector"}  # no download
_ANNOTATORS_REPO = "lllyasviel/Annotators"  # where controlnet_aux's other detectors load weights from
_LINE_KINDS = ("canny", "lineart", "softedge", "scribble", "mlsd")  # processor names that draw lines


def _aux_detector(name: str):
    """A weight-free controlnet_aux detector by name; any other name is told what it needs instead."""
    with warnings.catch_warnings():  # mediapipe, timm and torch.jit notices, none about these detectors
        warnings.simplefilter("ignore")
        import controlnet_aux as aux
        import controlnet_aux.processor
    if name in _WEIGHT_FREE:
        return getattr(aux, _WEIGHT_FREE[name])()
    offered = ", ".join(repr(n) for n in _WEIGHT_FREE)
    known = aux.processor.MODELS
    if name in known and known[name]["checkpoint"] and name.startswith(_LINE_KINDS):
        cls = known[name]["class"].__name__
        raise ValueError(
            f"controlnet_aux's {name!r} detector ({cls}) needs weights, which it downloads from the Hub "
            f"repo {_ANNOTATORS_REPO}: with internet, run `detector = controlnet_aux.{cls}.from_pretrained("
            f"{_ANNOTATORS_REPO!r})` once (they are cached), then pass `detector` instead of {name!r}. "
            f"Without a download: {offered}"
        )
    if name in known:  # depth, pose, normals, shuffles, faces: no Stable Cascade ControlNet reads them
        raise ValueError(
            f"controlnet_aux's {name!r} makes control pictures for SD ControlNets of its own kind: no "
            f"released Stable Cascade ControlNet reads them (canny reads lines). Line detectors: {offered}"
        )
    raise ValueError(f"unknown controlnet_aux detector {name!r}: without weights, choose {offered}")


def _check_options(detector: Any, options: dict[str, Any]) -> None:
    """Detectors ignore ``**kwargs`` they do not know: a mistyped ``low_treshold=1`` would run defaults."""
    try:
        parameters = inspect.signature(detector).parameters.values()
    except (TypeError, ValueError):  # a callable without a signature Python can read
        return
    named = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)][1:]
    for option in options:
        if named and option not in named:
            close = difflib.get_close_matches(option, named, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise TypeError(
                f"{type(detector).__name__} has no option {option!r}: {hint}it takes {', '.join(named)}"
            )


def aux_control_input(
    detector: str | Any, image: ImageInput, height: int = 1024, width: int = 1024, **options: Any
) -> ControlInput:
    """A control picture for the canny ControlNet made by a controlnet_aux detector instead of the official
    filter, at the size :func:`.filters.control_input` makes (768² for 1024²), made grey.

    Args:
        detector: ``"canny"`` or ``"lineart_standard"`` (they need no weights), or a detector object
            (``controlnet_aux.HEDdetector.from_pretrained("lllyasviel/Annotators")`` ...).
        image: the picture, or several: one control picture each.
        height, width: the generation's size.
        **options: passed to the detector (``low_threshold`` ...); one it does not take is a TypeError.

    Returns:
        A :class:`ControlInput` with a B×1×h×w tensor in [0, 1].
    """
    if isinstance(detector, str):
        detector = _aux_detector(detector)
    _check_options(detector, options)
    size = _control_size(height, width)
    drawn = [
        detector(picture, **{"output_type": "pil", **options})
        for picture in to_pil(batch_images(image, *size))
    ]
    grey = torch.stack([image_to_tensor(np.asarray(d)).mean(0, keepdim=True) for d in drawn])
    if tuple(grey.shape[-2:]) != size:
        grey = F.interpolate(grey, size=size, mode="bilinear").clamp(0, 1)
    return ControlInput(grey, grey.expand(-1, 3, -1, -1))


@dataclass(frozen=True)
class EdgeAgreement:
    """How two edge maps agree, each made black and white at a threshold: ``iou``, edge pixels in both /
    in either (1: the same edges); ``differing``, the share of pixels that are an edge in one map only;
    ``coverage_a``, ``coverage_b``, the share of pixels that are edges in each map."""

    iou: float
    differing: float
    coverage_a: float
    coverage_b: float


def edge_agreement(a: torch.Tensor, b: torch.Tensor, threshold: float = 0.5) -> EdgeAgreement:
    """Compare two edge maps of one picture.

    Args:
        a, b: same-size tensors or arrays (e.g. two ``ControlInput.tensor``): floats in [0, 1], or 0-255
            integers, read as pictures are.
        threshold: a pixel is an edge above it, on the 0-1 scale (maps resized bilinearly have soft edges).

    Returns:
        An :class:`EdgeAgreement`.
    """
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"edge maps of different sizes: {tuple(a.shape)} and {tuple(b.shape)}")
    threshold = values._fraction(threshold, "threshold", "a pixel above it is an edge")
    if threshold == 1.0:  # no pixel of a [0, 1] map is above 1: both maps would look empty and "agree"
        raise ValueError("threshold must be below 1: no pixel of an edge map in [0, 1] is above 1")
    edges_a = _to_unit(a.detach().cpu(), "edge map a") > threshold
    edges_b = _to_unit(b.detach().cpu(), "edge map b") > threshold
    either = (edges_a | edges_b).sum().item()
    iou = (edges_a & edges_b).sum().item() / either if either else 1.0
    share = [m.float().mean().item() for m in (edges_a ^ edges_b, edges_a, edges_b)]
    return EdgeAgreement(iou, *share)
