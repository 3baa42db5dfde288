"""Showing pictures in a notebook: grids with titles, live previews during sampling, an interactive
generation panel, and PNG files that remember how they were made."""

from __future__ import annotations

import html
import io
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import PIL.Image
import PIL.PngImagePlugin
import torch

from .images import to_pil

if TYPE_CHECKING:
    from .generation import Generation
    from .loading import Decoder, Prior


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


def png_bytes(picture: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


# --- PNG files with their settings -------------------------------------------------------------------

#: the PNG text chunk holding a generation's settings as JSON (what :func:`read_settings` returns)
SETTINGS_CHUNK = "stable_cascade"


def _next_number(folder: Path, prefix: str) -> int:
    numbered = re.compile(rf"{re.escape(prefix)}-(\d+)-")
    numbers = [int(m.group(1)) for p in folder.glob(f"{prefix}-*.png") if (m := numbered.match(p.name))]
    return max(numbers, default=0) + 1


def save_generation(
    generation: Generation, output_dir: str | os.PathLike, prefix: str = "cascade"
) -> list[Path]:
    """Save every picture of a generation as ``<prefix>-<run>-seed<seed>-<index>.png`` in
    ``output_dir``, with its settings (prompt, negative prompt, seed, size, each stage's steps,
    guidance, shift, sampler, and its index in the batch) in the PNG's text metadata: the
    ``stable_cascade`` chunk as JSON, the prompt also as the standard ``Description``.
    A new run never overwrites an older one."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    number = _next_number(folder, prefix)
    paths = []
    for index, picture in enumerate(generation.images):
        settings = {**generation.settings, "index": index}
        info = PIL.PngImagePlugin.PngInfo()
        info.add_text(SETTINGS_CHUNK, json.dumps(settings))
        info.add_text("Description", str(settings.get("prompt", "")))
        info.add_text("Software", "cascade_helpers (Stable Cascade)")
        path = folder / f"{prefix}-{number:04d}-seed{settings.get('seed', 0)}-{index}.png"
        picture.save(path, pnginfo=info)
        paths.append(path)
    return paths


def read_settings(path: str | os.PathLike) -> dict:
    """The settings :func:`save_generation` stored in a PNG (``index`` says which picture of the
    batch it is: the same seed, size and ``num_images`` reproduce it)."""
    with PIL.Image.open(path) as picture:
        text = getattr(picture, "text", {})
        if SETTINGS_CHUNK not in text:
            raise ValueError(
                f"{path} has no {SETTINGS_CHUNK!r} metadata: it was not saved by save_generation "
                "(or an editor dropped the PNG text chunks)"
            )
        return json.loads(text[SETTINGS_CHUNK])


# --- live previews -----------------------------------------------------------------------------------


class InPlace:
    """One output area below the running cell that each :meth:`show` replaces (an IPython display
    handle: Jupyter, Colab and VS Code draw it in place, and it stays in the saved notebook).
    Outside IPython it does nothing."""

    def __init__(self) -> None:
        self._handle = None

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
    """A per-step ``callback`` for :func:`~cascade_helpers.generation.text_to_image` and friends:
    after every Stage C step it decodes the current denoised estimate with the previewer and redraws
    one picture in place (a grid when several are generated), so you watch the picture form.

    Without ``widget`` the picture appears below the running cell and is updated there (an IPython
    display handle: works in Jupyter, Colab and VS Code, and stays in the saved notebook). With an
    ``ipywidgets.Image`` it draws into that widget (the panel does). ``latest`` keeps the last preview.
    """

    def __init__(self, prior: Prior, widget=None, *, columns: int | None = None) -> None:
        self.prior = prior
        self.widget = widget
        self.columns = columns
        self.latest: PIL.Image.Image | None = None
        self.updates = 0
        self._area = InPlace()

    def __call__(self, step: int, denoised: torch.Tensor, sample: torch.Tensor) -> None:
        from .generation import preview_stage_c

        self.latest = image_grid(preview_stage_c(self.prior, denoised), self.columns)
        self.updates += 1
        if self.widget is not None:
            self.widget.value = png_bytes(self.latest)
        else:
            self._area.show(self.latest)


# --- the generation panel ----------------------------------------------------------------------------

#: (height, width) choices of the panel: multiples of 128 the models were trained on, several ratios
PANEL_SIZES: tuple[tuple[int, int], ...] = (
    (1024, 1024),
    (896, 1152),
    (1152, 896),
    (768, 1280),
    (1280, 768),
    (640, 1536),
    (1536, 640),
    (768, 1024),
    (1024, 768),
    (512, 512),
    (512, 768),
    (768, 512),
    (768, 768),
    (1536, 1536),
)


class GenerationPanel:
    """An ipywidgets panel for text-to-image: prompt, negative prompt, sampler preset, Stage C steps,
    guidance, seed, size and number of pictures, a Generate button, a progress bar, a live preview
    and the result grid. Each result is kept in ``last`` and, with ``output_dir``, saved as PNGs with
    their settings (:func:`save_generation`).

    Display it as the last expression of a cell. ``generate()`` is what the button calls; call it
    from code to script the panel (set the widgets' ``value`` first).
    """

    def __init__(
        self,
        prior: Prior,
        decoder: Decoder,
        *,
        prompt: str = "",
        steps: int = 20,
        decoder_steps: int = 10,
        output_dir: str | os.PathLike | None = None,
    ) -> None:
        import ipywidgets as w

        self.prior, self.decoder, self.decoder_steps = prior, decoder, decoder_steps
        self.output_dir = output_dir
        self.last: Generation | None = None
        wide = w.Layout(width="95%")
        self.prompt = w.Textarea(value=prompt, description="Prompt", layout=wide)
        self.negative_prompt = w.Text(description="Negative", layout=wide)
        self.sampler = w.ToggleButtons(
            options=[("official (gdf)", "official"), ("diffusers", "diffusers")], description="Sampler"
        )
        self.steps = w.IntSlider(value=steps, min=1, max=100, description="Steps")
        self.guidance = w.FloatSlider(value=4.0, min=0.0, max=15.0, step=0.1, description="Guidance")
        self.seed = w.IntText(value=0, description="Seed")
        self.size = w.Dropdown(
            options=[(f"{wd} × {ht}", (ht, wd)) for ht, wd in PANEL_SIZES],
            value=(1024, 1024),
            description="Size",
        )
        self.num_images = w.IntSlider(value=1, min=1, max=4, description="Pictures")
        self.button = w.Button(description="Generate", button_style="primary", icon="play")
        self.progress = w.IntProgress(value=0, min=0, max=steps, description="Stage C")
        self.preview = w.Image(format="png", layout=w.Layout(max_width="384px"))
        self.result = w.Image(format="png", layout=w.Layout(max_width="95%"))
        self.status = w.HTML()
        self.button.on_click(self._on_click)
        controls = w.VBox([self.sampler, self.steps, self.guidance, self.seed, self.size, self.num_images])
        self.widget = w.VBox(
            [
                self.prompt,
                self.negative_prompt,
                w.HBox([controls, self.preview]),
                w.HBox([self.button, self.progress]),
                self.status,
                self.result,
            ]
        )

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def _settings(self):
        from .sampling import DIFFUSERS_DECODER, DIFFUSERS_PRIOR, OFFICIAL_DECODER, OFFICIAL_PRIOR

        official = self.sampler.value == "official"
        prior = (OFFICIAL_PRIOR if official else DIFFUSERS_PRIOR).with_(
            steps=self.steps.value, guidance=self.guidance.value
        )
        decoder = (OFFICIAL_DECODER if official else DIFFUSERS_DECODER).with_(steps=self.decoder_steps)
        return prior, decoder

    def generate(self) -> Generation:
        """Generate with the current widget values, showing progress and previews as it goes."""
        from .generation import text_to_image

        prior_settings, decoder_settings = self._settings()
        preview = LivePreview(self.prior, self.preview)
        self.progress.max, self.progress.value = prior_settings.steps, 0

        def on_step(step: int, denoised: torch.Tensor, sample: torch.Tensor) -> None:
            preview(step, denoised, sample)
            self.progress.value = step + 1

        height, width = self.size.value
        result = text_to_image(
            self.prior,
            self.decoder,
            self.prompt.value,
            self.negative_prompt.value,
            height=height,
            width=width,
            num_images=self.num_images.value,
            seed=self.seed.value,
            prior_settings=prior_settings,
            decoder_settings=decoder_settings,
            callback=on_step,
        )
        self.last = result
        self.result.value = png_bytes(image_grid(result.images))
        self.status.value = f"seed {self.seed.value}, {width} × {height}"
        if self.output_dir is not None:
            paths = save_generation(result, self.output_dir)
            self.status.value += (
                f" — saved {', '.join(html.escape(p.name) for p in paths)} in {self.output_dir}"
            )
        return result

    def _on_click(self, _button) -> None:
        """Errors go to the panel, where the user looks (a button callback's exception is otherwise
        only logged to the browser console)."""
        self.button.disabled = True
        try:
            self.generate()
        except (ValueError, RuntimeError) as error:
            self.status.value = f"<b style='color:#b00'>{html.escape(str(error))}</b>"
        finally:
            self.button.disabled = False


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
        self._area = InPlace()

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
        from IPython.display import Image

        if not self.values:
            return
        buffer = io.BytesIO()
        self.figure().savefig(buffer, format="png", dpi=80)
        self._area.show(Image(data=buffer.getvalue()))
