"""The samplers: "official" and "ddim" against numbers recorded from the official ``gdf`` package,
"dpmpp_2m" against k-diffusion's ``sample_dpmpp_2m``, "diffusers" against diffusers' own pipelines
(tests/test_diffusers_equivalence.py), and the settings' checks.

``fixtures/official_gdf.json`` holds the official package's schedule, noise conditioning, ``diffuse``
and four complete sampling runs (text-to-image, image-to-image from t=0.8, the decoder's settings,
no guidance) for the toy denoiser below; its ``about`` field says exactly how it was recorded. The
official sampler draws its step noise from the global RNG and ours from a generator, so both runs
get the same recorded noise instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cascade_helpers.checkpoints import _official_shapes
from cascade_helpers.loading import _load_unet
from cascade_helpers.sampling import (
    DIFFUSERS_DECODER,
    DIFFUSERS_PRIOR,
    OFFICIAL_DECODER,
    OFFICIAL_PRIOR,
    StageSettings,
    _sample,
    diffuse,
    log_snr,
    noise_condition,
    schedule,
    unet_denoiser,
)
from tests.recorded_weights import official_weights, seeded_inputs

FIXTURES = Path(__file__).parent / "fixtures"
GDF = json.loads((FIXTURES / "official_gdf.json").read_text())
DDIM = json.loads((FIXTURES / "official_ddim.json").read_text())
SHAPE = (2, 3, 4, 4)


def _tensor(values, shape=SHAPE) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


def toy_denoiser(x: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Nonlinear in x, depends on the noise condition and on the conditioning: every input matters."""
    return torch.tanh(0.8 * x + c) * (0.3 + r.view(-1, 1, 1, 1))


# --- the official schedule ----------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1, 2])
def test_schedule_and_noise_condition_match_gdf(shift):
    times = torch.tensor(GDF["times"])
    ours = log_snr(times, shift)
    torch.testing.assert_close(ours, torch.tensor(GDF[f"log_snr_shift{shift}"]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        noise_condition(ours), torch.tensor(GDF[f"noise_cond_shift{shift}"]), rtol=1e-5, atol=1e-5
    )


def test_diffuse_matches_gdf():
    case = GDF["diffuse"]
    noised = diffuse(_tensor(case["x0"]), case["t"], _tensor(case["noise"]))
    torch.testing.assert_close(noised, _tensor(case["expected"]), rtol=1e-5, atol=1e-5)


# --- whole sampling runs ------------------------------------------------------------------------------


def _replay(noises: list[torch.Tensor]):
    """Stand-in for ``torch.randn`` that returns the recorded step noise, in order."""
    queue = iter(noises)

    def randn(*args, **kwargs):
        return next(queue).clone()

    return randn, queue


@pytest.mark.parametrize("name", sorted(GDF["runs"]))
def test_official_sampler_reproduces_gdf(name, monkeypatch):
    run = GDF["runs"][name]
    settings = StageSettings(
        steps=run["steps"],
        guidance=run["cfg"] or 1.0,
        shift=run["shift"],
        guidance_rescale=run["cfg_rho"],
        t_start=run["t_start"],
    )
    randn, queue = _replay([_tensor(n) for n in run["noises"]])
    monkeypatch.setattr(torch, "randn", randn)
    steps = []
    result = _sample(
        toy_denoiser,
        SHAPE,
        {"c": _tensor(GDF["cond"], (2, 3, 1, 1))},
        {"c": _tensor(GDF["uncond"], (2, 3, 1, 1))},
        settings,
        device=torch.device("cpu"),
        x_init=_tensor(run["x_init"]),
        callback=lambda i, denoised, x: steps.append((denoised.clone(), x.clone())),
        progress=False,
    )
    monkeypatch.undo()
    assert next(queue, None) is None, "one noise draw per step, as gdf"
    assert len(steps) == run["steps"]
    for (denoised, x), expected_denoised, expected_x in zip(
        steps, run["denoised"], run["samples"], strict=True
    ):
        torch.testing.assert_close(denoised, _tensor(expected_denoised), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(x, _tensor(expected_x), rtol=1e-4, atol=1e-5)
    # the official notebooks keep the last step's denoised estimate
    torch.testing.assert_close(result, _tensor(run["denoised"][-1]), rtol=1e-4, atol=1e-5)


# --- DDIM against the official DDIMSampler on the official tiny Stage C --------------------------------


@pytest.fixture(scope="module")
def official_tiny_stage_c(tmp_path_factory):
    """Our loaded tiny Stage C holding the weights the DDIM fixture's official module held, as a
    denoiser, and the fixture's inputs."""
    path = tmp_path_factory.mktemp("official") / "stage_c.safetensors"
    save_file(official_weights(_official_shapes("stage_c", "tiny")), str(path))
    unet = _load_unet(path, "stage_c", "tiny", torch.float32)
    x_init, text, pooled, neg_text, neg_pooled, img = seeded_inputs(
        200, (1, 16, 4, 4), (1, 77, 32), (1, 1, 32), (1, 77, 32), (1, 1, 32), (1, 1, 24)
    )
    cond = {"clip_text": text, "clip_text_pooled": pooled, "clip_img": img}
    uncond = {"clip_text": neg_text, "clip_text_pooled": neg_pooled, "clip_img": torch.zeros_like(img)}
    return unet_denoiser(unet, torch.float32), x_init, cond, uncond


@pytest.mark.parametrize("name", sorted(DDIM["runs"]))
def test_ddim_reproduces_the_official_ddim_sampler(name, official_tiny_stage_c, monkeypatch):
    denoiser, x_init, cond, uncond = official_tiny_stage_c
    run = DDIM["runs"][name]
    settings = StageSettings(
        steps=run["steps"], guidance=run["cfg"], shift=run["shift"], guidance_rescale=run["cfg_rho"],
        sampler="ddim", eta=run["eta"], t_start=run["t_start"],
    )  # fmt: skip
    randn, queue = _replay([torch.tensor(n).reshape(x_init.shape) for n in run["noises"]])
    monkeypatch.setattr(torch, "randn", randn)
    steps = []
    result = _sample(
        denoiser, x_init.shape, cond, uncond, settings, device=torch.device("cpu"), x_init=x_init,
        callback=lambda i, denoised, x: steps.append((denoised, x)), progress=False,
    )  # fmt: skip
    monkeypatch.undo()
    assert next(queue, None) is None, "one noise draw per step with eta > 0, none with eta 0"
    for (denoised, x), expected_denoised, expected_x in zip(
        steps, run["denoised"], run["samples"], strict=True
    ):
        _close_to_scale(denoised, expected_denoised)
        _close_to_scale(x, expected_x)
    _close_to_scale(result, run["denoised"][-1])


def _close_to_scale(actual: torch.Tensor, expected: list[float]) -> None:
    """Equal up to float32 rounding relative to the values' scale (the random tiny Stage C predicts
    values near 500, where one rounding step of the two implementations' attention is ~1e-4)."""
    expected_tensor = torch.tensor(expected)
    scale = expected_tensor.abs().max().item()
    torch.testing.assert_close(actual.flatten(), expected_tensor, rtol=1e-5, atol=1e-5 * scale)


def test_ddim_with_eta_1_is_the_official_sampler():
    """gdf's DDPMSampler is its DDIMSampler with eta 1: the same seed, the same numbers."""
    runs = [
        _sample(
            toy_denoiser,
            SHAPE,
            {"c": torch.zeros(2, 3, 1, 1)},
            {"c": torch.ones(2, 3, 1, 1)},
            settings,
            device=torch.device("cpu"),
            generator=torch.Generator().manual_seed(5),
            progress=False,
        )  # fmt: skip
        for settings in (
            OFFICIAL_PRIOR.with_(steps=4),
            OFFICIAL_PRIOR.with_(steps=4, sampler="ddim", eta=1.0),
        )
    ]
    assert torch.equal(*runs)


# --- DPM-Solver++(2M) against k-diffusion ----------------------------------------------------------------


def _k_diffusion_sampling():
    """k-diffusion's sampling module alone: the package's ``__init__`` also imports its training and
    evaluation code (CLIP through setuptools' removed ``pkg_resources``, clean-fid), which the sampler
    does not use."""
    spec = importlib.util.find_spec("k_diffusion")
    assert spec is not None, "k-diffusion is a dev dependency: pip install -e '.[dev]'"
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    saved = {k: v for k, v in sys.modules.items() if k == "k_diffusion" or k.startswith("k_diffusion.")}
    sys.modules["k_diffusion"] = package
    try:
        return importlib.import_module("k_diffusion.sampling")
    finally:
        for key in [k for k in sys.modules if k == "k_diffusion" or k.startswith("k_diffusion.")]:
            del sys.modules[key]
        sys.modules.update(saved)


@pytest.mark.parametrize(
    "settings",
    [
        OFFICIAL_PRIOR.with_(steps=10, sampler="dpmpp_2m"),
        OFFICIAL_DECODER.with_(steps=4, sampler="dpmpp_2m"),
        OFFICIAL_PRIOR.with_(steps=6, sampler="dpmpp_2m", t_start=0.8, guidance=1.0, guidance_rescale=0.0),
    ],
    ids=["prior", "decoder", "unguided-from-0.8"],
)
def test_dpmpp_2m_matches_k_diffusion(settings):
    """k-diffusion works in the variance-exploding convention: x_ve = x / a, σ = b / a, and a model
    that returns the denoised estimate. Wrapping the same guided toy denoiser that way, its
    ``sample_dpmpp_2m`` on σ = exp(−logSNR / 2) of the same schedule must end where ours does."""
    k_sampling = _k_diffusion_sampling()
    cond, uncond = {"c": _tensor(GDF["cond"], (2, 3, 1, 1))}, {"c": _tensor(GDF["uncond"], (2, 3, 1, 1))}
    x_init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
    ours = _sample(
        toy_denoiser, SHAPE, cond, uncond, settings, device=torch.device("cpu"), x_init=x_init, progress=False
    )

    def denoised_ve(x_ve: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        a = 1 / (1 + sigma**2).sqrt()
        log_snr_value = -2 * sigma.log()
        x = x_ve * a.view(-1, 1, 1, 1)
        r = noise_condition(log_snr_value)
        if settings.guided:
            pred, pred_uncond = toy_denoiser(
                torch.cat([x, x]), torch.cat([r, r]), torch.cat([cond["c"], uncond["c"]])
            ).chunk(2)
            guided = torch.lerp(pred_uncond, pred, settings.guidance)
            rho = settings.guidance_rescale
            eps = rho * guided * (pred.std() / (guided.std() + 1e-9)) + (1 - rho) * guided
        else:
            eps = toy_denoiser(x, r, cond["c"])
        b = sigma * a
        return (x - b.view(-1, 1, 1, 1) * eps) / a.view(-1, 1, 1, 1)

    sigmas = (-schedule(settings) / 2).exp().double().float()
    a_start = 1 / (1 + sigmas[0] ** 2).sqrt()
    theirs = k_sampling.sample_dpmpp_2m(denoised_ve, x_init / a_start, sigmas, disable=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_callback_once_per_step_in_order():
    calls = []
    _sample(
        toy_denoiser,
        SHAPE,
        {"c": torch.zeros(2, 3, 1, 1)},
        {"c": torch.ones(2, 3, 1, 1)},
        OFFICIAL_PRIOR.with_(steps=7),
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
        callback=lambda i, denoised, x: calls.append(i),
        progress=False,
    )
    assert calls == list(range(7))


def test_unguided_sampling_makes_one_call_per_step():
    """guidance ≤ 1 skips the unconditional half, as diffusers does: half the work."""
    batches = []

    def counting(x, r, c):
        batches.append(x.shape[0])
        return toy_denoiser(x, r, c)

    cond = {"c": torch.zeros(2, 3, 1, 1)}
    settings = DIFFUSERS_DECODER.with_(steps=3)
    _sample(counting, SHAPE, cond, None, settings, device=torch.device("cpu"), progress=False)
    assert batches == [2, 2, 2]
    batches.clear()
    _sample(
        counting, SHAPE, cond, cond, settings.with_(guidance=4.0), device=torch.device("cpu"), progress=False
    )
    assert batches == [4, 4, 4]


def test_guidance_without_unconditional_inputs_is_refused():
    with pytest.raises(ValueError, match="unconditional"):
        _sample(
            toy_denoiser,
            SHAPE,
            {"c": torch.zeros(2, 3, 1, 1)},
            None,
            OFFICIAL_PRIOR,
            device=torch.device("cpu"),
        )


# --- settings -----------------------------------------------------------------------------------------


def test_presets_are_the_documented_defaults():
    assert (OFFICIAL_PRIOR.steps, OFFICIAL_PRIOR.guidance, OFFICIAL_PRIOR.shift) == (20, 4.0, 2.0)
    assert OFFICIAL_PRIOR.guidance_rescale == 0.7 and OFFICIAL_PRIOR.sampler == "official"
    assert (OFFICIAL_DECODER.steps, OFFICIAL_DECODER.guidance, OFFICIAL_DECODER.shift) == (10, 1.1, 1.0)
    assert (DIFFUSERS_PRIOR.steps, DIFFUSERS_PRIOR.guidance, DIFFUSERS_PRIOR.sampler) == (
        20,
        4.0,
        "diffusers",
    )
    assert (DIFFUSERS_DECODER.steps, DIFFUSERS_DECODER.guidance) == (10, 0.0)
    assert not DIFFUSERS_DECODER.guided and OFFICIAL_DECODER.guided


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"steps": 0}, "steps must be a whole number from 1 to 1000"),
        ({"steps": 2.5}, "steps must be a whole number from 1 to 1000"),
        ({"t_start": 0.0}, r"t_start .* must be in \(0, 1\]"),
        ({"t_start": 1.5}, r"t_start .* must be in \(0, 1\]"),
        ({"shift": 0.0}, "shift must be a finite number > 0"),
        ({"guidance_rescale": 2.0}, r"guidance_rescale must be in \[0, 1\]"),
    ],
)
def test_invalid_settings_name_the_valid_range(changes, message):
    with pytest.raises(ValueError, match=message):
        OFFICIAL_PRIOR.with_(**changes)


def test_diffusers_sampler_refuses_official_only_options():
    with pytest.raises(ValueError, match="neither shift nor guidance rescale"):
        DIFFUSERS_PRIOR.with_(shift=2.0)
