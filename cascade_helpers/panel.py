"""An ipywidgets panel for text-to-image: every knob in one place, a live preview while Stage C runs,
and the result saved with its settings."""

from __future__ import annotations

import html
import os

import torch

from .display import LivePreview, png_bytes, save_generation
from .generation import Generation, text_to_image
from .images import image_grid
from .models import Decoder, Prior
from .sampling import DIFFUSERS_DECODER, DIFFUSERS_PRIOR, OFFICIAL_DECODER, OFFICIAL_PRIOR

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
        official = self.sampler.value == "official"
        prior = (OFFICIAL_PRIOR if official else DIFFUSERS_PRIOR).with_(
            steps=self.steps.value, guidance=self.guidance.value
        )
        decoder = (OFFICIAL_DECODER if official else DIFFUSERS_DECODER).with_(steps=self.decoder_steps)
        return prior, decoder

    def generate(self) -> Generation:
        """Generate with the current widget values, showing progress and previews as it goes."""
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
