"""Getting pictures in and out: any PIL mode, file, array or tensor in; float tensors and PIL out.

Inside the package an image is a float tensor in [0, 1], channels first (3×H×W, or B×3×H×W).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

ImageInput = PIL.Image.Image | torch.Tensor | np.ndarray | str | os.PathLike
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL mode to RGB; transparency becomes white (what a viewer shows behind it), not black."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def image_to_tensor(image: ImageInput) -> torch.Tensor:
    """One picture → 3×H×W float tensor in [0, 1]. Tensors and arrays may be H×W, H×W×C or C×H×W,
    uint8 (0-255) or float (0-1); one channel is repeated to three, a fourth (alpha) dropped."""
    if isinstance(image, (str, os.PathLike)):
        with PIL.Image.open(image) as opened:
            opened.load()  # read the pixels before the file closes: an RGB picture is passed on as is
            image = to_rgb(opened)
    if isinstance(image, PIL.Image.Image):
        return TF.to_tensor(to_rgb(image))
    # a copy: arrays from np.asarray(PIL image) are read-only, which torch warns about
    tensor = torch.as_tensor(np.array(image) if isinstance(image, np.ndarray) else image)
    if tensor.dtype == torch.uint8:
        tensor = tensor.float() / 255
    tensor = tensor.float()
    if tensor.dim() == 2:
        tensor = tensor[None]
    elif tensor.dim() == 3 and tensor.shape[-1] in (1, 3, 4) and tensor.shape[0] not in (1, 3, 4):
        tensor = tensor.permute(2, 0, 1)
    if tensor.dim() != 3:
        raise ValueError(
            f"expected one image (H×W, H×W×C or C×H×W), got a tensor of shape {tuple(tensor.shape)}"
        )
    tensor = tensor[:3] if tensor.shape[0] >= 3 else tensor[:1].expand(3, -1, -1)
    return tensor.clamp(0, 1)


def images_in_folder(folder: str | os.PathLike) -> list[Path]:
    """The picture files in a folder, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def resize_and_crop(
    image: torch.Tensor, height: int, width: int, position: tuple[float, float] | None = None
) -> torch.Tensor:
    """Scale so the picture covers height×width, then cut the centre: no stretching, no borders.

    Args:
        image: 3×H×W or B×3×H×W.
        height, width: the size wanted.
        position: where the window sits in what overhangs, (top, left) from 0 to 1 each; None is
            the centre. LoRA training's random crop draws it.
    """
    h, w = image.shape[-2:]
    scale = max(height / h, width / w)
    size = [max(height, round(h * scale)), max(width, round(w * scale))]
    resized = TF.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
    if position is None:
        return TF.center_crop(resized, [height, width])
    top, left = round((size[0] - height) * position[0]), round((size[1] - width) * position[1])
    return TF.crop(resized, top, left, height, width)


def scale_short_side(image: torch.Tensor, side: int) -> torch.Tensor:
    """Bilinear, antialiased resize to a short side of ``side`` px, aspect ratio kept: the official
    notebooks' ``resize_image`` (768 px) for every input picture."""
    return TF.resize(image, side, interpolation=InterpolationMode.BILINEAR, antialias=True)


def batch_images(images: ImageInput | Sequence[ImageInput], height: int, width: int) -> torch.Tensor:
    """One or several pictures → B×3×height×width, each scaled and centre-cropped."""
    if isinstance(images, (str, os.PathLike)) and Path(images).is_dir():
        images = images_in_folder(images)
    if not isinstance(images, Sequence) or isinstance(images, (str, os.PathLike)):
        images = [images]
    return torch.stack([resize_and_crop(image_to_tensor(i), height, width) for i in images])


def to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """B×3×H×W (or 3×H×W) in [0, 1] → PIL images."""
    if images.dim() == 3:
        images = images[None]
    arrays = (
        (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )
    return [PIL.Image.fromarray(a) for a in arrays]


def as_pil_list(images) -> list[PIL.Image.Image]:
    if isinstance(images, torch.Tensor):
        return to_pil(images)
    return list(images)


def image_grid(images, columns: int | None = None) -> PIL.Image.Image:
    """Paste pictures (PIL list or B×3×H×W tensor) into one grid image, row by row."""
    pictures = as_pil_list(images)
    if not pictures:
        raise ValueError("no pictures to put in a grid")
    columns = columns or len(pictures)
    rows = -(-len(pictures) // columns)
    width, height = max(p.width for p in pictures), max(p.height for p in pictures)
    grid = PIL.Image.new("RGB", (columns * width, rows * height), "white")
    for i, picture in enumerate(pictures):
        grid.paste(picture.convert("RGB"), ((i % columns) * width, (i // columns) * height))
    return grid
