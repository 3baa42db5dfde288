"""The training pictures: finding them and their captions, the official aspect buckets, the order
batches come in, and the example pictures the notebook trains on offline."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import PIL.Image
import torch

from ..images import images_in_folder
from ..sizes import DOWNSCALE, STRIDE
from .config import TrainingError


@dataclass(frozen=True)
class TrainingImage:
    path: Path
    caption: str


def caption_for(path: Path) -> str:
    """The sidecar ``<name>.txt`` if there is one, else the file name: underscores become spaces and
    a trailing number (``_03``, `` (2)``) is dropped, so ``[chelsea]_on_a_sofa_02.png`` reads
    "[chelsea] on a sofa"."""
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        return sidecar.read_text(encoding="utf-8").strip()
    name = re.sub(r"[\s_-]*(\(\d+\)|\d+)$", "", path.stem)
    return re.sub(r"[_\s]+", " ", name).strip()


def find_training_images(folder: str | Path) -> list[TrainingImage]:
    folder = Path(folder)
    if not folder.is_dir():
        raise TrainingError(f"no folder of training pictures at {folder}")
    found = [TrainingImage(p, caption_for(p)) for p in images_in_folder(folder)]
    if not found:
        raise TrainingError(f"{folder} holds no pictures (.png, .jpg, .webp ...)")
    return found


def bucket_sizes(resolution: int, ratios: Sequence[str]) -> list[tuple[int, int]]:
    """EfficientNet input sizes (height, width) of the official ``Bucketeer``: area (¾·resolution)²,
    sides floored to multiples of 32, one per ratio and its reciprocal."""
    values = [float(Fraction(r)) for r in ratios]
    values += [1 / v for v in values if 1 / v not in values]
    density = (resolution * DOWNSCALE) ** 2
    return [
        (int((density / r) ** 0.5 // STRIDE * STRIDE), int((density * r) ** 0.5 // STRIDE * STRIDE))
        for r in values
    ]


def closest_bucket(height: int, width: int, sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose width/height ratio is closest to the picture's (the official choice)."""
    return min(sizes, key=lambda s: abs(width / height - s[1] / s[0]))


def write_example_images(folder: str | Path, token: str = "[chelsea]") -> Path:
    """Six training pictures of one cat, offline: scikit-image's ``chelsea`` photo (shipped with
    the package) cropped and mirrored into landscape, square and portrait shots; four captioned by
    a sidecar ``.txt``, two by their file name."""
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
        picture.save(folder / f"{name}.png")
        if caption:
            (folder / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def batch_schedule(
    buckets: dict[tuple[int, int], list[int]], batch_size: int, seed: int
) -> Iterator[list[int]]:
    """An endless, reproducible stream of batches: each epoch shuffles every bucket, cuts it into
    batches (the last may be smaller: small datasets lose no picture) and shuffles the batches."""
    for epoch in itertools.count():
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        batches = []
        for size in sorted(buckets):
            members = [buckets[size][i] for i in torch.randperm(len(buckets[size]), generator=generator)]
            batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
        yield from (batches[i] for i in torch.randperm(len(batches), generator=generator))
