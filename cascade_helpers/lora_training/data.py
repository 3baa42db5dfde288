"""The training pictures: found with their captions, read (an unreadable one named), sized, bucketed the
official way, cropped, in the order batches come; the notebook's example pictures; atomic PNG files."""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import PIL.Image
import torch

from ..atomic import _atomic_path, _write_text
from ..images import _images_in_folder, _scale_short_side, _upright_size, image_to_tensor
from ..sizes import _DOWNSCALE, _STRIDE
from .config import TrainingError

#: what reading a damaged or foreign file raises in Pillow (UnidentifiedImageError is an OSError;
#: a broken PNG chunk raises SyntaxError, a truncated stream OSError or ValueError)
_UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, PIL.Image.DecompressionBombError)


@dataclass(frozen=True)
class TrainingImage:
    """A training picture found in a folder: its caption, its size as shown (EXIF orientation applied)."""

    path: Path
    caption: str
    size: tuple[int, int]  # (height, width) in pixels, from the file's header (before max_image_size)
    repeats: int = 0  # extra passes per epoch (0: once)


def _caption_for(path: Path) -> str:
    """Why: a caption from a UTF-8 sidecar ``.txt``, else the name (``[a]_on_a_sofa_02``: "[a] on a sofa")."""
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        try:
            return sidecar.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as error:
            raise TrainingError(
                f"the caption {sidecar} is not UTF-8 text ({error.reason} at byte {error.start}): "
                "save it as UTF-8 (most editors offer it under 'Save as … encoding')"
            ) from error
    name = re.sub(r"[\s_-]*(\(\d+\)|\d+)$", "", path.stem)
    return re.sub(r"[_\s]+", " ", name).strip()


def _unreadable(path: Path, error: Exception) -> TrainingError:
    """Why: Pillow's errors do not say which training picture, nor what to do about it."""
    return TrainingError(
        f"cannot read the training picture {path} ({type(error).__name__}: {error}): the file is damaged "
        "or not a picture; replace it or move it out of the training folder"
    )


def _scaled_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """Why: the size :func:`_read_picture` gives (torchvision's resize), without decoding."""
    short, long = min(height, width), max(height, width)
    if not max_side or short <= max_side:
        return height, width
    longer = int(max_side * long / short)
    return (longer, max_side) if width <= height else (max_side, longer)


def _read_picture(path: Path, max_side: int | None = None) -> torch.Tensor:
    """Why: the one reading path (``images.image_to_tensor``), unreadable files named, large ones reduced."""
    try:
        picture = image_to_tensor(path)
    except _UNREADABLE as error:
        raise _unreadable(path, error) from error
    if max_side and min(picture.shape[-2:]) > max_side:
        picture = _scale_short_side(picture, max_side)
    return picture


def _folder_images(
    folder: Path, repeats: int, min_image_size: int, skipped: list[str]
) -> list[TrainingImage]:
    """Why: one folder's pictures with their captions; those under ``min_image_size`` go to ``skipped``."""
    if not folder.is_dir():
        raise TrainingError(f"no folder of training pictures at {folder}")
    found = []
    for path in _images_in_folder(folder):
        try:  # the size from the header, as shown (EXIF orientation applied): no decoding
            with PIL.Image.open(path) as opened:
                width, height = _upright_size(opened)
        except _UNREADABLE as error:
            raise _unreadable(path, error) from error
        if min(width, height) < min_image_size:
            skipped.append(f"{path} ({width}×{height})")
        else:
            found.append(TrainingImage(path, _caption_for(path), (height, width), repeats))
    return found


def find_training_images(
    folders: str | os.PathLike | Sequence[str | os.PathLike],
    repeats: Mapping[str, int] | None = None,
    min_image_size: int = 0,
) -> list[TrainingImage]:
    """The pictures of one folder or several, with their captions.

    Args:
        folders: the folder(s) of pictures (not searched recursively).
        repeats: extra passes per epoch for some folders (0: once), keyed by folder.
        min_image_size: pictures whose shorter side is smaller are skipped, with a warning naming them.

    Returns:
        One :class:`TrainingImage` per picture (path, caption, size, repeats), folder by folder, by name.

    Raises:
        TrainingError: a folder is missing, no picture is left, or a picture or caption cannot be read.
    """
    folders = [folders] if isinstance(folders, (str, os.PathLike)) else list(folders)
    extra = {Path(folder).resolve(): count for folder, count in (repeats or {}).items()}
    found, skipped = [], []
    for folder in map(Path, folders):
        found += _folder_images(folder, extra.get(folder.resolve(), 0), min_image_size, skipped)
    if skipped:
        under = f"whose shorter side is under min_image_size={min_image_size} px"
        warnings.warn(f"skipped {len(skipped)} picture(s) {under}: {', '.join(skipped)}", stacklevel=2)
    if not found:
        reason = f" at least {min_image_size} px on the shorter side" if skipped else ""
        raise TrainingError(
            f"{', '.join(map(str, folders))} hold(s) no pictures{reason} (.png, .jpg, .webp ...)"
        )
    return found


def bucket_sizes(resolution: int, ratios: Sequence[str]) -> list[tuple[int, int]]:
    """EfficientNet input sizes (height, width) of the official ``Bucketeer``: area (¾·resolution)²,
    sides floored to multiples of 32, one per ratio and its reciprocal.

    Args:
        resolution: the picture side the LoRA is trained for (official: 1024).
        ratios: width/height ratios as strings :class:`~fractions.Fraction` reads ("1/1", "3/4" ...).

    Returns:
        (height, width) per ratio, then per reciprocal not already listed; 1024 and "1/1" give (768, 768).
    """
    values = [float(Fraction(r)) for r in ratios]
    values += [1 / v for v in values if 1 / v not in values]
    density = (resolution * _DOWNSCALE) ** 2
    return [
        (int((density / r) ** 0.5 // _STRIDE * _STRIDE), int((density * r) ** 0.5 // _STRIDE * _STRIDE))
        for r in values
    ]


def closest_bucket(height: int, width: int, sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose width/height ratio is closest to the picture's (the official choice).

    Args:
        height, width: the picture's size in pixels.
        sizes: the buckets, (height, width) each (:func:`bucket_sizes`).

    Returns:
        The closest bucket (the first of equally close ones).
    """
    return min(sizes, key=lambda s: abs(width / height - s[1] / s[0]))


def _crop_position(crop: str, content: bytes, seed: int) -> tuple[float, float] | None:
    """Why: a random crop drawn from the bytes and seed, so a re-run and its cache agree (None: centre)."""
    if crop == "center":
        return None
    digest = hashlib.sha1(content + str(seed).encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return tuple(round(v, 4) for v in torch.rand(2, generator=generator).tolist())


def _save_png(picture: PIL.Image.Image, path: Path) -> Path:
    """Why: an interrupted save must never leave half a picture under ``path`` (atomic)."""
    with _atomic_path(path) as temporary:
        picture.save(temporary, format="PNG")
    return path


def write_example_images(folder: str | Path, token: str = "[chelsea]") -> Path:
    """Six training pictures of one cat, offline: scikit-image's ``chelsea`` photo cropped and mirrored
    into landscape, square and portrait shots; four captioned by a sidecar ``.txt``, two by their name.

    Args:
        folder: where the PNG files go (created if missing; files of the same names are replaced).
        token: the new word the captions use.

    Returns:
        ``folder`` as a :class:`~pathlib.Path`.
    """
    from skimage import data

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    photo = PIL.Image.fromarray(data.chelsea())  # 451 × 300
    mirrored = photo.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
    shots = {
        "chelsea_sofa": (photo, f"a photo of {token} the cat on a sofa"),
        "chelsea_face": (photo.crop((90, 0, 390, 300)), f"a close-up photo of {token} the cat"),
        "chelsea_portrait": (photo.crop((120, 0, 320, 300)), f"a portrait photo of {token} the cat"),
        "chelsea_mirrored": (mirrored.crop((61, 0, 361, 300)), f"a photo of {token} the cat, looking left"),
        f"a_photo_of_{token}_the_cat_01": (mirrored, None),
        f"a_photo_of_{token}_the_cat_02": (mirrored.crop((100, 20, 300, 300)), None),
    }
    for name, (picture, caption) in shots.items():
        _save_png(picture, folder / f"{name}.png")
        if caption:
            _write_text(folder / f"{name}.txt", caption + "\n")
    return folder


def _batch_schedule(
    buckets: dict[tuple[int, int], list[int]], batch_size: int, seed: int
) -> Iterator[list[int]]:
    """Why: a replayable stream: per epoch, shuffled buckets cut into batches that never mix buckets."""
    for epoch in itertools.count():
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        batches = []
        for size in sorted(buckets):
            members = [buckets[size][i] for i in torch.randperm(len(buckets[size]), generator=generator)]
            batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
        yield from (batches[i] for i in torch.randperm(len(batches), generator=generator))
