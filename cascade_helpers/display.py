"""Showing pictures in a notebook: grids with titles, side-by-side comparisons."""

from __future__ import annotations

from collections.abc import Sequence

import PIL.Image
import torch

from .images import to_pil


def _as_pil_list(images) -> list[PIL.Image.Image]:
    if isinstance(images, torch.Tensor):
        return to_pil(images)
    return list(images)


def image_grid(images, columns: int | None = None) -> PIL.Image.Image:
    """Paste pictures (PIL list or B×3×H×W tensor) into one grid image, row by row."""
    pictures = _as_pil_list(images)
    if not pictures:
        raise ValueError("no pictures to put in a grid")
    columns = columns or len(pictures)
    rows = -(-len(pictures) // columns)
    width, height = max(p.width for p in pictures), max(p.height for p in pictures)
    grid = PIL.Image.new("RGB", (columns * width, rows * height), "white")
    for i, picture in enumerate(pictures):
        grid.paste(picture.convert("RGB"), ((i % columns) * width, (i // columns) * height))
    return grid


def show_images(images, titles: Sequence[str] | None = None, columns: int | None = None, size: float = 4.0):
    """Plot pictures with matplotlib, one titled panel each; returns the figure."""
    import matplotlib.pyplot as plt

    pictures = _as_pil_list(images)
    columns = columns or len(pictures)
    rows = -(-len(pictures) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, picture) in enumerate(zip(axes.flat, pictures, strict=False)):
        ax.imshow(picture)
        if titles is not None:
            ax.set_title(titles[i])
    figure.tight_layout()
    return figure
