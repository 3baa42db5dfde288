"""The sampler: the "official" one against numbers recorded from the official ``gdf`` package, the
"diffusers" one against diffusers' own pipelines, and the settings' checks.

``fixtures/official_gdf.json`` holds the official package's schedule, noise conditioning, ``diffuse``
and four complete sampling runs (text-to-image, image-to-image from t=0.8, the decoder's settings,
no guidance) for the toy denoiser below; its ``about`` field says exactly how it was recorded. The
official sampler draws its step noise from the global RNG and ours from a generator, so both runs
get the same recorded noise instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cascade_helpers.sampling import (
    DIFFUSERS_DECODER,
    DIFFUSERS_PRIOR,
    OFFICIAL_DECODER,
    OFFICIAL_PRIOR,
    StageSettings,
    diffuse,
    log_snr,
    noise_condition,
    sample,
)

GDF = json.loads((Path(__file__).parent / "fixtures" / "official_gdf.json").read_text())
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
    result = sample(
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


def test_callback_once_per_step_in_order():
    calls = []
    sample(
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
    sample(counting, SHAPE, cond, None, settings, device=torch.device("cpu"), progress=False)
    assert batches == [2, 2, 2]
    batches.clear()
    sample(
        counting, SHAPE, cond, cond, settings.with_(guidance=4.0), device=torch.device("cpu"), progress=False
    )
    assert batches == [4, 4, 4]


def test_guidance_without_unconditional_inputs_is_refused():
    with pytest.raises(ValueError, match="unconditional"):
        sample(
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
