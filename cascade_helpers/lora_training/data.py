"""The training pictures: finding them and their captions, reading them (an unreadable one is named),
skipping small ones and scaling down large ones, the official aspect buckets, the crop, the order
batches come in, the example pictures the notebook trains on offline, and PNG files written
atomically (those and the validation pictures)."""

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

from ..atomic import atomic_path, write_text
from ..images import _images_in_folder, _scale_short_side, _upright_size, image_to_tensor
from ..sizes import DOWNSCALE, STRIDE
from .config import TrainingError

#: what reading a damaged or foreign file raises in Pillow (UnidentifiedImageError is an OSError;
#: a broken PNG chunk raises SyntaxError, a truncated stream OSError or ValueError)
_UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, PIL.Image.DecompressionBombError)


@dataclass(frozen=True)
class TrainingImage:
    path: Path
    caption: str
    size: tuple[int, int]  # (height, width) in pixels, from the file's header (before max_image_size)
    repeats: int = 0  # extra passes per epoch (0: once)


def caption_for(path: Path) -> str:
    """The sidecar ``<name>.txt`` if there is one, else the file name: underscores become spaces and
    a trailing number (``_03``, `` (2)``) is dropped, so ``[chelsea]_on_a_sofa_02.png`` reads
    "[chelsea] on a sofa".

    Raises:
        TrainingError: the sidecar is not UTF-8 text (named, with the fix).
    """
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
    return TrainingError(
        f"cannot read the training picture {path} ({type(error).__name__}: {error}): the file is damaged "
        "or not a picture; replace it or move it out of the training folder"
    )


def picture_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels, as the picture is read
    (EXIF orientation applied)."""
    try:
        with PIL.Image.open(path) as opened:
            return _upright_size(opened)
    except _UNREADABLE as error:
        raise _unreadable(path, error) from error


def scaled_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """The size :func:`read_picture` gives a picture of height×width, computed without decoding it:
    with ``max_side``, a larger shorter side becomes ``max_side`` and the longer one
    ``int(max_side · long / short)``, as ``images._scale_short_side`` (torchvision's resize) computes it.

    Args:
        height, width: the picture's size in pixels (its header's).
        max_side: the largest shorter side (``max_image_size``); None or 0 keeps the size.

    Returns:
        (height, width) after scaling.
    """
    short, long = min(height, width), max(height, width)
    if not max_side or short <= max_side:
        return height, width
    longer = int(max_side * long / short)
    return (longer, max_side) if width <= height else (max_side, longer)


def read_picture(path: Path, max_side: int | None = None) -> torch.Tensor:
    """A training picture as 3×H×W in [0, 1]; with ``max_side``, scaled down (aspect kept) so its
    shorter side is at most that, before it is bucketed and cropped.

    Args:
        path: the picture file.
        max_side: the largest shorter side in pixels (``max_image_size``); None or 0 keeps the size.

    Returns:
        3×H×W float32 in [0, 1], CPU.

    Raises:
        TrainingError: the file cannot be decoded (truncated, damaged, not a picture), named.
    """
    try:
        picture = image_to_tensor(path)
    except _UNREADABLE as error:
        raise _unreadable(path, error) from error
    if max_side and min(picture.shape[-2:]) > max_side:
        picture = _scale_short_side(picture, max_side)
    return picture


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
        TrainingError: a folder is missing, or no picture is left.
    """
    folders = [folders] if isinstance(folders, (str, os.PathLike)) else list(folders)
    extra = {Path(folder).resolve(): count for folder, count in (repeats or {}).items()}
    found, skipped = [], []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise TrainingError(f"no folder of training pictures at {folder}")
        for path in _images_in_folder(folder):
            width, height = picture_size(path)
            if min(width, height) < min_image_size:
                skipped.append(f"{path} ({width}×{height})")
                continue
            found.append(
                TrainingImage(path, caption_for(path), (height, width), extra.get(folder.resolve(), 0))
            )
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} picture(s) whose shorter side is under min_image_size={min_image_size} px: "
            + ", ".join(skipped),
            stacklevel=2,
        )
    if not found:
        where = ", ".join(map(str, folders))
        reason = f" at least {min_image_size} px on the shorter side" if skipped else ""
        raise TrainingError(f"{where} hold(s) no pictures{reason} (.png, .jpg, .webp ...)")
    return found


def bucket_sizes(resolution: int, ratios: Sequence[str]) -> list[tuple[int, int]]:
    """EfficientNet input sizes (height, width) of the official ``Bucketeer``: area (¾·resolution)²,
    sides floored to multiples of 32, one per ratio and its reciprocal.

    Args:
        resolution: the picture side the LoRA is trained for (official: 1024).
        ratios: width/height ratios as strings :class:`~fractions.Fraction` reads ("1/1", "3/4" ...).

    Returns:
        (height, width) per ratio, then per reciprocal not already listed; 1024 and "1/1" give
        (768, 768).
    """
    values = [float(Fraction(r)) for r in ratios]
    values += [1 / v for v in values if 1 / v not in values]
    density = (resolution * DOWNSCALE) ** 2
    return [
        (int((density / r) ** 0.5 // STRIDE * STRIDE), int((density * r) ** 0.5 // STRIDE * STRIDE))
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


def crop_position(crop: str, content: bytes, seed: int) -> tuple[float, float] | None:
    """Where a picture's crop window sits: None (the centre) for ``"center"``; for ``"random"`` a
    (top, left) drawn from the picture's bytes and the seed, so a re-run (and its cache) agrees.

    Args:
        crop: "center" or "random" (any other value is treated as "random": the config checks it).
        content: the picture file's bytes.
        seed: the run's seed.

    Returns:
        None, or (top, left) in [0, 1], rounded to 4 decimals, for
        :func:`cascade_helpers.images.resize_and_crop`.
    """
    if crop == "center":
        return None
    digest = hashlib.sha1(content + str(seed).encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return tuple(round(v, 4) for v in torch.rand(2, generator=generator).tolist())


def save_png(picture: PIL.Image.Image, path: Path) -> Path:
    """A PNG written atomically: an interrupted save never leaves half a picture under ``path``.

    Args:
        picture: the picture.
        path: the file.

    Returns:
        ``path``.
    """
    with atomic_path(path) as temporary:
        picture.save(temporary, format="PNG")
    return path


def write_example_images(folder: str | Path, token: str = "[chelsea]") -> Path:
    """Six training pictures of one cat, offline: scikit-image's ``chelsea`` photo (shipped with
    the package) cropped and mirrored into landscape, square and portrait shots; four captioned by
    a sidecar ``.txt``, two by their file name.

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
        save_png(picture, folder / f"{name}.png")
        if caption:
            write_text(folder / f"{name}.txt", caption + "\n")
    return folder


def batch_schedule(
    buckets: dict[tuple[int, int], list[int]], batch_size: int, seed: int
) -> Iterator[list[int]]:
    """An endless, reproducible stream of batches: each epoch shuffles every bucket, cuts it into
    batches (the last may be smaller: small datasets lose no picture) and shuffles the batches. A
    picture with repeats is listed in its bucket that many more times.

    Args:
        buckets: bucket size → the indices of its pictures (an index listed once per pass).
        batch_size: pictures per batch; a batch never mixes buckets.
        seed: the run's seed; epoch ``e`` shuffles with ``seed · 100003 + e``.

    Yields:
        Lists of picture indices, epoch after epoch, forever.
    """
    for epoch in itertools.count():
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        batches = []
        for size in sorted(buckets):
            members = [buckets[size][i] for i in torch.randperm(len(buckets[size]), generator=generator)]
            batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
        yield from (batches[i] for i in torch.randperm(len(batches), generator=generator))
