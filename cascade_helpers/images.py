"""Getting pictures in and out: any PIL mode, file, array or tensor in; float tensors and PIL out.
Inside the package an image is a float tensor in [0, 1], channels first (3×H×W, or B×3×H×W), and
every picture enters through :func:`image_to_tensor`."""

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

# PIL modes whose pixels are not 8-bit: 16-bit grey (either byte order), 32-bit integers, 32-bit floats
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_SIXTEEN_BIT = 65535
# a float picture may overshoot [0, 1] by rounding; by more than an 8-bit step it was meant otherwise
_FLOAT_TOLERANCE = 1 / 255
# EXIF orientations that turn a picture a quarter turn (transposed or rotated): width and height swap
_SIDEWAYS = (5, 6, 7, 8)
_BILINEAR = InterpolationMode.BILINEAR


def _wide_grey(image: PIL.Image.Image) -> np.ndarray:
    """16-bit, 32-bit (read as 16-bit) or float grey → [0, 1]: PIL's convert clips or truncates them."""
    pixels = np.asarray(image)
    if image.mode == "F":
        return _unit_floats(torch.from_numpy(pixels.astype(np.float32)), "a mode 'F' picture").numpy()
    pixels = pixels.astype(np.int64)
    if pixels.size and (pixels.min() < 0 or pixels.max() > _SIXTEEN_BIT):
        raise ValueError(
            f"a mode {image.mode!r} picture holds values from {pixels.min()} to {pixels.max()}: integer pictures "
            f"of this mode are read as 16-bit (0-{_SIXTEEN_BIT}). Scale it to 0-255 (mode 'L') or 0-1 first"
        )
    return (pixels / _SIXTEEN_BIT).astype(np.float32)


def _upright_size(image: PIL.Image.Image) -> tuple[int, int]:
    """(width, height) upright by EXIF, from the header: training buckets a picture undecoded."""
    width, height = image.size
    return (height, width) if image.getexif().get(0x0112) in _SIDEWAYS else (width, height)  # Orientation


def _open(path: str | os.PathLike) -> torch.Tensor:
    """A picture file's pixels, naming the file when PIL cannot read it (its message does not)."""
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
    """PIL pictures upright (EXIF), wide grey scaled, transparency on white (PIL: clipped, black)."""
    image = PIL.ImageOps.exif_transpose(image)
    if image.mode in _WIDE_MODES:  # no 8-bit round trip: keep the 16-bit precision
        return torch.from_numpy(_wide_grey(image))[None].expand(3, -1, -1).contiguous()
    alpha = {"A", "a"} & set(image.getbands()) or "transparency" in image.info
    return _on_white(TF.to_tensor(image.convert("RGBA" if alpha else "RGB")))


def _on_white(pixels: torch.Tensor) -> torch.Tensor:
    """Grey, grey + alpha, RGB or RGBA → RGB, transparency on white (what a viewer shows behind it)."""
    colour, alpha = (pixels[:1], pixels[1:]) if pixels.shape[0] <= 2 else (pixels[:3], pixels[3:])
    if alpha.shape[0]:
        colour = colour * alpha + (1 - alpha)
    return colour.expand(3, -1, -1).contiguous()


def _unit_floats(pixels: torch.Tensor, what: str) -> torch.Tensor:
    """Floats in [0, 1]; NaN (black later), 0-255 or -1-1 data (white or half black) refused."""
    if not torch.isfinite(pixels).all():
        raise ValueError(f"{what} holds NaN or infinite values: a picture needs finite pixels")
    low, high = pixels.min().item(), pixels.max().item()
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
    return pixels.clamp(0, 1)


def _to_unit(pixels: torch.Tensor, what: str) -> torch.Tensor:
    """Pixels (or edge maps) of any dtype on one 0-1 scale: bool 0/1, integers 0-255, floats 0-1."""
    if pixels.numel() == 0:
        raise ValueError(f"{what} is empty")
    if pixels.dtype == torch.bool:
        return pixels.float()
    if pixels.is_complex():
        raise ValueError(f"{what} holds complex numbers ({pixels.dtype}): a picture needs real values")
    if pixels.is_floating_point():
        return _unit_floats(pixels.float(), what)
    wide = pixels.to(torch.int64)
    low, high = wide.min().item(), wide.max().item()
    if low < 0 or high > 255:
        raise ValueError(
            f"{what} holds integers from {low} to {high}, but integer pictures must hold 0-255 (8-bit). "
            f"For a 16-bit picture (0-{_SIXTEEN_BIT}) pass the file or PIL image, or divide by {_SIXTEEN_BIT}.0 "
            "to give 0-1 floats"
        )
    return wide.float() / 255


def _numpy_to_tensor(array: np.ndarray) -> torch.Tensor:
    """A native-order copy (PIL's arrays are read-only, maybe big-endian); wide unsigned → int64."""
    if array.dtype.kind == "u" and array.dtype.itemsize > 1:
        array = array.astype(np.int64)
    if array.dtype.kind not in "biufc":
        raise ValueError(f"a picture array needs numbers, not dtype {array.dtype}")
    return torch.from_numpy(np.array(array, dtype=array.dtype.newbyteorder("=")))


def _array_to_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """H×W, H×W×C or C×H×W arrays with 1-4 channels, read as PIL pictures are; else named."""
    raw = _numpy_to_tensor(image) if isinstance(image, np.ndarray) else image.detach().cpu()
    shape = tuple(raw.shape)
    raw = raw[0] if raw.dim() == 4 and shape[0] == 1 else raw[None] if raw.dim() == 2 else raw
    if raw.dim() == 3 and 1 <= raw.shape[-1] <= 4 and not 1 <= raw.shape[0] <= 4:
        raw = raw.permute(2, 0, 1)
    if raw.dim() != 3 or not 1 <= raw.shape[0] <= 4:
        raise ValueError(
            f"expected one picture (H×W, H×W×C or C×H×W with 1 to 4 channels), got shape {shape}"
        )
    what = f"the picture ({type(image).__name__} of shape {shape}, dtype {image.dtype})"
    return _on_white(_to_unit(raw, what))


def image_to_tensor(image: ImageInput) -> torch.Tensor:
    """One picture → 3×H×W float32 in [0, 1]: a file path or a PIL image of any mode (upright by its
    EXIF orientation, 16-bit and float grey scaled, transparency on white), or an array or tensor H×W,
    H×W×C or C×H×W (or 1×C×H×W) with 1 to 4 channels (grey, grey + alpha, RGB, RGBA) holding 0-255
    integers of any dtype, 0-1 floats or booleans. Floats beyond 0-1 are refused: 0-255 and -1-1 floats
    both exist, and a guess would give a washed-out or black picture."""
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
    batch = isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4
    path = isinstance(images, (str, os.PathLike))
    if path and Path(images).is_dir():
        pictures = _images_in_folder(images)
    else:
        pictures = list(images) if batch or (isinstance(images, Sequence) and not path) else [images]
    if not pictures:
        raise ValueError(
            f"no pictures in {images!r}: pass a picture, a list of pictures or a folder that holds some"
        )
    return pictures


def resize_and_crop(
    image: torch.Tensor, height: int, width: int, position: tuple[float, float] | None = None
) -> torch.Tensor:
    """Cut the part with height×width's aspect ratio, then scale it (bilinear, antialiased): no stretching,
    no borders, and nothing larger than picture or result is made (covering 768² first: 7 GB for 20000×20).

    Args:
        image: 3×H×W or B×3×H×W.
        height, width: the size wanted.
        position: (top, left) of the cut in what overhangs, 0 to 1 each; None: the centre.

    Returns:
        height×width, same dtype and device.
    """
    h, w = image.shape[-2:]
    scale = max(height / h, width / w)
    cut_h, cut_w = min(h, max(1, round(height / scale))), min(w, max(1, round(width / scale)))
    top, left = (0.5, 0.5) if position is None else position
    top, left = round((h - cut_h) * top), round((w - cut_w) * left)
    return TF.resized_crop(image, top, left, cut_h, cut_w, [height, width], _BILINEAR, antialias=True)


def _scale_short_side(image: torch.Tensor, side: int) -> torch.Tensor:
    """The official notebooks' resize_image (bilinear, antialiased): variation, training caps."""
    return TF.resize(image, side, _BILINEAR, antialias=True)


def batch_images(images: ImageInput | Sequence[ImageInput], height: int, width: int) -> torch.Tensor:
    """One or several pictures as one batch, each cut and scaled by :func:`resize_and_crop`.

    Args:
        images: a picture (as :func:`image_to_tensor` takes), a list, a folder or a B×C×H×W batch.
        height, width: the size of every picture in the batch, in pixels.

    Returns:
        B×3×height×width, float32 in [0, 1], on the CPU.
    """
    return torch.stack([resize_and_crop(image_to_tensor(p), height, width) for p in _picture_list(images)])


def to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """B×3×H×W (or 3×H×W) in [0, 1] → PIL images (rounded to 8 bits, not truncated)."""
    images = images[None] if images.dim() == 3 else images
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return [PIL.Image.fromarray(a) for a in pixels.permute(0, 2, 3, 1).cpu().numpy()]


def _as_pil_list(images) -> list[PIL.Image.Image]:
    """Whatever shows pictures takes PIL pictures or a tensor batch alike."""
    return to_pil(images) if isinstance(images, torch.Tensor) else list(images)


def image_grid(images, columns: int | None = None) -> PIL.Image.Image:
    """Paste pictures into one grid image, row by row (ours: diffusers' ``make_image_grid`` sizes every
    cell like the first picture, on black).

    Args:
        images: PIL images, or a B×3×H×W (or 3×H×W) tensor in [0, 1].
        columns: pictures per row; None puts them all in one row.

    Returns:
        One RGB picture on white; each cell as large as the largest picture, pasted at its top left.
    """
    pictures = _as_pil_list(images)
    if not pictures:
        raise ValueError("no pictures to put in a grid")
    columns = len(pictures) if columns is None else values._whole(columns, "columns", 1, meaning="per row")
    width, height = max(p.width for p in pictures), max(p.height for p in pictures)
    grid = PIL.Image.new("RGB", (width * columns, height * -(-len(pictures) // columns)), "white")
    for i, picture in enumerate(pictures):
        grid.paste(picture.convert("RGB"), (i % columns * width, i // columns * height))
    return grid
