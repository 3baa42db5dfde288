"""An ipywidgets panel for text-to-image: every knob in one place, a live preview while Stage C runs,
and the result saved with its settings."""

from __future__ import annotations

import html
import os

import torch

from .display import LivePreview, _png_bytes, save_generation
from .generation import Generation, text_to_image
from .images import image_grid
from .models import Decoder, Prior
from .sampling import DIFFUSERS_DECODER, DIFFUSERS_PRIOR, OFFICIAL_DECODER, OFFICIAL_PRIOR, StageSettings

#: (height, width) choices of the panel: multiples of 128 the models were trained on, several ratios
_PANEL_SIZES = (
    (1024, 1024), (896, 1152), (1152, 896), (768, 1280), (1280, 768), (640, 1536), (1536, 640),
    (768, 1024), (1024, 768), (512, 512), (512, 768), (768, 512), (768, 768), (1536, 1536),
)  # fmt: skip


class GenerationPanel:
    """An ipywidgets panel for text-to-image: prompts, the sampler, each stage's steps and guidance, seed,
    size and count, a Generate button, per-stage progress bars, a live preview and the result grid. Each
    result is kept in ``last`` and, with ``output_dir``, saved as PNGs with their settings.

    Display it as the last expression of a cell. ``generate()`` is what the button calls; call it
    from code to script the panel (set the widgets' ``value`` first).

    Args:
        prior, decoder: the loaded models.
        prompt: the prompt the panel opens with.
        steps, guidance, decoder_steps, decoder_guidance: Stage C's, then B's (official 20, 4, 10, 1.1).
        output_dir: where each result is saved; None keeps results in ``last`` only.
    """

    def __init__(
        self,
        prior: Prior,
        decoder: Decoder,
        *,
        prompt: str = "",
        steps: int = OFFICIAL_PRIOR.steps,
        guidance: float = OFFICIAL_PRIOR.guidance,
        decoder_steps: int = OFFICIAL_DECODER.steps,
        decoder_guidance: float = OFFICIAL_DECODER.guidance,
        output_dir: str | os.PathLike | None = None,
    ) -> None:
        import ipywidgets as w

        self.prior, self.decoder, self.output_dir = prior, decoder, output_dir
        self.last: Generation | None = None
        wide = w.Layout(width="95%")
        label = {"description_width": "120px"}  # "Stage B guidance" in full
        self.prompt = w.Textarea(value=prompt, description="Prompt", layout=wide)
        self.negative_prompt = w.Text(description="Negative", layout=wide)
        self.long_prompts = w.Checkbox(description="Long prompts (beyond 77 tokens)", indent=False)
        samplers = [("official (gdf DDPM)", "official"), ("DDIM", "ddim"), ("DPM-Solver++ 2M", "dpmpp_2m")]
        self.sampler = w.ToggleButtons(options=[*samplers, ("diffusers", "diffusers")], description="Sampler")
        self.eta = w.FloatSlider(
            value=0.0, min=0.0, max=1.0, step=0.05, description="DDIM eta", style=label, disabled=True
        )
        self.steps = w.IntSlider(value=steps, min=1, max=100, description="Stage C steps", style=label)
        self.guidance = w.FloatSlider(
            value=guidance, min=0.0, max=15.0, step=0.1, description="Stage C guidance", style=label
        )
        self.decoder_steps = w.IntSlider(
            value=decoder_steps, min=1, max=50, description="Stage B steps", style=label
        )
        self.decoder_guidance = w.FloatSlider(
            value=decoder_guidance, min=0.0, max=5.0, step=0.1, description="Stage B guidance", style=label
        )
        self.seed = w.IntText(value=0, description="Seed")
        sizes = [(f"{wd} × {ht}", (ht, wd)) for ht, wd in _PANEL_SIZES]
        self.size = w.Dropdown(options=sizes, value=(1024, 1024), description="Size")
        self.num_images = w.IntSlider(value=1, min=1, max=4, description="Pictures")
        self.button = w.Button(description="Generate", button_style="primary", icon="play")
        self.progress = w.IntProgress(value=0, min=0, max=steps, description="Stage C")
        self.decoder_progress = w.IntProgress(value=0, min=0, max=decoder_steps, description="Stage B")
        # a flex row stretches its items to the tallest (the controls): align_self keeps a preview
        # 192×192 in JupyterLab, height auto its ratio when max_width shrinks a wide one
        picture = {"height": "auto", "align_self": "flex-start", "object_fit": "contain"}
        self.preview = w.Image(format="png", layout=w.Layout(max_width="384px", **picture))
        self.result = w.Image(format="png", layout=w.Layout(max_width="95%", **picture))
        self.status = w.HTML()
        self.button.on_click(self._on_click)
        self.sampler.observe(self._use_preset_guidance, names="value")
        stage_c, stage_b = [self.steps, self.guidance], [self.decoder_steps, self.decoder_guidance]
        controls = w.VBox([self.sampler, self.eta, *stage_c, *stage_b, self.seed, self.size, self.num_images])
        bars = w.HBox([self.button, w.VBox([self.progress, self.decoder_progress])])
        top = [self.prompt, self.negative_prompt, self.long_prompts, w.HBox([controls, self.preview]), bars]
        self.widget = w.VBox([*top, self.status, self.result])
        # class names a page can be checked by (tests/test_browser.py)
        names = {"panel": self.widget, "preview": self.preview, "result": self.result, "status": self.status}
        names |= {"progress-stage-c": self.progress, "progress-stage-b": self.decoder_progress}
        for name, widget in names.items():
            widget.add_class(f"cascade-{name}")

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def _presets(self) -> tuple[StageSettings, StageSettings]:
        """diffusers' own presets, or the official settings with the chosen step: what guidance resets to."""
        if self.sampler.value == "diffusers":
            return DIFFUSERS_PRIOR, DIFFUSERS_DECODER
        eta = self.eta.value if self.sampler.value == "ddim" else 0.0
        step = {"sampler": self.sampler.value, "eta": eta}
        return OFFICIAL_PRIOR.with_(**step), OFFICIAL_DECODER.with_(**step)

    def _use_preset_guidance(self, _change) -> None:
        """Guidance follows the preset (diffusers' Stage B has none) and eta is DDIM's; steps stay."""
        prior, decoder = self._presets()
        self.guidance.value, self.decoder_guidance.value = prior.guidance, decoder.guidance
        self.eta.disabled = self.sampler.value != "ddim"

    def generate(self) -> Generation:
        """Generate with the widgets' values, progress and previews in the panel only (no tqdm bars).

        Returns:
            The :class:`Generation`, also kept in ``last`` (and saved, with ``output_dir``).
        """
        prior_preset, decoder_preset = self._presets()
        prior_settings = prior_preset.with_(steps=self.steps.value, guidance=self.guidance.value)
        decoder_settings = decoder_preset.with_(
            steps=self.decoder_steps.value, guidance=self.decoder_guidance.value
        )
        preview = LivePreview(self.prior, self.preview)
        self.progress.max, self.progress.value = prior_settings.steps, 0
        self.decoder_progress.max, self.decoder_progress.value = decoder_settings.steps, 0

        def on_prior_step(step: int, denoised: torch.Tensor, sample: torch.Tensor) -> None:
            preview(step, denoised, sample)
            self.progress.value = step + 1

        def on_decoder_step(step: int, denoised: torch.Tensor, sample: torch.Tensor) -> None:
            self.decoder_progress.value = step + 1

        height, width = self.size.value
        request = dict(height=height, width=width, num_images=self.num_images.value, seed=self.seed.value)
        request |= {"prior_settings": prior_settings, "decoder_settings": decoder_settings}
        watch = {"callback": on_prior_step, "decoder_callback": on_decoder_step, "progress": False}
        prompts = (self.prompt.value, self.negative_prompt.value)
        result = text_to_image(
            self.prior, self.decoder, *prompts, long_prompts=self.long_prompts.value, **request, **watch
        )
        self.last = result
        self.result.value = _png_bytes(image_grid(result.images))
        self.status.value = f"seed {self.seed.value}, {width} × {height}"
        if self.output_dir is not None:
            paths = save_generation(result, self.output_dir)
            names = ", ".join(html.escape(p.name) for p in paths)
            self.status.value += f" — saved {names} in {html.escape(str(self.output_dir))}"
        return result

    def _on_click(self, _button) -> None:
        """Errors go to the panel: a button callback's exception is otherwise only in the browser console."""
        self.button.disabled = True
        try:
            self.generate()
        except Exception as error:
            self.status.value = f"<b style='color:#b00'>{html.escape(str(error))}</b>"
        finally:
            self.button.disabled = False
