"""What each ControlNet sees: the official filters (canny, inpainting, super-resolution), the outpainting
canvas, and running a ControlNet once per generation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from torch.nn import functional as F
from torchvision.transforms import functional as TF

from .. import values
from ..effnet import encode as effnet_encode
from ..images import _WIDE_MODES, ImageInput, _picture_list, batch_images, image_to_tensor, resize_and_crop
from ..models import Prior
from ..sizes import _GENERATION, _encoder_input_size, check_size
from .kinds import _controlnet_type
from .model import ControlNet


def outpainting_canvas(
    image: ImageInput, height: int, width: int, *, top: float, bottom: float, left: float, right: float
) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """The picture shrunk onto a black canvas, as the official outpainting example pastes it, and the mask.

    Args:
        image: the picture; cut and scaled to fill the inner box.
        height, width: the canvas size in pixels.
        top, bottom, left, right: each border, as a fraction of the height or width (0: none).

    Returns:
        The RGB canvas, and its mode "L" mask: white (255) on the borders to extend, black inside.
    """
    for name, border in (("top", top), ("bottom", bottom), ("left", left), ("right", right)):
        values._fraction(border, name, "a fraction of the canvas")
    x0, x1 = round(left * width), round((1 - right) * width)
    y0, y1 = round(top * height), round((1 - bottom) * height)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(
            f"borders top={top}, bottom={bottom}, left={left}, right={right} leave no room inside"
        )
    canvas = PIL.Image.new("RGB", (width, height), "black")
    canvas.paste(TF.to_pil_image(resize_and_crop(image_to_tensor(image), y1 - y0, x1 - x0)), (x0, y0))
    mask = PIL.Image.new("L", (width, height), 255)
    mask.paste(0, (x0, y0, x1, y1))
    return canvas, mask


@dataclass
class ControlInput:
    """What the ControlNet sees (``tensor``, B×c_in×h×w) and a picture of it (``preview``, B×3×h×w)."""

    tensor: torch.Tensor
    preview: torch.Tensor


def _canny_edges(
    images: torch.Tensor, resize: int | None = 224, low: int = 100, high: int = 200
) -> torch.Tensor:
    """The official CannyFilter: 224² bilinear, cv2.Canny on truncated 8-bit RGB, resized back."""
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


def _inpaint_control(image: ImageInput, mask: ImageInput, size: tuple[int, int]) -> ControlInput:
    """The official InpaintFilter with the user's mask: masked pixels white, the mask appended."""
    if isinstance(mask, PIL.Image.Image) and mask.mode not in _WIDE_MODES:
        mask = mask.convert("L")  # alpha dropped: transparent does not mean "regenerate" (on white it would)
    grey = image_to_tensor(mask).mean(0, keepdim=True)
    pictures = [image_to_tensor(p) for p in _picture_list(image)]
    # stretched over each picture, then cut as it is (cut alone: 36 % drawn, 60 % used)
    stretched = [TF.resize(grey, list(p.shape[-2:]), antialias=True) for p in pictures]
    masks = torch.stack([resize_and_crop(m, *size) > 0.5 for m in stretched])
    images = torch.stack([resize_and_crop(p, *size) for p in pictures])
    masked = torch.where(masks, torch.ones_like(images), images)
    return ControlInput(torch.cat([masked, masks.float()], dim=1), masked)


def _control_size(height: int, width: int) -> tuple[int, int]:
    """The generation's size checked, and its EfficientNet input size: the official control size."""
    return _encoder_input_size(*check_size(height, width, _GENERATION))


def control_input(
    kind: str,
    image: ImageInput,
    height: int = 1024,
    width: int = 1024,
    *,
    mask: ImageInput | None = None,
    prior: Prior | None = None,
) -> ControlInput:
    """Apply ``kind``'s official filter to one picture or several (cut to the aspect ratio, scaled) for a
    height×width generation, at its EfficientNet input size (768² for 1024²).

    Args:
        kind: "canny", "inpainting" or "super_resolution" (a key of ``CONTROLNET_TYPES``).
        image: what :func:`cascade_helpers.images.batch_images` takes (super-resolution: the half-size one).
        height, width: the generation's size.
        mask: inpainting's: any black-and-white picture (white: regenerate; drawn with ``PIL.ImageDraw``,
            :func:`outpainting_canvas`'s ...), stretched over the picture, then cut as it is.
        prior: super-resolution's: the loaded prior (its EfficientNet encoder).

    Returns:
        :class:`ControlInput`.
    """
    kind = _controlnet_type(kind)
    size = _control_size(height, width)
    params = dict(kind.filter_params)
    if kind.filter == "canny":
        edges = _canny_edges(batch_images(image, *size), **params)
        return ControlInput(edges, edges.expand(-1, 3, -1, -1))
    if kind.filter == "inpaint":
        if mask is None:
            raise ValueError(
                "inpainting needs a mask, white where the picture is regenerated: any black-and-white "
                "picture (drawn with PIL.ImageDraw, a file, an array), or outpainting_canvas's"
            )
        return _inpaint_control(image, mask, size)
    if prior is None:
        raise ValueError(
            "super-resolution needs the prior (its EfficientNet encoder): control_input(..., prior=prior)"
        )
    # the official SREffnetFilter: the half-size picture's features, enlarged
    half = batch_images(image, *[round(side * params["scale_factor"]) for side in size])
    features = effnet_encode(prior.require("effnet", "super-resolution"), half, downscale=False)
    up = 1 / params["scale_factor"]
    return ControlInput(
        F.interpolate(features, scale_factor=up, mode="nearest"),
        F.interpolate(half.float().cpu(), scale_factor=up, mode="nearest"),
    )


def _control_tensor(controlnet: ControlNet, tensor: torch.Tensor) -> torch.Tensor:
    """Another type's control, integers or NaN named here, not met as a wrong picture."""
    if tensor.dim() != 4 or tensor.shape[1] != controlnet.c_in:
        raise ValueError(
            f"this ControlNet takes B×{controlnet.c_in}×H×W control input, got {tuple(tensor.shape)}: "
            f"prepare it with control_input() for the same ControlNet type"
        )
    if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
        raise ValueError(
            f"the control input must hold finite floats (control_input makes them), not {tensor.dtype} or NaN"
        )
    return tensor


@torch.no_grad()
def control_features(
    controlnet: ControlNet, control: ControlInput | torch.Tensor, strength: float = 1.0, batch: int = 1
) -> list[torch.Tensor | None]:
    """Run the ControlNet once, as the official notebook does per generation, its outputs scaled.

    Args:
        controlnet: the loaded ControlNet (:func:`load_controlnet`).
        control: what :func:`control_input` made, or its B×c_in×H×W float tensor.
        strength: the official ``cnet_multiplier``: 1.0, or 0.8 / 0.3 for a looser hold.
        batch: how many pictures the generation makes (its ``num_images``).

    Returns:
        One entry per Stage C ResBlock: the features for that block, or None.
    """
    strength = values._finite(strength, "strength", "the official cnet_multiplier: 1.0, or 0.8 / 0.3")
    if not (values._is_whole(batch) and batch >= 1):
        raise ValueError(f"batch must be the number of pictures (a whole number ≥ 1), not {batch!r}")
    tensor = _control_tensor(controlnet, control.tensor if isinstance(control, ControlInput) else control)
    if batch % tensor.shape[0]:
        raise ValueError(f"{tensor.shape[0]} control pictures cannot be spread over a batch of {batch}")
    weight = next(controlnet.parameters())
    outputs = controlnet(tensor.to(weight.device, weight.dtype))
    repeats = batch // tensor.shape[0]
    return [None if o is None else (o * strength).repeat_interleave(repeats, 0) for o in outputs]
