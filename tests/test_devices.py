"""Device and precision choices."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cascade_helpers.devices import UnsupportedPrecisionError, pick_device, pick_dtype, place


def test_names_resolve():
    cpu = torch.device("cpu")
    assert pick_dtype("bf16", cpu) is torch.bfloat16
    assert pick_dtype("float32", cpu) is torch.float32


def test_default_on_cpu_is_float32():
    assert pick_dtype(None, torch.device("cpu")) is torch.float32


def test_float16_is_refused_for_stage_c_only():
    cpu = torch.device("cpu")
    with pytest.raises(UnsupportedPrecisionError, match="black"):
        pick_dtype("fp16", cpu)
    assert pick_dtype("fp16", cpu, stage="Stage B") is torch.float16
    assert pick_dtype("fp16", cpu, allow_float16=True) is torch.float16


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="bfloat16"):
        pick_dtype("half-ish", torch.device("cpu"))


def test_explicit_device_wins():
    assert pick_device("cpu") == torch.device("cpu")


def test_unknown_memory_mode():
    with pytest.raises(ValueError, match="model_offload"):
        place(nn.Linear(2, 2), torch.device("cpu"), "swap")


def test_model_offload_keeps_one_big_model_on_the_device(monkeypatch):
    """Each call moves its model to the device and sends the previously active one back."""
    from cascade_helpers.devices import _ModelOffload

    group, moves = _ModelOffload(), []
    models = {name: nn.Linear(2, 2) for name in ("text_encoder", "prior", "decoder")}
    for name, model in models.items():
        model.to = lambda device, name=name: moves.append((name, str(device)))
        group.add(model, torch.device("cuda", 0))
    moves.clear()
    x = torch.zeros(1, 2)
    models["text_encoder"](x)
    models["prior"](x)
    models["prior"](x)  # already there: no move
    models["decoder"](x)
    assert moves == [
        ("text_encoder", "cuda:0"),
        ("text_encoder", "cpu"),
        ("prior", "cuda:0"),
        ("prior", "cpu"),
        ("decoder", "cuda:0"),
    ]


def test_a_diffusers_pipeline_built_from_offloaded_models_computes_on_the_gpu(tiny_models):
    """With model offload the models wait in CPU RAM; diffusers picks the device to compute on from the
    accelerate hook's ``execution_device``, as with its own offloading (no CUDA is touched here: nothing
    runs)."""
    from cascade_helpers.loading import load_prior
    from cascade_helpers.upstream import DDPMWuerstchenScheduler, StableCascadePriorPipeline

    def pipeline(prior):
        return StableCascadePriorPipeline(
            tokenizer=prior.tokenizer,
            text_encoder=prior.text_encoder,
            prior=prior.unet,
            scheduler=DDPMWuerstchenScheduler(),
        )

    prior = load_prior(tiny_models, "big", dtype="fp32", device="cpu", image_encoder=False, effnet=False)
    assert pipeline(prior)._execution_device == torch.device("cpu")
    gpu = torch.device("cuda", 0)
    for model in (prior.unet, prior.text_encoder):
        place(model, gpu, "model_offload")
    assert next(prior.unet.parameters()).device == torch.device("cpu")  # waiting in CPU RAM
    assert pipeline(prior)._execution_device == gpu
