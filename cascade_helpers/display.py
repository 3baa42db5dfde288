"""Showing pictures in a notebook: titled grids, live previews during sampling, a live loss curve, and
PNG files that remember how they were made (the interactive panel is :mod:`cascade_helpers.panel`)."""

from __future__ import annotations

import errno
import io
import itertools
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import PIL.Image
import PIL.PngImagePlugin
import torch

from .atomic import _claim_name, _temporary_name
from .generation import Generation
from .images import _as_pil_list, image_grid
from .models import Prior
from .request import _per_picture
from .stages import preview_stage_c


def show_images(images, titles: Sequence[str] | None = None, columns: int | None = None, size: float = 4.0):
    """Plot pictures with matplotlib, one titled panel each.

    Args:
        images: PIL images, or a B×3×H×W tensor in [0, 1].
        titles: one title per picture, or None.
        columns: panels per row; None puts them all in one row.
        size: each panel's width and height in inches.

    Returns:
        The matplotlib figure (registered with pyplot: a notebook shows it).
    """
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


def _png_bytes(picture: PIL.Image.Image) -> bytes:
    """A picture as PNG bytes: what an ``ipywidgets.Image`` shows."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


#: the PNG text chunk holding a generation's settings as JSON (what :func:`read_settings` returns)
_SETTINGS_CHUNK = "stable_cascade"


def _claim_run(folder: Path, prefix: str, names: list[str], files: list[Path]) -> list[Path]:
    """``os.link`` fails on a taken name where a rename would replace it: concurrent runs never collide.
    Run numbers by a regular expression: a glob would misread a prefix holding ``[`` or ``*``."""
    numbered, number = re.compile(rf"{re.escape(prefix)}-(\d+)-.*\.png"), 0
    while True:
        taken = [int(m.group(1)) for p in folder.iterdir() if (m := numbered.fullmatch(p.name))]
        number = max(max(taken, default=0), number) + 1
        paths, linked = [folder / name.format(number=number) for name in names], []
        try:
            for file, path in zip(files, paths, strict=True):
                _link_new(file, path)
                linked.append(path)
            return paths
        except FileExistsError:
            for path in linked:
                path.unlink()


_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}


def _link_new(file: Path, path: Path) -> None:
    """FAT and some network and cloud drives have no hard links: claim the name, then replace it."""
    try:
        os.link(file, path)
    except OSError as error:
        if isinstance(error, FileExistsError) or error.errno not in _NO_HARD_LINKS:
            raise
        if not _claim_name(path):
            raise FileExistsError(path) from error
        os.replace(file, path)


def _check_prefix(prefix: object) -> str:
    """A file-name prefix, not a path: ``"../x"`` would write outside the output folder."""
    separators = {"/", "\\", os.sep, os.altsep} - {None}
    odd = not isinstance(prefix, str) or prefix in ("", ".", "..") or "\0" in prefix
    if odd or any(separator in prefix for separator in separators):
        raise ValueError(
            f"prefix={prefix!r}: the start of the file names must be a name without path separators "
            "('/' or '\\'); choose the folder with output_dir"
        )
    return prefix


def save_generation(
    generation: Generation, output_dir: str | os.PathLike, prefix: str = "cascade"
) -> list[Path]:
    """Save every picture of a generation as ``<prefix>-<run>-seed<seed>-<index>.png`` in ``output_dir``,
    its settings in the PNG (:func:`read_settings`). A run never overwrites another, even one another
    process saves into the same folder, and a name never holds part of a picture.

    Args:
        generation: what :func:`~cascade_helpers.generation.text_to_image` and friends return.
        output_dir: the folder (created if needed).
        prefix: the start of every file name: a name, not a path.

    Returns:
        The paths written, in the order of the pictures.

    Raises:
        ValueError: a prefix with a path separator (or empty, "." or "..").
        NotADirectoryError: ``output_dir`` is a file.
    """
    prefix = _check_prefix(prefix)
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"output_dir={str(folder)!r} is a file, not a folder: choose a folder")
    folder.mkdir(parents=True, exist_ok=True)
    seed = generation.settings.get("seed", 0)
    names = [f"{prefix}-{{number:04d}}-seed{seed}-{index}.png" for index in range(len(generation.images))]
    prompt = generation.settings.get("prompt", "")
    prompts = _per_picture([prompt] if isinstance(prompt, str) else list(prompt), len(generation.images))
    files = []
    try:
        for index, picture in enumerate(generation.images):
            files.append(_temporary_name(folder / names[index].format(number=0)))
            info = PIL.PngImagePlugin.PngInfo()
            info.add_text(_SETTINGS_CHUNK, json.dumps({**generation.settings, "index": index}))
            info.add_text("Description", str(prompts[index]))  # the standard chunk image viewers show
            info.add_text("Software", "cascade_helpers (Stable Cascade)")
            picture.save(files[-1], format="PNG", pnginfo=info)
        return _claim_run(folder, prefix, names, files)
    finally:
        for file in files:
            file.unlink(missing_ok=True)


def read_settings(path: str | os.PathLike) -> dict:
    """The settings :func:`save_generation` stored in a PNG (``index`` says which picture of the
    batch it is: the same seed, size and ``num_images`` reproduce it)."""
    with PIL.Image.open(path) as picture:
        text = getattr(picture, "text", {})
        if _SETTINGS_CHUNK not in text:
            raise ValueError(
                f"{path} has no {_SETTINGS_CHUNK!r} metadata: it was not saved by save_generation "
                "(or an editor dropped the PNG text chunks)"
            )
        return json.loads(text[_SETTINGS_CHUNK])


class _InPlace:
    """A display handle redraws in place in Jupyter, Colab and VS Code, and stays in the saved notebook."""

    _handle = None  # the first show() makes it

    def show(self, picture) -> None:
        from IPython import get_ipython
        from IPython.display import display

        if get_ipython() is None:  # a plain script: nothing to draw into
            return
        if self._handle is None:
            self._handle = display(picture, display_id=True)
        else:
            self._handle.update(picture)


class LivePreview:
    """A per-step ``callback`` for :func:`~cascade_helpers.generation.text_to_image` and friends: after
    every Stage C step the previewer's picture (a grid for several) is redrawn in place below the
    running cell, or into ``widget`` (the panel does). ``latest`` keeps the last preview.

    Args:
        prior: a prior loaded with ``previewer=True``.
        widget: an ``ipywidgets.Image`` to draw into, or None.
        columns: pictures per row of the grid; None puts them all in one row.
    """

    def __init__(self, prior: Prior, widget=None, *, columns: int | None = None) -> None:
        self.prior, self.widget, self.columns = prior, widget, columns
        self.latest: PIL.Image.Image | None = None
        self.updates = 0
        self._area = _InPlace()

    def __call__(self, step: int, denoised: torch.Tensor, sample: torch.Tensor) -> None:
        self.latest = image_grid(preview_stage_c(self.prior, denoised), self.columns)
        self.updates += 1
        if self.widget is not None:
            self.widget.value = _png_bytes(self.latest)
        else:
            self._area.show(self.latest)


class LiveLossPlot:
    """A training-loss curve that redraws in place in a notebook (outside IPython it only collects the
    values): pass it as ``on_step(step, loss)``. Raw losses are noisy (each step draws its own noise
    level), so an exponential moving average is drawn over them.

    Args:
        history: (step, loss) pairs already done (``TrainingResult.losses``, ``trainer.losses``).
        every: redraw at the steps that are multiples of it (at least 1).
        smoothing: the moving average's weight of the past, 0 to 1 (0: no smoothing).
        title: the plot's title.
    """

    def __init__(
        self, history=(), every: int = 1, smoothing: float = 0.9, title: str = "training loss"
    ) -> None:
        self.steps = [int(s) for s, _ in history]
        self.values = [float(v) for _, v in history]
        self.every, self.smoothing, self.title = max(1, every), smoothing, title
        self._area = _InPlace()

    def __call__(self, step: int, loss: float) -> None:
        self.steps.append(step)
        self.values.append(loss)
        if step % self.every == 0:
            self.redraw()

    def smoothed(self) -> list[float]:
        weight = self.smoothing
        return list(itertools.accumulate(self.values, lambda average, v: weight * average + (1 - weight) * v))

    def figure(self):
        """The curve as a matplotlib figure (not registered with pyplot, so never shown twice)."""
        from matplotlib.figure import Figure

        figure = Figure(figsize=(7, 3))
        ax = figure.subplots()
        ax.plot(self.steps, self.values, color="0.75", linewidth=1, label="loss")
        average = f"moving average ({self.smoothing})"
        ax.plot(self.steps, self.smoothed(), color="C0", linewidth=2, label=average)
        ax.set_xlabel("step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(self.title)
        ax.legend(loc="best")
        figure.tight_layout()
        return figure

    def redraw(self) -> None:
        from IPython.display import Image

        if not self.values:
            return
        buffer = io.BytesIO()
        self.figure().savefig(buffer, format="png", dpi=80)
        self._area.show(Image(data=buffer.getvalue()))
