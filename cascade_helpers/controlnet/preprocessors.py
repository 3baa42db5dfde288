"""controlnet_aux's preprocessors as control-picture sources for the canny ControlNet, and a measure of
how far their edges are from the official filter's.

Users of the SD/SDXL ControlNets make their control pictures with ``controlnet_aux``. The Stable
Cascade canny ControlNet was trained on the official filter (:func:`.filters.canny_edges`: 224 px,
``cv2.Canny(100, 200)``, resized back), which stays the default; ``controlnet_aux.CannyDetector``
detects at 512 px and resizes with other kernels, so it draws other edges. A ControlNet follows
best the kind of picture it was trained on: :func:`edge_agreement` measures the difference, and the
ControlNet notebook shows the pictures each control gives.

Only the detectors that need no weights are built here by name (:data:`WEIGHT_FREE`), and only
those that draw lines, the one kind of control picture a released Stable Cascade ControlNet reads.
The others download their weights from the Hub (``lllyasviel/Annotators``): asking for one by name
says how to load it; a loaded detector object can then be passed instead of the name.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from .. import values
from ..images import ImageInput, batch_images, image_to_tensor, to_pil
from .filters import ControlInput, control_size

#: name → controlnet_aux class of the detectors that need no download and draw lines
WEIGHT_FREE: dict[str, str] = {"canny": "CannyDetector", "lineart_standard": "LineartStandardDetector"}
#: the Hub repo controlnet_aux's other detectors load their weights from
ANNOTATORS_REPO = "lllyasviel/Annotators"
#: controlnet_aux.processor names of detectors that draw lines (the canny ControlNet's kind of picture)
_LINE_KINDS = ("canny", "lineart", "softedge", "scribble", "mlsd")


class DetectorWeightsNeededError(RuntimeError):
    """The controlnet_aux detector asked for by name downloads its weights from the Hub first."""


def _controlnet_aux():
    """Import controlnet_aux without its import-time chatter: a warning that the optional mediapipe is
    missing, timm registry notices and a torch.jit deprecation, none of which concern the detectors
    used here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import controlnet_aux
        import controlnet_aux.processor
    return controlnet_aux


def aux_detector(name: str):
    """A controlnet_aux detector that needs no weights, by name (:data:`WEIGHT_FREE`).

    Args:
        name: ``"canny"`` or ``"lineart_standard"``; the names of ``controlnet_aux.processor``
            (``"softedge_hed"``, ``"depth_midas"`` ...) get an error saying what they need.

    Returns:
        The detector, called as ``detector(picture, **options)``.

    Raises:
        DetectorWeightsNeededError: the detector downloads weights first; the message says how.
        ValueError: no released Stable Cascade ControlNet reads that kind of picture, or an unknown name.
    """
    aux = _controlnet_aux()
    if name in WEIGHT_FREE:
        return getattr(aux, WEIGHT_FREE[name])()
    offered = ", ".join(repr(n) for n in WEIGHT_FREE)
    known = aux.processor.MODELS
    draws_lines = name.startswith(_LINE_KINDS)
    if name in known and known[name]["checkpoint"] and draws_lines:
        cls = known[name]["class"].__name__
        raise DetectorWeightsNeededError(
            f"controlnet_aux's {name!r} detector ({cls}) needs weights, which it downloads from the Hub "
            f"repo {ANNOTATORS_REPO}: with internet, run `detector = controlnet_aux.{cls}.from_pretrained("
            f"{ANNOTATORS_REPO!r})` once (they are cached), then pass `detector` instead of {name!r}. "
            f"Without a download: {offered}"
        )
    if name in known:  # depth, pose, normals, shuffles, faces: no Stable Cascade ControlNet reads them
        raise ValueError(
            f"controlnet_aux's {name!r} makes control pictures for SD ControlNets of its own kind: no "
            f"released Stable Cascade ControlNet reads them (canny reads lines). Line detectors: {offered}"
        )
    raise ValueError(f"unknown controlnet_aux detector {name!r}: without weights, choose {offered}")


def aux_control_input(
    detector: str | Any,
    image: ImageInput,
    height: int = 1024,
    width: int = 1024,
    **options: Any,
) -> ControlInput:
    """A control picture for the canny ControlNet made by a controlnet_aux detector instead of the
    official filter, at the same size as :func:`.filters.control_input` prepares it.

    The picture is scaled and centre-cropped to the control size (768² for a 1024² generation) and
    handed to the detector as 8-bit RGB, as users hand it pictures; the detector's output (its own
    resolution, controlnet_aux's defaults unless ``options`` say otherwise) is made grey and resized
    bilinearly to the control size.

    Args:
        detector: a name of :data:`WEIGHT_FREE`, or a detector object (one loaded with
            ``from_pretrained``, see :func:`aux_detector`).
        image: the picture (file, PIL image, array or tensor), or several: one control picture each.
        height, width: the generation's size.
        **options: passed to the detector (e.g. ``low_threshold``, ``detect_resolution``).

    Returns:
        A :class:`ControlInput` with a B×1×h×w tensor in [0, 1], what the canny ControlNet reads.
    """
    if isinstance(detector, str):
        detector = aux_detector(detector)
    size = control_size(height, width)
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
    """How two edge maps agree, each made black and white at a threshold.

    ``iou``: edge pixels in both / edge pixels in either (1 = the same edges, 0 = none shared);
    ``differing``: the fraction of all pixels that are an edge in one map only;
    ``coverage_a``, ``coverage_b``: the fraction of pixels that are edges in each map.
    """

    iou: float
    differing: float
    coverage_a: float
    coverage_b: float


def edge_agreement(a: torch.Tensor, b: torch.Tensor, threshold: float = 0.5) -> EdgeAgreement:
    """Compare two edge maps of one picture (tensors of the same size, values in [0, 1]).

    Args:
        a, b: the edge maps, e.g. ``control.tensor`` of two :class:`ControlInput`.
        threshold: a pixel is an edge above it (maps resized bilinearly have soft edges).

    Returns:
        An :class:`EdgeAgreement`.
    """
    if a.shape != b.shape:
        raise ValueError(f"edge maps of different sizes: {tuple(a.shape)} and {tuple(b.shape)}")
    threshold = values._fraction(threshold, "threshold", "a pixel above it is an edge")
    if threshold == 1.0:  # no pixel of a [0, 1] map is above 1: both maps would look empty and "agree"
        raise ValueError("threshold must be below 1: no pixel of an edge map in [0, 1] is above 1")
    edges_a, edges_b = a > threshold, b > threshold
    either = (edges_a | edges_b).sum().item()
    return EdgeAgreement(
        iou=(edges_a & edges_b).sum().item() / either if either else 1.0,
        differing=(edges_a ^ edges_b).float().mean().item(),
        coverage_a=edges_a.float().mean().item(),
        coverage_b=edges_b.float().mean().item(),
    )
