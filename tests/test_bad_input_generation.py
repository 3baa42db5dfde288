"""Hostile input to generation: sampler settings, requests, ControlNet strengths, devices, NaN
latents — each refused with the exception type and a message naming the input or the fix — and
prompt lists, which must reach every picture of every entry point (and its PNG) the diffusers way.

The expectations are independent of the code: a list of prompts is compared with single-prompt
runs, a broken model with the error a user needs.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from cascade_helpers.controlnet.filters import control_features
from cascade_helpers.controlnet.model import ControlNet
from cascade_helpers.devices import pick_device
from cascade_helpers.display import read_settings, save_generation
from cascade_helpers.generation import controlnet_to_image, image_to_image, image_variation, text_to_image
from cascade_helpers.loading import load_prior
from cascade_helpers.sampling import OFFICIAL_DECODER, OFFICIAL_PRIOR, StageSettings
from cascade_helpers.sizes import stage_b_shape
from cascade_helpers.stages import generate_stage_c

# guidance rescale off: its std is taken over the whole batch, which would tie the pictures together
PRIOR = OFFICIAL_PRIOR.with_(steps=2, guidance_rescale=0.0)
DECODER = OFFICIAL_DECODER.with_(steps=1, guidance=0.0, guidance_rescale=0.0)
FAST = {"height": 512, "width": 512, "prior_settings": PRIOR, "decoder_settings": DECODER}


def _picture() -> np.ndarray:
    generator = torch.Generator().manual_seed(3)
    return (torch.rand(96, 128, 3, generator=generator) * 255).byte().numpy()


# --- sampler settings ----------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
SETTINGS_CASES = [
    ({"guidance": NAN}, "guidance must be a finite number ≥ 0"),  # silently no guidance before
    ({"guidance": INF}, "guidance must be a finite number ≥ 0"),  # black pictures before
    ({"guidance": -1.0}, "guidance must be a finite number ≥ 0"),
    ({"guidance": "4"}, r"guidance must be a finite number ≥ 0 .*not '4'"),
    ({"guidance": True}, "guidance must be a finite number"),
    ({"shift": NAN}, "shift must be a finite number > 0"),  # black pictures before
    ({"shift": INF}, "shift must be a finite number > 0"),
    ({"shift": -2.0}, "shift must be a finite number > 0"),
    ({"guidance_rescale": NAN}, r"guidance_rescale must be in \[0, 1\]"),
    ({"guidance_rescale": -0.5}, r"guidance_rescale must be in \[0, 1\]"),
    ({"t_start": NAN}, "t_start"),
    ({"t_start": INF}, "t_start"),
    ({"sampler": "Official"}, "unknown sampler 'Official' \\(did you mean 'official'\\?\\): use one of"),
    ({"sampler": "dpm++"}, "unknown sampler 'dpm\\+\\+'.*'official', 'ddim', 'dpmpp_2m', 'diffusers'"),
    ({"sampler": "ddim", "eta": 1.5}, r"eta must be in \[0, 1\]"),
    ({"sampler": "ddim", "eta": NAN}, r"eta must be in \[0, 1\]"),
    ({"eta": 0.5}, "eta=0.5 is an option of sampler='ddim' only, not of 'official'"),
    ({"steps": True}, "steps must be a whole number from 1 to 1000, not True"),
    ({"steps": "20"}, "steps must be a whole number"),
]


@pytest.mark.parametrize(("changes", "message"), SETTINGS_CASES, ids=lambda c: str(c))
def test_bad_stage_settings_are_refused_by_name(changes, message):
    with pytest.raises(ValueError, match=message):
        OFFICIAL_PRIOR.with_(**changes)


def test_settings_saved_in_a_png_are_the_ones_that_ran():
    """An unknown sampler used to run diffusers' sampler while the metadata said shift 2 / rescale 0.7;
    now every accepted setting is one of the two samplers, as plain Python numbers."""
    settings = StageSettings(steps=np.int64(5), guidance=np.float32(4.0), shift=2)
    assert settings.as_dict() == {
        "steps": 5,
        "guidance": 4.0,
        "shift": 2.0,
        "guidance_rescale": 0.0,
        "sampler": "official",
        "t_start": 1.0,
        "eta": 0.0,
    }
    assert type(settings.steps) is int and type(settings.guidance) is float


# --- requests ------------------------------------------------------------------------------------------

REQUEST_CASES = [
    ({"prompt": None}, TypeError, "prompt must be a string or a non-empty list of strings, not None"),
    ({"prompt": []}, TypeError, "prompt must be a string or a non-empty list of strings, not \\[\\]"),
    ({"prompt": ["a cat", 3]}, TypeError, "prompt must be a string or a non-empty list"),
    ({"prompt": ["a", "b"], "negative_prompt": ["x"]}, ValueError, "1 negative prompts for 2 prompt"),
    ({"prompt": ["a", "b"], "num_images": 3}, ValueError, "num_images=3 cannot be shared among 2 prompts"),
    ({"num_images": 2.0}, ValueError, "num_images must be from 1 to 16 \\(a whole number\\), not 2.0"),
    ({"seed": -1}, ValueError, r"seed must be a whole number from 0 to 2\*\*63 - 1, not -1"),
    ({"seed": 1.5}, ValueError, "seed must be a whole number from 0 .*not 1.5"),
    ({"seed": 2**64}, ValueError, "seed must be a whole number from 0 .*not 18446744073709551616"),
    ({"height": "1024"}, ValueError, "height='1024': use a multiple of 128"),
    (
        {"prior_setting": PRIOR},
        TypeError,
        "unknown option 'prior_setting' \\(did you mean 'prior_settings'\\?\\)",
    ),
    ({"prior_settings": {"steps": 20}}, TypeError, "prior_settings must be a StageSettings"),
]


@pytest.mark.parametrize(("options", "error", "message"), REQUEST_CASES, ids=lambda c: str(c)[:40])
def test_bad_requests_are_refused_before_any_model_runs(options, error, message, monkeypatch):
    import cascade_helpers.generation as generation

    monkeypatch.setattr(generation, "_generate", lambda *a, **k: pytest.fail("a model ran"))
    options = {"prompt": "a cat", **options}
    with pytest.raises(error, match=message):
        text_to_image(None, None, options.pop("prompt"), **options)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda p, d: image_to_image(p, d, _picture(), "a cat", strength="0.5"),
            "strength must be in \\[0, 1\\]",
        ),
        (
            lambda p, d: image_to_image(p, d, _picture(), "a cat", strength=INF),
            "strength must be in \\[0, 1\\]",
        ),
        (
            lambda p, d: controlnet_to_image(p, d, [], "a cat", init_image=_picture(), init_noise=NAN),
            "init_noise must be in \\[0, 1\\]",
        ),
    ],
)
def test_bad_strengths_of_the_entry_points(tiny_pipeline, call, message):
    with pytest.raises(ValueError, match=message):
        call(*tiny_pipeline)


def test_a_callback_that_cannot_be_called_fails_before_sampling(tiny_pipeline):
    with pytest.raises(
        TypeError, match="callback must be callable as callback\\(step, denoised, sample\\), not 5"
    ):
        text_to_image(*tiny_pipeline, "a cat", callback=5, **FAST)


def test_an_unknown_memory_mode_fails_before_loading(tiny_models, monkeypatch):
    import cascade_helpers.loading as loading

    monkeypatch.setattr(loading, "_load_unet", lambda *a: pytest.fail("loaded a model first"))
    with pytest.raises(ValueError, match="unknown memory mode 'cpu': use one of gpu, model_offload"):
        load_prior(tiny_models, memory="cpu")


# --- ControlNet strength and batch ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def controlnet(tiny_pipeline):
    """A random ControlNet for the tiny Stage C's blocks 0 and 4 (no file needed)."""
    torch.manual_seed(0)
    width = tiny_pipeline[0].unet.config.block_out_channels[0]
    model = ControlNet(3, width, (0, 4)).eval()
    for projection in model.projections:
        projection[-1].reset_parameters()  # the official zeros would make the control invisible
    return model


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strength": NAN}, "strength must be a finite number .*cnet_multiplier.*not nan"),  # black before
        ({"strength": INF}, "strength must be a finite number"),
        ({"strength": "1"}, "strength must be a finite number"),
        ({"batch": 0}, "batch must be the number of pictures .*not 0"),
        ({"batch": 2.0}, "batch must be the number of pictures"),
    ],
)
def test_bad_control_features_arguments(controlnet, kwargs, message):
    with pytest.raises(ValueError, match=message):
        control_features(controlnet, torch.rand(1, 3, 64, 64), **kwargs)


# --- devices -------------------------------------------------------------------------------------------


def _absent_cuda() -> str:
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu", r"device='gpu': torch knows no device of that name\. This machine has: cpu"),
        ("tpu", "device='tpu': torch knows no device of that name. This machine has: cpu"),
        ("meta", "device='meta': the package computes on cpu, cuda, mps or xpu"),
        (_absent_cuda(), "This machine has: cpu"),
    ],
)
def test_devices_that_are_not_there_list_those_that_are(device, message):
    with pytest.raises(ValueError, match=message):
        pick_device(device)


def test_a_loader_given_a_missing_device_says_which_exist(tiny_models):
    with pytest.raises(ValueError, match="device='gpu'.*This machine has: cpu"):
        load_prior(tiny_models, device="gpu")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_without_mps():
    with pytest.raises(ValueError, match="device='mps': no mps device is available. This machine has: cpu"):
        pick_device("mps")


# --- NaN latents: a clear error instead of black pictures ----------------------------------------------


def test_nan_in_stage_c_weights_is_named_as_a_damaged_file(tiny_pipeline):
    prior, decoder = tiny_pipeline
    weight = prior.unet.clip_txt_pooled_mapper.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight[0, 0] = float("nan")
        with pytest.raises(FloatingPointError) as caught:
            text_to_image(prior, decoder, "a cat", **FAST)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    message = str(caught.value)
    assert message.startswith("Stage C produced NaN or infinite values")
    assert "clip_txt_pooled_mapper.weight" in message and "stage_c_bf16.safetensors" in message
    assert "--verify" in message and "black" in message


def test_nan_in_stage_b_weights_is_named(tiny_pipeline):
    prior, decoder = tiny_pipeline
    weight = next(decoder.unet.parameters())
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.view(-1)[0] = float("inf")
        with pytest.raises(FloatingPointError, match="Stage B produced NaN.*stage_b_bf16.safetensors"):
            text_to_image(prior, decoder, "a cat", **FAST)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_nan_starting_latents_are_named_as_the_input(tiny_pipeline):
    from cascade_helpers.conditioning import encode_text

    prior, _ = tiny_pipeline
    text = encode_text(prior, ["a cat"])
    x_init = torch.full((1, 16, 12, 12), float("nan"))
    with pytest.raises(FloatingPointError, match="the starting latents .* already held NaN .*picture"):
        generate_stage_c(prior, text, text, (1, 16, 12, 12), PRIOR.with_(t_start=0.5), x_init=x_init)


# --- prompt lists, the diffusers way -------------------------------------------------------------------


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(b.abs().max().item(), 1e-6))


def _entry_points(prior, decoder, controlnet):
    control = control_features(
        controlnet, torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)), batch=2
    )
    picture = _picture()
    return {
        "text_to_image": lambda **o: text_to_image(prior, decoder, **o),
        "image_variation": lambda **o: image_variation(prior, decoder, picture, **o),
        "image_to_image": lambda **o: image_to_image(prior, decoder, picture, strength=0.6, **o),
        "controlnet_to_image": lambda **o: controlnet_to_image(prior, decoder, control, **o),
    }


@pytest.fixture
def stage_c_only(monkeypatch):
    """Stage B and Stage A replaced by zeros of the right shapes: the entry points differ only in how
    Stage C is conditioned, so their prompt lists are checked on Stage C (text_to_image runs it all)."""
    import cascade_helpers.generation as generation

    def stage_b(decoder, latents, pooled, negative_pooled, image_size, *args, **kwargs):
        return torch.zeros(stage_b_shape(*image_size, latents.shape[0]))

    monkeypatch.setattr(generation, "generate_stage_b", stage_b)
    monkeypatch.setattr(
        generation, "decode_stage_a", lambda d, latents: torch.zeros(latents.shape[0], 3, 512, 512)
    )


@pytest.mark.parametrize(
    "entry", ["text_to_image", "image_variation", "image_to_image", "controlnet_to_image"]
)
def test_each_prompt_of_a_list_makes_its_own_pictures(tiny_pipeline, controlnet, entry, request, tmp_path):
    """Picture i of ["a cat", "a dog"] is picture i of a run with that prompt alone (same seed, same
    num_images: the same noise). A list joined into one token sequence gives neither."""
    if entry != "text_to_image":
        request.getfixturevalue("stage_c_only")
    run = _entry_points(*tiny_pipeline, controlnet)[entry]
    both = run(prompt=["a cat", "a dog"], negative_prompt=["blurry", "dark"], num_images=2, seed=5, **FAST)
    for i, (prompt, negative) in enumerate([("a cat", "blurry"), ("a dog", "dark")]):
        alone = run(prompt=prompt, negative_prompt=negative, num_images=2, seed=5, **FAST)
        _same(both.stage_c_latents[i], alone.stage_c_latents[i])
        _same(both.stage_b_latents[i], alone.stage_b_latents[i])
        difference = np.asarray(both.images[i]).astype(int) - np.asarray(alone.images[i])
        assert np.abs(difference).max() <= 1  # float rounding of other batch sizes: one 8-bit level
    assert not torch.allclose(both.stage_c_latents[0], both.stage_c_latents[1])
    paths = save_generation(both, tmp_path)
    for path, prompt in zip(paths, ["a cat", "a dog"], strict=True):
        with PIL.Image.open(path) as png:
            assert png.text["Description"] == prompt
        assert read_settings(path)["prompt"] == ["a cat", "a dog"]


class _Stop(Exception):
    pass


def test_a_list_shares_the_pictures_in_order(tiny_pipeline, monkeypatch):
    """num_images=4 with two prompts: cat, cat, dog, dog — Stage B gets the pooled embeddings of
    those prompts, in that order (compared with the prompts' own encodings)."""
    import cascade_helpers.generation as generation
    from cascade_helpers.conditioning import encode_text

    prior, decoder = tiny_pipeline
    seen = {}

    def stop(decoder, latents, pooled, negative_pooled, *args, **kwargs):
        seen["pooled"], seen["negative"] = pooled, negative_pooled
        raise _Stop

    monkeypatch.setattr(generation, "generate_stage_b", stop)
    with pytest.raises(_Stop):
        text_to_image(prior, decoder, ["a cat", "a dog"], ["blurry", "dark"], num_images=4, **FAST)
    _same(seen["pooled"], encode_text(prior, ["a cat", "a cat", "a dog", "a dog"]).pooled)
    _same(seen["negative"], encode_text(prior, ["blurry", "blurry", "dark", "dark"]).pooled)
