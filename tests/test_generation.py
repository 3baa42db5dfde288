"""Text-to-image, image variation and image-to-image on the tiny models: shapes, seeds, the
image-to-image strength semantics, the per-step callback, previews, and the input checks.

Where a test needs "the official result" it recomputes it with the official recipe written out
with torchvision calls (the official notebooks' ``resize_image``, ``clip_preprocess`` and
``effnet_preprocess``), independently of our helpers.
"""

from __future__ import annotations

import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from cascade_helpers.conditioning import PromptTruncatedWarning, encode_text
from cascade_helpers.display import read_settings, save_generation
from cascade_helpers.effnet import _IMAGENET_MEAN, _IMAGENET_STD
from cascade_helpers.generation import image_to_image, image_variation, text_to_image
from cascade_helpers.request import GenerationRequest
from cascade_helpers.sampling import OFFICIAL_DECODER, OFFICIAL_PRIOR
from cascade_helpers.sizes import stage_c_shape
from cascade_helpers.stages import _encode_picture, _variation_embeddings, generate_stage_c, preview_stage_c

FAST_C = OFFICIAL_PRIOR.with_(steps=5)
FAST_B = OFFICIAL_DECODER.with_(steps=2)


def _t2i(pipeline, **kwargs):
    prior, decoder = pipeline
    options = {"height": 512, "width": 512, "prior_settings": FAST_C, "decoder_settings": FAST_B, **kwargs}
    return text_to_image(prior, decoder, options.pop("prompt", "a photo of a cat"), **options)


def _picture(seed: int, height: int = 300, width: int = 300) -> np.ndarray:
    """A smooth random picture (H×W×3 uint8): structure at several scales, like a photo."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 6, 6, generator=generator)
    smooth = torch.nn.functional.interpolate(
        coarse, size=(height, width), mode="bicubic", align_corners=False
    )
    noisy = smooth[0] + 0.05 * torch.randn(3, height, width, generator=generator)
    return (noisy.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float rounding, relative to the tensor's scale: random tiny encoders give values
    of any magnitude, and an absolute tolerance near that magnitude would accept anything."""
    scale = expected.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * scale)


# --- text-to-image ------------------------------------------------------------------------------------


def test_shapes_at_1024(tiny_pipeline):
    result = _t2i(
        tiny_pipeline,
        height=1024,
        width=1024,
        num_images=2,
        prior_settings=OFFICIAL_PRIOR.with_(steps=1),
        decoder_settings=OFFICIAL_DECODER.with_(steps=1),
    )
    assert result.stage_c_latents.shape == (2, 16, 24, 24)
    assert result.stage_b_latents.shape == (2, 4, 256, 256)
    assert [image.size for image in result.images] == [(1024, 1024)] * 2


def test_any_aspect_ratio(tiny_pipeline):
    result = _t2i(tiny_pipeline, height=640, width=1536)
    assert result.stage_c_latents.shape == (1, 16, 15, 36)
    assert result.images[0].size == (1536, 640)


def test_same_seed_same_pictures(tiny_pipeline):
    first, second = _t2i(tiny_pipeline, seed=7), _t2i(tiny_pipeline, seed=7)
    assert torch.equal(first.stage_c_latents, second.stage_c_latents)
    assert torch.equal(first.stage_b_latents, second.stage_b_latents)
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))


def test_different_seeds_differ(tiny_pipeline):
    first, second = _t2i(tiny_pipeline, seed=7), _t2i(tiny_pipeline, seed=8)
    assert (first.stage_c_latents - second.stage_c_latents).abs().mean() > 0.1


def test_images_of_one_batch_differ(tiny_pipeline):
    latents = _t2i(tiny_pipeline, num_images=2).stage_c_latents
    assert (latents[0] - latents[1]).abs().mean() > 0.1


def test_negative_prompt_changes_the_result(tiny_pipeline):
    plain, negative = _t2i(tiny_pipeline), _t2i(tiny_pipeline, negative_prompt="a dog")
    assert not torch.allclose(plain.stage_c_latents, negative.stage_c_latents)


def test_settings_record_what_reproduces_the_pictures(tiny_pipeline):
    settings = _t2i(tiny_pipeline, seed=3, num_images=2, negative_prompt="a dog").settings
    assert settings["prompt"] == "a photo of a cat" and settings["negative_prompt"] == "a dog"
    assert (settings["seed"], settings["num_images"], settings["height"], settings["width"]) == (
        3,
        2,
        512,
        512,
    )
    assert settings["prior"]["steps"] == 5 and settings["prior"]["guidance"] == 4.0
    assert settings["decoder"] == {
        "steps": 2,
        "guidance": 1.1,
        "shift": 1.0,
        "guidance_rescale": 0.7,
        "sampler": "official",
        "t_start": 1.0,
        "eta": 0.0,
    }


def test_callback_once_per_stage_c_step(tiny_pipeline):
    steps, shapes = [], set()

    def record(step, denoised, sample):
        steps.append(step)
        shapes.add((tuple(denoised.shape), tuple(sample.shape)))

    _t2i(tiny_pipeline, num_images=2, callback=record)
    assert steps == [0, 1, 2, 3, 4]
    assert shapes == {((2, 16, 12, 12), (2, 16, 12, 12))}


def test_a_picture_made_with_a_sampler_is_remade_with_it_from_its_png(tiny_pipeline, tmp_path):
    """The PNG's settings name the sampler (and eta) of each stage; the request rebuilt from them runs
    them again: the same latents, which the default sampler would not give."""
    ddim, dpm = FAST_C.with_(sampler="ddim", eta=0.5), FAST_B.with_(sampler="dpmpp_2m")
    first = _t2i(tiny_pipeline, prior_settings=ddim, decoder_settings=dpm, seed=3)
    request = GenerationRequest.from_dict(read_settings(save_generation(first, tmp_path)[0]))
    assert (request.prior_settings, request.decoder_settings) == (ddim, dpm)
    again = text_to_image(*tiny_pipeline, request)
    assert torch.equal(again.stage_c_latents, first.stage_c_latents)
    assert torch.equal(again.stage_b_latents, first.stage_b_latents)
    assert not torch.allclose(first.stage_c_latents, _t2i(tiny_pipeline, seed=3).stage_c_latents)


def test_long_prompts_reach_stage_c(tiny_pipeline):
    """Cut, the words past 77 tokens change nothing (and a warning says so); with long_prompts they
    change the picture, without a warning, and the settings say how the prompt was read."""
    fits = "a photo of a cat " * 15
    with pytest.warns(PromptTruncatedWarning):
        cut = _t2i(tiny_pipeline, prompt=fits + "red horse")
    assert torch.equal(cut.stage_c_latents, _t2i(tiny_pipeline, prompt=fits).stage_c_latents)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        full = _t2i(tiny_pipeline, prompt=fits + "red horse", negative_prompt="blurry", long_prompts=True)
    assert not torch.allclose(full.stage_c_latents, cut.stage_c_latents)
    assert full.settings["long_prompts"] is True and cut.settings["long_prompts"] is False


def test_text_embeddings_of_two_lengths_are_refused_by_name(tiny_pipeline):
    prior, _ = tiny_pipeline
    long = encode_text(prior, "a photo of a cat " * 16, long_prompts=True)
    with pytest.raises(ValueError, match="154 tokens long and the negative prompt's 77: encode both in one"):
        generate_stage_c(prior, long, encode_text(prior, ""), stage_c_shape(512, 512, 1), FAST_C)


def test_each_stage_cost_is_recorded_and_printed_as_one_table(tiny_pipeline):
    result = _t2i(tiny_pipeline)
    assert list(result.costs) == ["text encoder", "Stage C", "Stage B", "Stage A"]
    assert all(cost.seconds > 0 and cost.peak_gpu_bytes is None for cost in result.costs.values())  # CPU
    table = result.cost_table().splitlines()
    assert table[0].split() == ["stage", "seconds", "peak", "GPU", "memory"] and len(table) == 5
    assert table[2].startswith("Stage C") and table[2].endswith("CPU: wall time only")


# --- previews -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("latent_size,picture_size", [((24, 24), (192, 192)), ((15, 36), (120, 288))])
def test_previews_are_eight_times_the_latents(tiny_pipeline, latent_size, picture_size):
    prior, _ = tiny_pipeline
    previews = preview_stage_c(prior, torch.randn(2, 16, *latent_size))
    assert previews.shape == (2, 3, *picture_size)
    assert previews.min() >= 0 and previews.max() <= 1


# --- image-to-image -----------------------------------------------------------------------------------


def test_encoding_follows_the_official_image_to_image_preparation(tiny_pipeline):
    """Official example, square picture, 1024² output: ``resize_image`` (bilinear, antialiased, short
    side 768), ImageNet normalization, EfficientNet → 24×24 latents."""
    prior, _ = tiny_pipeline
    picture = _picture(1)
    resized = TF.resize(TF.to_tensor(picture), 768, interpolation=InterpolationMode.BILINEAR, antialias=True)
    with torch.no_grad():
        expected = prior.effnet(TF.normalize(resized, _IMAGENET_MEAN, _IMAGENET_STD)[None])
    ours = _encode_picture(prior, picture, 1024, 1024)
    assert ours.shape == (1, 16, 24, 24)
    _assert_close(ours, expected)


def test_strength_0_returns_the_pictures_own_encoding(tiny_pipeline):
    prior, decoder = tiny_pipeline
    picture = _picture(1, 200, 300)
    calls = []
    result = image_to_image(
        prior, decoder, picture, "a photo of a cat", strength=0.0, height=512, width=768, num_images=2,
        decoder_settings=FAST_B, callback=lambda *args: calls.append(args),
    )  # fmt: skip
    expected = _encode_picture(prior, picture, 512, 768)
    assert result.stage_c_latents.shape == (2, 16, 12, 18)
    assert torch.equal(result.stage_c_latents, expected.expand(2, -1, -1, -1))
    assert calls == [], "nothing to denoise at strength 0"


def test_strength_1_ignores_the_picture(tiny_pipeline):
    prior, decoder = tiny_pipeline
    result = image_to_image(
        prior, decoder, _picture(1), "a photo of a cat", strength=1.0, height=512, width=512, seed=4,
        prior_settings=FAST_C, decoder_settings=FAST_B,
    )  # fmt: skip
    plain = _t2i(tiny_pipeline, seed=4)
    assert torch.equal(result.stage_c_latents, plain.stage_c_latents)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(plain.images[0]))


def test_strength_1_still_names_a_missing_picture(tiny_pipeline, tmp_path):
    prior, decoder = tiny_pipeline
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        image_to_image(prior, decoder, tmp_path / "nowhere.png", "a cat", strength=1.0, height=512, width=512)


def test_partial_strength_runs_the_official_number_of_steps_from_the_picture(tiny_pipeline):
    """Official example: noise to 0.8 and run int(20 × 0.8) = 16 of the 20 steps, from t = 0.8."""
    prior, decoder = tiny_pipeline
    calls = []

    def run(picture):
        return image_to_image(
            prior, decoder, picture, "a photo of a cat", strength=0.8, height=512, width=512, seed=4,
            prior_settings=FAST_C, decoder_settings=FAST_B, callback=lambda step, *_: calls.append(step),
        )  # fmt: skip

    first = run(_picture(1))
    assert calls == [0, 1, 2, 3], "int(5 steps × 0.8) = 4 steps"
    assert first.settings["prior"] == FAST_C.as_dict(), "the settings record the request as asked"
    assert first.settings["strength"] == 0.8
    other_picture = run(_picture(2))
    assert not torch.allclose(first.stage_c_latents, other_picture.stage_c_latents), "the picture matters"
    assert not torch.allclose(first.stage_c_latents, _t2i(tiny_pipeline, seed=4).stage_c_latents)


def test_an_image_to_image_request_rebuilt_from_its_settings_makes_the_same_pictures(tiny_pipeline):
    """Stage C ran 4 of the 5 steps asked; the request rebuilt from the settings must ask for 5 again
    (rebuilt from what ran, a replay would run int(4 × 0.8) = 3)."""
    prior, decoder = tiny_pipeline
    picture = _picture(1)
    options = {"strength": 0.8, "height": 512, "width": 512, "seed": 4}
    first = image_to_image(
        prior, decoder, picture, "a cat", prior_settings=FAST_C, decoder_settings=FAST_B, **options
    )
    request = GenerationRequest.from_dict(first.settings)
    assert request.prior_settings == FAST_C
    again = image_to_image(prior, decoder, picture, request, strength=first.settings["strength"])
    assert torch.equal(again.stage_c_latents, first.stage_c_latents)


def test_the_picture_is_noised_on_the_unshifted_schedule(tiny_pipeline, monkeypatch):
    """Official image-to-image: ``gdf.diffuse(latents, t=0.8)`` with the default shift 1, then sampling
    with shift 2 from t_start 0.8. x_t = √v·x0 + √(1−v)·noise with the cosine schedule's signal
    variance v = cos²((t + s)/(1 + s)·π/2) / cos²(s/(1 + s)·π/2), s = 0.008, written out here."""
    import math

    from cascade_helpers import generation, stages

    prior, decoder = tiny_pipeline
    seen = {}
    real_noise, real_sample = generation.initial_noise, stages._sample

    def record_noise(*args, **kwargs):
        seen.setdefault("noise", real_noise(*args, **kwargs))
        return seen["noise"]

    def record_start(denoiser, shape, cond, uncond, settings, device, generator, x_init, *rest):
        if "x_init" not in seen:  # Stage C's call comes first
            seen["x_init"], seen["settings"] = x_init, settings
        return real_sample(denoiser, shape, cond, uncond, settings, device, generator, x_init, *rest)

    monkeypatch.setattr(generation, "initial_noise", record_noise)
    monkeypatch.setattr(stages, "_sample", record_start)
    picture = _picture(1)
    image_to_image(
        prior, decoder, picture, "a cat", strength=0.8, height=512, width=512, prior_settings=FAST_C,
        decoder_settings=FAST_B,
    )  # fmt: skip
    s = 0.008
    variance = math.cos((0.8 + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    expected = (
        math.sqrt(variance) * _encode_picture(prior, picture, 512, 512)
        + math.sqrt(1 - variance) * seen["noise"]
    )
    torch.testing.assert_close(seen["x_init"], expected)
    assert (seen["settings"].t_start, seen["settings"].shift) == (0.8, FAST_C.shift) and FAST_C.shift == 2.0


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan")])
def test_invalid_strength_names_the_range(tiny_pipeline, strength):
    prior, decoder = tiny_pipeline
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        image_to_image(prior, decoder, _picture(1), "a cat", strength=strength)


# --- image variation ----------------------------------------------------------------------------------


def test_variation_embedding_follows_the_official_preparation(tiny_pipeline):
    """Short side to 768 (bilinear, antialiased), then the official ``clip_preprocess`` as it ran on
    torchvision 0.16: bicubic resize of tensors without antialiasing, centre crop, CLIP normalization."""
    prior, _ = tiny_pipeline
    picture = _picture(3, height=300, width=500)
    clip = prior.clip_image
    official = TF.resize(TF.to_tensor(picture), 768, interpolation=InterpolationMode.BILINEAR, antialias=True)
    official = TF.resize(official, clip.resize, interpolation=InterpolationMode.BICUBIC, antialias=False)
    official = TF.normalize(TF.center_crop(official, list(clip.crop)), clip.mean, clip.std)
    with torch.no_grad():
        expected = prior.image_encoder(pixel_values=official[None]).image_embeds.unsqueeze(1)
    _assert_close(_variation_embeddings(prior, picture), expected)


def test_variation_is_conditioned_on_the_picture(tiny_pipeline):
    prior, decoder = tiny_pipeline

    def vary(picture):
        return image_variation(
            prior,
            decoder,
            picture,
            height=512,
            width=768,
            seed=2,
            prior_settings=FAST_C,
            decoder_settings=FAST_B,
        )

    first = vary(_picture(1))
    assert first.images[0].size == (768, 512) and first.settings["prompt"] == ""
    assert not torch.allclose(first.stage_c_latents, vary(_picture(2)).stage_c_latents)
    no_picture = _t2i(tiny_pipeline, prompt="", seed=2, width=768)
    assert not torch.allclose(first.stage_c_latents, no_picture.stage_c_latents)


# --- inputs -------------------------------------------------------------------------------------------


def _modes() -> dict[str, PIL.Image.Image]:
    rgb = PIL.Image.fromarray(_picture(4, 64, 96))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(PIL.Image.new("L", rgb.size, 0))  # fully transparent
    palette = rgb.convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=16)
    return {"RGB": rgb, "RGBA": rgba, "L": rgb.convert("L"), "P": palette, "LA": rgb.convert("LA")}


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "LA"])
def test_any_picture_mode_is_accepted(tiny_pipeline, mode):
    prior, _ = tiny_pipeline
    picture = _modes()[mode]
    assert _encode_picture(prior, picture, 512, 640).shape == (1, 16, 12, 15)
    assert _variation_embeddings(prior, picture).shape == (1, 1, 24)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_image_to_image_from_a_file(tiny_pipeline, tmp_path, mode):
    prior, decoder = tiny_pipeline
    path = tmp_path / "picture.png"
    _modes()[mode].save(path)
    result = image_to_image(
        prior, decoder, path, "a cat", strength=0.6, height=512, width=512, prior_settings=FAST_C,
        decoder_settings=FAST_B,
    )  # fmt: skip
    assert result.stage_c_latents.shape == (1, 16, 12, 12) and result.images[0].size == (512, 512)


def test_transparent_pixels_count_as_white_not_black(tiny_pipeline):
    """A cut-out on a transparent background is a subject on white, as a viewer shows it."""
    prior, _ = tiny_pipeline
    transparent = _encode_picture(prior, _modes()["RGBA"], 512, 512)
    white = _encode_picture(prior, PIL.Image.new("RGB", (96, 64), "white"), 512, 512)
    _assert_close(transparent, white)


def test_grey_and_array_inputs_match_their_rgb_form(tiny_pipeline):
    prior, _ = tiny_pipeline
    grey = _modes()["L"]
    as_rgb = grey.convert("RGB")
    _assert_close(_variation_embeddings(prior, grey), _variation_embeddings(prior, as_rgb))
    as_array = np.asarray(_modes()["RGBA"].convert("RGB"))
    _assert_close(
        _variation_embeddings(prior, as_array), _variation_embeddings(prior, PIL.Image.fromarray(as_array))
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"height": 1000}, "height=1000: use a multiple of 128 from 512 to 2048"),
        ({"width": 4096}, "width=4096: use a multiple of 128 from 512 to 2048"),
        ({"height": 384}, "height=384: use a multiple of 128 from 512 to 2048"),
        ({"num_images": 0}, "num_images must be from 1 to 16"),
    ],
)
def test_invalid_requests_name_the_valid_range(tiny_pipeline, kwargs, message):
    """(Invalid step counts: tests/test_sampling.py.)"""
    with pytest.raises(ValueError, match=message):
        _t2i(tiny_pipeline, **kwargs)
