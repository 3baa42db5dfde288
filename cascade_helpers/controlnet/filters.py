"""What each ControlNet sees: the official filters (canny, inpainting, super-resolution), the mask
helpers for inpainting and outpainting, and running a ControlNet once per generation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageOps
import torch
from torch.nn import functional as F
from torchvision.transforms import functional as TF

from .. import values
from ..effnet import encode as effnet_encode
from ..images import WIDE_MODES, ImageInput, batch_images, image_to_tensor, resize_and_crop
from ..models import Prior
from ..sizes import _GENERATION, _encoder_input_size, check_size
from .kinds import ControlNetType, controlnet_type, released_file
from .model import ControlNet

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
    """White (regenerate) inside ``box`` = (left, top, right, bottom) in fractions, black elsewhere.

    Args:
        height, width: the mask's size in pixels.
        box: (left, top, right, bottom), fractions of the width and height, 0 ≤ left < right ≤ 1
            (same for top, bottom).

    Returns:
        A mode "L" picture, 255 inside, 0 outside.

    Raises:
        ValueError: a box outside [0, 1] or with left ≥ right or top ≥ bottom.
    """
    return _mask_picture(height, width, lambda d: d.rectangle(_pixels(box, height, width), fill=255))


def ellipse_mask(height: int, width: int, box: Box) -> PIL.Image.Image:
    """White inside the ellipse that fills ``box`` (fractions), black elsewhere.

    Args:
        height, width, box: as for :func:`rectangle_mask`.

    Returns:
        A mode "L" picture, 255 inside the ellipse, 0 outside.
    """
    return _mask_picture(height, width, lambda d: d.ellipse(_pixels(box, height, width), fill=255))


def _inner_box(top: float, bottom: float, left: float, right: float) -> Box:
    return left, top, 1 - right, 1 - bottom


def border_mask(
    height: int, width: int, top: float, bottom: float, left: float, right: float
) -> PIL.Image.Image:
    """White on the borders (fractions of the height / width), black inside: outpainting.

    Args:
        height, width: the mask's size in pixels.
        top, bottom, left, right: each border's width as a fraction of the height (top, bottom) or
            width (left, right); 0 leaves that side black.

    Returns:
        A mode "L" picture, 255 on the borders, 0 inside.
    """
    return PIL.ImageOps.invert(rectangle_mask(height, width, _inner_box(top, bottom, left, right)))


def outpainting_canvas(
    image: ImageInput, height: int, width: int, *, top: float, bottom: float, left: float, right: float
) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """The picture shrunk into the middle of a black height×width canvas, and the border mask around it
    (the official outpainting example pastes the picture on a larger black canvas the same way).

    Args:
        image: the picture (file, PIL image, array or tensor); scaled and centre-cropped to fill the
            inner box.
        height, width: the canvas size in pixels.
        top, bottom, left, right: the borders to outpaint, as for :func:`border_mask`.

    Returns:
        The RGB canvas, and its :func:`border_mask` (white where the picture is to be extended).
    """
    x0, y0, x1, y1 = _pixels(_inner_box(top, bottom, left, right), height, width)
    inner = resize_and_crop(image_to_tensor(image), y1 + 1 - y0, x1 + 1 - x0)
    canvas = PIL.Image.new("RGB", (width, height), "black")
    canvas.paste(TF.to_pil_image(inner), (x0, y0))
    return canvas, border_mask(height, width, top, bottom, left, right)


def mask_tensor(mask: ImageInput, height: int, width: int) -> torch.Tensor:
    """Any black-and-white picture (PIL of any mode, array, tensor, bool or float, file) → a 1×1×H×W
    bool mask at height×width, scaled and centre-cropped like the picture. True (white) = regenerate.

    Args:
        mask: the mask picture; a PIL image's alpha is dropped, grey above 0.5 counts as white.
        height, width: the size of the pictures it masks, in pixels.

    Returns:
        1×1×height×width bool, CPU.
    """
    if isinstance(mask, PIL.Image.Image) and mask.mode not in WIDE_MODES:  # 16-bit: scaled, not clipped
        mask = mask.convert("L")  # alpha dropped: a mask's transparent pixels are not "regenerate"
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
    8-bit RGB picture (truncated, not rounded, as there), resized back bilinearly. B×1×H×W in [0, 1].

    Args:
        images: B×3×H×W in [0, 1], any device.
        resize: the square side the edges are found at (official: 224); None finds them at H×W.
        low, high: Canny's hysteresis thresholds (official: 100, 200).

    Returns:
        B×1×H×W edges in [0, 1], float32, CPU.
    """
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
    kept in its git repository; here the mask is always the user's.

    Args:
        images: B×3×H×W in [0, 1].
        mask: 1×1×H×W (or B×1×H×W), True or nonzero where the picture is regenerated
            (:func:`mask_tensor`).

    Returns:
        B×4×H×W on the pictures' device, in their dtype.
    """
    mask = mask.to(images.device).bool()
    masked = torch.where(mask, torch.ones_like(images), images)
    return torch.cat([masked, mask.to(images.dtype).expand(images.shape[0], -1, -1, -1)], dim=1)


@torch.no_grad()
def super_resolution_control(
    prior: Prior, half_size: torch.Tensor, scale_factor: float = 0.5
) -> ControlInput:
    """The official ``SREffnetFilter`` from the half-size picture on: EfficientNet features of it,
    enlarged 1/scale_factor× (nearest), and the picture enlarged the same way to show.

    Args:
        prior: a prior loaded with ``effnet=True``.
        half_size: B×3×h×w in [0, 1], already at the encoder's input size × ``scale_factor``
            (no 3/4 step: ``encode(..., downscale=False)``).
        scale_factor: the official 0.5.

    Returns:
        :class:`ControlInput`: B×16 features (float32, on the encoder's device) and the enlarged
        picture (float32, CPU).

    Raises:
        ValueError: the prior was loaded without its EfficientNet encoder.
    """
    encoder = prior.require("effnet", "super-resolution")
    features = effnet_encode(encoder, half_size, downscale=False)
    up = 1 / scale_factor
    return ControlInput(
        F.interpolate(features, scale_factor=up, mode="nearest"),
        F.interpolate(half_size.float().cpu(), scale_factor=up, mode="nearest"),
    )


def control_size(height: int, width: int) -> tuple[int, int]:
    """The size control pictures are prepared at: the EfficientNet input size of the generation (768²
    for 1024²), the size the official examples ran the ControlNets at.

    Args:
        height, width: the generation's picture size in pixels (checked: the sizes generation takes).

    Returns:
        ``(height, width)`` of the control picture.
    """
    return _encoder_input_size(*check_size(height, width, _GENERATION))


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
    the ``prior`` (its EfficientNet encoder) and treats the picture as the half-size one.

    Args:
        kind: "canny", "inpainting" or "super_resolution" (a key of ``CONTROLNET_TYPES``), or a type.
        image: one picture or several (as :func:`cascade_helpers.images.batch_images` takes them).
        height, width: the generation's size; the control picture is made at :func:`control_size`.
        mask: for inpainting: the mask picture (:func:`rectangle_mask`, :func:`border_mask`, a file ...).
        prior: for super-resolution: the loaded prior.

    Returns:
        :class:`ControlInput`: the ControlNet's input (B×c_in×h×w) and a picture of it to show.

    Raises:
        ValueError: inpainting without ``mask``, super-resolution without ``prior``.
        KeyError: an unknown kind.
        ControlNetNotReleasedError: a type whose checkpoint was never published (face_identity).
    """
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
    released_file(kind)
    raise NotImplementedError(kind.filter)


@torch.no_grad()
def control_features(
    controlnet: ControlNet, control: ControlInput | torch.Tensor, strength: float = 1.0, batch: int = 1
) -> list[torch.Tensor | None]:
    """Run the ControlNet once and scale its outputs by ``strength``, repeated for ``batch`` pictures
    from one control picture (the official notebook runs it once per generation too).

    Args:
        controlnet: the loaded ControlNet (:func:`load_controlnet`).
        control: what :func:`control_input` made, or its B×c_in×H×W tensor.
        strength: the official ``cnet_multiplier``: 1.0, or 0.8 / 0.3 for a looser hold.
        batch: how many pictures the generation makes (its ``num_images``).

    Returns:
        One entry per Stage C ResBlock: the features for that block, or None.
    """
    strength = values._finite(strength, "strength", "the official cnet_multiplier: 1.0, or 0.8 / 0.3")
    if not (values._is_whole(batch) and batch >= 1):
        raise ValueError(f"batch must be the number of pictures (a whole number ≥ 1), not {batch!r}")
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
