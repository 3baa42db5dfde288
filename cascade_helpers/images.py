"""Getting pictures in and out: any PIL mode, file, array or tensor in; float tensors and PIL out.

Inside the package an image is a float tensor in [0, 1], channels first (3×H×W, or B×3×H×W). Every
picture enters through :func:`image_to_tensor`, which also turns files and PIL images upright by their
EXIF orientation (a phone stores a portrait sideways, with Orientation 6, and viewers turn it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from . import values

ImageInput = PIL.Image.Image | torch.Tensor | np.ndarray | str | os.PathLike
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# PIL modes whose pixels are not 8-bit: 16-bit grey (16-bit PNG and TIFF files, in each byte order),
# 32-bit integers (what older Pillow made of 16-bit files) and 32-bit floats
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_SIXTEEN_BIT = 65535
# a float picture may overshoot [0, 1] by rounding; by more than an 8-bit step it was meant otherwise
_FLOAT_TOLERANCE = 1 / 255
# EXIF orientations that turn a picture a quarter turn (transposed or rotated): width and height swap
_SIDEWAYS = (5, 6, 7, 8)
_ORIENTATION = 0x0112


def _wide_grey(image: PIL.Image.Image) -> np.ndarray:
    """A 16-bit, 32-bit integer or float grey picture → H×W float32 in [0, 1]. PIL's own
    ``convert("RGB")`` clips these to 255 (all white) or truncates floats to 0 or 1 (all black).
    Integer modes are 16-bit pictures (0–65535); float pictures must hold 0–1."""
    values = np.asarray(image)
    if image.mode == "F":
        return _unit_floats(torch.from_numpy(values.astype(np.float32)), "a mode 'F' picture").numpy()
    values = values.astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > _SIXTEEN_BIT):
        raise ValueError(
            f"a mode {image.mode!r} picture holds values from {values.min()} to {values.max()}: integer pictures "
            f"of this mode are read as 16-bit (0-{_SIXTEEN_BIT}). Scale it to 0-255 (mode 'L') or 0-1 first"
        )
    return (values / _SIXTEEN_BIT).astype(np.float32)


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any 8-bit PIL mode to RGB with transparency on white (what a viewer shows behind it): PIL's own
    ``convert("RGB")`` puts it on black."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _upright_size(image: PIL.Image.Image) -> tuple[int, int]:
    """(width, height) once the EXIF orientation is applied, from the header alone: training picks a
    picture's aspect bucket before (or without) decoding it."""
    width, height = image.size
    return (height, width) if image.getexif().get(_ORIENTATION) in _SIDEWAYS else (width, height)


def _open(path: str | os.PathLike) -> torch.Tensor:
    """A picture file → 3×H×W in [0, 1], naming the file when it cannot be read (PIL's "image file is
    truncated" does not say which)."""
    try:
        with PIL.Image.open(path) as opened:
            opened.load()  # read the pixels before the file closes
            return _pil_to_tensor(opened)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except (OSError, SyntaxError, ValueError) as error:  # PIL raises all three for damaged files
        raise OSError(
            f"{path} cannot be read as a picture ({error}): the file is damaged, cut short or not a picture. "
            "Open it in an image viewer, or copy it again"
        ) from error


def _pil_to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """The one way a PIL picture becomes pixels: upright (EXIF), 16-bit and float grey scaled, not clipped."""
    image = PIL.ImageOps.exif_transpose(image)
    if image.mode in _WIDE_MODES:  # no 8-bit round trip: keep the 16-bit precision
        return torch.from_numpy(_wide_grey(image))[None].expand(3, -1, -1).contiguous()
    return TF.to_tensor(_to_rgb(image))


def _unit_floats(values: torch.Tensor, what: str) -> torch.Tensor:
    """Float pixels → [0, 1], refusing what is not a 0–1 picture: NaN and infinities (black
    pictures later), and values beyond [0, 1] (0–255 or −1–1 data, which clamping would turn into
    an all-white or half-black picture)."""
    if not torch.isfinite(values).all():
        raise ValueError(f"{what} holds NaN or infinite values: a picture needs finite pixels")
    low, high = values.min().item(), values.max().item()
    if low < -_FLOAT_TOLERANCE or high > 1 + _FLOAT_TOLERANCE:
        if low >= 0 and high <= 255:
            hint = "values up to 255: divide by 255, or pass uint8 (integer) values"
        elif low >= -1 - _FLOAT_TOLERANCE and high <= 1 + _FLOAT_TOLERANCE:
            hint = "values from -1 to 1: pass (x + 1) / 2"
        else:
            hint = "scale it to 0-1 first"
        raise ValueError(
            f"{what} holds floats from {low:.4g} to {high:.4g}, but float pictures must hold 0-1 ({hint})"
        )
    return values.clamp(0, 1)


def _to_unit(values: torch.Tensor, what: str) -> torch.Tensor:
    """Array or tensor pixels of any dtype → float32 in [0, 1]: bool as 0/1, integers as 0–255,
    floats as 0–1 (:func:`_unit_floats`); edge maps are compared on the same scale."""
    if values.numel() == 0:
        raise ValueError(f"{what} is empty")
    if values.dtype == torch.bool:
        return values.float()
    if values.is_complex():
        raise ValueError(f"{what} holds complex numbers ({values.dtype}): a picture needs real values")
    if values.is_floating_point():
        return _unit_floats(values.float(), what)
    wide = values.to(torch.int64)
    low, high = wide.min().item(), wide.max().item()
    if low < 0 or high > 255:
        raise ValueError(
            f"{what} holds integers from {low} to {high}, but integer pictures must hold 0-255 (8-bit). "
            f"For a 16-bit picture (0-{_SIXTEEN_BIT}) pass the file or PIL image, or divide by {_SIXTEEN_BIT}.0 "
            "to give 0-1 floats"
        )
    return wide.float() / 255


def _numpy_to_tensor(array: np.ndarray) -> torch.Tensor:
    """A copy in native byte order (arrays from np.asarray(PIL image) are read-only, 16-bit ones may
    be big-endian; torch takes neither); unsigned types torch barely supports become int64."""
    if array.dtype.kind == "u" and array.dtype.itemsize > 1:
        array = array.astype(np.int64)
    if array.dtype.kind not in "biufc":
        raise ValueError(f"a picture array needs numbers, not dtype {array.dtype}")
    return torch.from_numpy(np.array(array, dtype=array.dtype.newbyteorder("=")))


def _channels_first(raw: torch.Tensor) -> torch.Tensor:
    """Arrays come channels last (H×W×C, as PIL and OpenCV give them) or first (C×H×W, as torch), or
    without channels (H×W): one C×H×W layout with 1 to 4 channels, else the shape is named."""
    shape = tuple(raw.shape)
    raw = raw[0] if raw.dim() == 4 and raw.shape[0] == 1 else raw
    if raw.dim() == 2:
        raw = raw[None]
    elif raw.dim() == 3 and 1 <= raw.shape[-1] <= 4 and not 1 <= raw.shape[0] <= 4:
        raw = raw.permute(2, 0, 1)
    if raw.dim() != 3 or not 1 <= raw.shape[0] <= 4:
        raise ValueError(
            f"expected one picture (H×W, H×W×C or C×H×W with 1 to 4 channels), got shape {shape}"
        )
    return raw


def _array_to_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Array and tensor pictures the way PIL pictures are read: grey + alpha, RGB or RGBA, alpha on white."""
    raw = _numpy_to_tensor(image) if isinstance(image, np.ndarray) else image.detach().cpu()
    what = f"the picture ({type(image).__name__} of shape {tuple(raw.shape)}, dtype {image.dtype})"
    pixels = _to_unit(_channels_first(raw), what)
    colour, alpha = (pixels[:1], pixels[1:]) if pixels.shape[0] <= 2 else (pixels[:3], pixels[3:])
    if alpha.shape[0]:
        colour = colour * alpha + (1 - alpha)
    return colour.expand(3, -1, -1).contiguous()


def image_to_tensor(image: ImageInput) -> torch.Tensor:
    """One picture → 3×H×W float tensor in [0, 1].

    Args:
        image: a file path; a PIL image of any mode (16-bit and float grey scaled, transparency on
            white); or an array or tensor H×W, H×W×C or C×H×W (or 1×C×H×W) with 1 to 4 channels
            (grey, grey + alpha, RGB, RGBA; alpha on white) holding 0-255 integers of any integer
            dtype, 0-1 floats, or booleans. A float array beyond 0-1 is refused: 0-255 floats and
            -1-1 floats both exist, and guessing would give a washed-out or black picture. Files and
            PIL images are turned upright by their EXIF orientation.

    Returns:
        The picture, float32, channels first.
    """
    if isinstance(image, (str, os.PathLike)):
        return _open(image)
    if isinstance(image, PIL.Image.Image):
        return _pil_to_tensor(image)
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return _array_to_tensor(image)
    raise TypeError(
        f"a picture must be a file path, a PIL image, a numpy array or a torch tensor, not {type(image).__name__}"
    )


def _images_in_folder(folder: str | os.PathLike) -> list[Path]:
    """The picture files of a folder, sorted by name: what a folder means wherever one is passed."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)


def _picture_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """Every function that takes "pictures" takes a folder, one picture, a list, or a B×C×H×W batch."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        pictures = list(images)
    elif isinstance(images, (str, os.PathLike)) and Path(images).is_dir():
        pictures = list(_images_in_folder(images))
    elif isinstance(images, (str, os.PathLike)) or not isinstance(images, Sequence):
        pictures = [images]
    else:
        pictures = list(images)
    if not pictures:
        raise ValueError(
            f"no pictures in {images!r}: pass a picture, a list of pictures or a folder that holds some"
        )
    return pictures


def resize_and_crop(
    image: torch.Tensor, height: int, width: int, position: tuple[float, float] | None = None
) -> torch.Tensor:
    """Cut the part of the picture that has height×width's aspect ratio, then scale it to height×width:
    no stretching, no borders. The cut comes first, so nothing larger than the picture or the result is
    ever made (scaling a 20000×20 picture to cover 768² first would take 7 GB).

    Args:
        image: 3×H×W or B×3×H×W.
        height, width: the size wanted.
        position: where the cut sits in what overhangs, (top, left) from 0 to 1 each; None is the
            centre. LoRA training's random crop draws it.

    Returns:
        The cut, resized (bilinear, antialiased) to height×width, same dtype and device.
    """
    h, w = image.shape[-2:]
    scale = max(height / h, width / w)
    cut_h, cut_w = min(h, max(1, round(height / scale))), min(w, max(1, round(width / scale)))
    top, left = (0.5, 0.5) if position is None else position
    return TF.resized_crop(
        image,
        round((h - cut_h) * top),
        round((w - cut_w) * left),
        cut_h,
        cut_w,
        [height, width],
        interpolation=InterpolationMode.BILINEAR,
        antialias=True,
    )


def _scale_short_side(image: torch.Tensor, side: int) -> torch.Tensor:
    """The official notebooks' ``resize_image`` (bilinear, antialiased, aspect ratio kept) in one place:
    image variation scales to 768 px with it, training caps its pictures' size."""
    return TF.resize(image, side, interpolation=InterpolationMode.BILINEAR, antialias=True)


def batch_images(images: ImageInput | Sequence[ImageInput], height: int, width: int) -> torch.Tensor:
    """One or several pictures (a list, a folder, or a B×C×H×W array or tensor) → B×3×height×width,
    each cut to the aspect ratio and scaled (:func:`resize_and_crop`).

    Args:
        images: one picture as :func:`image_to_tensor` takes it, a sequence of them, a folder (its
            pictures sorted by name), or a B×C×H×W array or tensor.
        height, width: the size of every picture in the batch, in pixels.

    Returns:
        B×3×height×width, float32 in [0, 1], CPU.
    """
    return torch.stack([resize_and_crop(image_to_tensor(p), height, width) for p in _picture_list(images)])


def to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """B×3×H×W (or 3×H×W) in [0, 1] → PIL images (rounded to 8 bits, not truncated)."""
    if images.dim() == 3:
        images = images[None]
    arrays = (
        (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )
    return [PIL.Image.fromarray(a) for a in arrays]


def _as_pil_list(images) -> list[PIL.Image.Image]:
    """Whatever shows pictures takes PIL pictures or a tensor batch alike."""
    if isinstance(images, torch.Tensor):
        return to_pil(images)
    return list(images)


def _cell(picture: PIL.Image.Image | None, size: tuple[int, int]) -> PIL.Image.Image:
    """``make_image_grid`` sizes every cell like the first picture, on black: here each cell is as large
    as the largest picture, pasted at its top left on white, and empty cells are white."""
    cell = PIL.Image.new("RGB", size, "white")
    if picture is not None:
        cell.paste(picture.convert("RGB"))
    return cell


def image_grid(images, columns: int | None = None) -> PIL.Image.Image:
    """Paste pictures (PIL list or B×3×H×W tensor) into one grid image, row by row
    (``diffusers.utils.make_image_grid``).

    Args:
        images: PIL images, or a B×3×H×W (or 3×H×W) tensor in [0, 1].
        columns: pictures per row; None puts them all in one row.

    Returns:
        One RGB picture on white; every cell is as large as the largest picture, each pasted at its
        cell's top left.

    Raises:
        ValueError: no pictures, or ``columns`` not a whole number ≥ 1.
    """
    from diffusers.utils import make_image_grid

    pictures = _as_pil_list(images)
    if not pictures:
        raise ValueError("no pictures to put in a grid")
    columns = len(pictures) if columns is None else values.whole(columns, "columns", 1, meaning="per row")
    rows = -(-len(pictures) // columns)
    size = (max(p.width for p in pictures), max(p.height for p in pictures))
    cells = [_cell(p, size) for p in pictures] + [_cell(None, size)] * (rows * columns - len(pictures))
    return make_image_grid(cells, rows, columns)
