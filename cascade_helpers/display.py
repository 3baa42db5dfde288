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


# --- a live loss curve (LoRA training) ---------------------------------------------------------------


class LiveLossPlot:
    """A training-loss curve that redraws in place in a notebook: pass it as ``on_step(step, loss)``.

    Raw losses are noisy (each step draws its own noise level), so an exponential moving average is
    drawn over them. ``history`` continues a resumed run's curve; ``every`` redraws less often.
    Outside IPython it only collects the values.
    """

    def __init__(
        self, history=(), every: int = 1, smoothing: float = 0.9, title: str = "training loss"
    ) -> None:
        self.steps = [int(s) for s, _ in history]
        self.values = [float(v) for _, v in history]
        self.every, self.smoothing, self.title = max(1, every), smoothing, title
        self._handle = None

    def __call__(self, step: int, loss: float) -> None:
        self.steps.append(step)
        self.values.append(loss)
        if step % self.every == 0:
            self.redraw()

    def smoothed(self) -> list[float]:
        averages, average = [], None
        for value in self.values:
            average = value if average is None else self.smoothing * average + (1 - self.smoothing) * value
            averages.append(average)
        return averages

    def figure(self):
        """The curve as a matplotlib figure (not registered with pyplot, so never shown twice)."""
        from matplotlib.figure import Figure

        figure = Figure(figsize=(7, 3))
        ax = figure.subplots()
        ax.plot(self.steps, self.values, color="0.75", linewidth=1, label="loss")
        ax.plot(
            self.steps, self.smoothed(), color="C0", linewidth=2, label=f"moving average ({self.smoothing})"
        )
        ax.set_xlabel("step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(self.title)
        ax.legend(loc="best")
        figure.tight_layout()
        return figure

    def redraw(self) -> None:
        import io

        try:
            from IPython import get_ipython
            from IPython.display import Image, display
        except ImportError:
            return
        if get_ipython() is None or not self.values:
            return
        buffer = io.BytesIO()
        self.figure().savefig(buffer, format="png", dpi=80)
        picture = Image(data=buffer.getvalue())
        if self._handle is None:
            self._handle = display(picture, display_id=True)
        else:
            self._handle.update(picture)
