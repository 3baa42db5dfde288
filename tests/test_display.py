"""Live previews, the generation panel, and PNGs that carry their settings."""

from __future__ import annotations

import html
import io

import PIL.Image
import pytest
import torch

from cascade_helpers.display import LivePreview, read_settings, save_generation
from cascade_helpers.generation import Generation, text_to_image
from cascade_helpers.panel import GenerationPanel
from cascade_helpers.sampling import OFFICIAL_DECODER, OFFICIAL_PRIOR


def _generation(prompt: str = "a photo of a cat", count: int = 2) -> Generation:
    images = [PIL.Image.new("RGB", (64, 32), (40 * i, 0, 0)) for i in range(count)]
    settings = {"prompt": prompt, "seed": 5, "num_images": count, "prior": {"steps": 20, "guidance": 4.0}}
    return Generation(images, torch.zeros(count, 16, 2, 2), torch.zeros(count, 4, 8, 16), settings)


def _size(png: bytes) -> tuple[int, int]:
    return PIL.Image.open(io.BytesIO(png)).size


# --- PNG metadata -------------------------------------------------------------------------------------


def test_saved_pngs_carry_their_settings(tmp_path):
    paths = save_generation(_generation(), tmp_path)
    assert [p.name for p in paths] == ["cascade-0001-seed5-0.png", "cascade-0001-seed5-1.png"]
    for index, path in enumerate(paths):
        settings = read_settings(path)
        assert settings["prompt"] == "a photo of a cat" and settings["seed"] == 5
        assert settings["prior"] == {"steps": 20, "guidance": 4.0}
        assert settings["index"] == index and settings["num_images"] == 2
        with PIL.Image.open(path) as picture:
            assert picture.text["Description"] == "a photo of a cat"
            assert picture.size == (64, 32)


def test_a_new_run_never_overwrites_an_older_one(tmp_path):
    first = save_generation(_generation(), tmp_path)
    second = save_generation(_generation(count=1), tmp_path)
    assert second[0].name == "cascade-0002-seed5-0.png"
    assert all(p.exists() for p in first + second)


def test_any_prompt_survives_the_round_trip(tmp_path):
    prompt = 'Ein "Würstchen" 🌭 — 東京の夜'
    (path,) = save_generation(_generation(prompt, count=1), tmp_path)
    assert read_settings(path)["prompt"] == prompt


def test_reading_a_png_without_settings_says_why(tmp_path):
    path = tmp_path / "plain.png"
    PIL.Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(ValueError, match="no 'stable_cascade' metadata: it was not saved by save_generation"):
        read_settings(path)


# --- live previews ------------------------------------------------------------------------------------


def test_live_preview_draws_every_step_into_a_widget(tiny_pipeline):
    import ipywidgets

    prior, decoder = tiny_pipeline
    widget = ipywidgets.Image(format="png")
    preview = LivePreview(prior, widget)
    text_to_image(
        prior,
        decoder,
        "a photo of a cat",
        num_images=2,
        prior_settings=OFFICIAL_PRIOR.with_(steps=3),
        decoder_settings=OFFICIAL_DECODER.with_(steps=1),
        callback=preview,
    )
    assert preview.updates == 3
    assert preview.latest.size == (2 * 192, 192), "two 192² previews side by side for 1024²"
    assert _size(widget.value) == (384, 192)


def test_live_preview_outside_a_notebook_only_keeps_the_picture(tiny_pipeline):
    prior, _ = tiny_pipeline
    preview = LivePreview(prior)
    preview(0, torch.randn(1, 16, 15, 36), torch.randn(1, 16, 15, 36))
    assert preview.latest.size == (288, 120)


# --- the panel ----------------------------------------------------------------------------------------


@pytest.fixture
def panel(tiny_pipeline, tmp_path):
    prior, decoder = tiny_pipeline
    panel = GenerationPanel(prior, decoder, prompt="a red cat", steps=3, decoder_steps=1, output_dir=tmp_path)
    panel.size.value = (512, 768)
    return panel


def _values(widget) -> list:
    """Every value a widget is given from now on."""
    seen = []
    widget.observe(lambda change: seen.append(change["new"]), names="value")
    return seen


def test_the_generate_button_runs_a_generation(panel, tmp_path):
    panel.seed.value, panel.num_images.value, panel.steps.value = 9, 2, 4
    panel.button.click()
    result = panel.last
    assert result.settings["prompt"] == "a red cat" and result.settings["seed"] == 9
    assert result.settings["prior"]["steps"] == 4 and result.settings["prior"]["sampler"] == "official"
    assert [p.size for p in result.images] == [(768, 512)] * 2
    assert (panel.progress.value, panel.progress.max) == (4, 4)
    assert _size(panel.preview.value) == (2 * 144, 96)
    assert _size(panel.result.value) == (2 * 768, 512)
    assert len(list(tmp_path.glob("cascade-0001-seed9-*.png"))) == 2
    assert not panel.button.disabled


def test_stage_b_steps_and_guidance_come_from_the_panel(panel):
    panel.decoder_steps.value, panel.decoder_guidance.value = 3, 2.5
    stage_c, stage_b = _values(panel.progress), _values(panel.decoder_progress)
    settings = panel.generate().settings
    assert settings["decoder"]["steps"] == 3 and settings["decoder"]["guidance"] == 2.5
    assert settings["decoder"]["shift"] == 1.0 and settings["decoder"]["guidance_rescale"] == 0.7  # official
    assert stage_c == [1, 2, 3] and stage_b == [1, 2, 3], "one tick a step"
    assert panel.decoder_progress.max == 3
    panel.generate()
    assert stage_b == [1, 2, 3, 0, 1, 2, 3], "a new run starts from an empty bar"


def test_the_panel_switches_to_the_diffusers_settings(panel):
    panel.sampler.value = "diffusers"
    assert panel.decoder_guidance.value == 0.0, "choosing a sampler loads its preset's guidance"
    settings = panel.generate().settings
    assert settings["prior"]["sampler"] == settings["decoder"]["sampler"] == "diffusers"
    assert settings["decoder"]["guidance"] == 0.0 and settings["decoder"]["steps"] == 1
    panel.sampler.value = "official"
    assert (panel.guidance.value, panel.decoder_guidance.value) == (4.0, 1.1)


def test_the_panel_draws_its_progress_only_in_its_own_bars(panel, capsys):
    """tqdm bars would land outside the panel (below the cell that scripts it, or nowhere when the
    button is clicked) and leave empty output areas behind in a notebook; the panel turns them off."""
    prior, decoder = panel.prior, panel.decoder
    quick = {
        "prior_settings": OFFICIAL_PRIOR.with_(steps=1),
        "decoder_settings": OFFICIAL_DECODER.with_(steps=1),
    }
    text_to_image(prior, decoder, "a cat", height=512, width=512, **quick)
    assert "Stage C" in capsys.readouterr().err, "the bars this test expects to be hidden"
    panel.generate()
    assert "Stage" not in capsys.readouterr().err


def test_pictures_keep_their_aspect_ratio_in_the_layout(panel):
    """A flex row stretches its items to the tallest one unless they align to its start (192×192
    previews were drawn 192×213); the browser test measures the drawn boxes."""
    for picture in (panel.preview, panel.result):
        assert picture.layout.align_self == "flex-start" and picture.layout.height == "auto"
        assert picture.layout.object_fit == "contain"


def test_errors_show_in_the_panel(panel, monkeypatch):
    def fail():
        raise ValueError("height=100: use a multiple of 128")

    monkeypatch.setattr(panel, "generate", fail)
    panel.button.click()
    assert "height=100: use a multiple of 128" in panel.status.value
    assert not panel.button.disabled


@pytest.mark.parametrize(
    "error",
    [
        FloatingPointError("Stage C produced NaN or infinite values"),  # NonFiniteLatentsError's base
        PermissionError("outputs/panel is read-only"),
        TypeError("a <b>bad</b> value"),
    ],
)
def test_every_error_shows_in_the_panel_escaped(panel, monkeypatch, error):
    """A button callback's exception otherwise reaches only the browser console."""

    def fail():
        raise error

    monkeypatch.setattr(panel, "generate", fail)
    panel.button.click()
    assert html.escape(str(error)) in panel.status.value
    assert "<b>bad</b>" not in panel.status.value
