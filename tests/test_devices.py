"""Device and precision choices, and the memory modes' hooks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cascade_helpers.devices import _group_offload, _place, pick_device, pick_dtype


def test_names_resolve():
    cpu = torch.device("cpu")
    assert pick_dtype("bf16", cpu) is torch.bfloat16
    assert pick_dtype("float32", cpu) is torch.float32


def test_default_on_cpu_is_float32():
    assert pick_dtype(None, torch.device("cpu")) is torch.float32


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_the_default_on_a_gpu_follows_native_bfloat16(monkeypatch, native, expected):
    """torch's default check answers True on a T4 (emulation); only native bfloat16 counts. Without it,
    float16 for every model (Stage C rescaled on load)."""
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert pick_dtype(None, torch.device("cuda", 0)) is expected
    assert asked == [False]


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="bfloat16"):
        pick_dtype("half-ish", torch.device("cpu"))


def test_explicit_device_wins():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto") == pick_device(None)


def test_unknown_memory_mode():
    with pytest.raises(ValueError, match="model_offload"):
        _place(nn.Linear(2, 2), torch.device("cpu"), "swap")


class _Model(nn.Module):
    """A model whose forward takes no tensor (accelerate's hook moves tensor inputs to the device)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self) -> None:
        return None


def test_model_offload_keeps_one_big_model_on_the_device():
    """Each call moves its model to the device and sends the model that ran before it back, in any
    order (accelerate's own hook offloads one fixed predecessor only)."""
    moves = []
    models = {name: _Model() for name in ("text_encoder", "prior", "decoder")}
    gpu = torch.device("cuda", 0)
    for name, model in models.items():
        _place(model, gpu, "model_offload")
        model.to = lambda device, name=name: moves.append((name, str(device)))
    for name in ("text_encoder", "prior", "prior", "decoder", "text_encoder"):
        models[name]()
    assert moves == [
        ("text_encoder", "cuda:0"),
        ("text_encoder", "cpu"),
        ("prior", "cuda:0"),
        ("prior", "cuda:0"),  # the fake .to moved nothing: accelerate asks again
        ("prior", "cpu"),
        ("decoder", "cuda:0"),
        ("decoder", "cpu"),
        ("text_encoder", "cuda:0"),
    ]


@pytest.mark.parametrize("to_disk", [False, True])
def test_group_offloading_computes_the_same(to_disk):
    """diffusers' group offloading, block by block, here with the CPU as the device it loads onto:
    the same output, and with ``to_disk`` the weights wait in files of the model's own folder."""
    from cascade_helpers.tiny import _tiny_unet

    unet = _tiny_unet("stage_c", 0).eval()
    inputs = {
        "sample": torch.randn(1, unet.config.in_channels, 8, 8),
        "timestep_ratio": torch.full((1,), 0.5),
        "clip_text_pooled": torch.randn(1, 1, unet.config.clip_text_pooled_in_channels),
        "clip_text": torch.randn(1, 3, unet.config.clip_text_in_channels),
        "clip_img": torch.zeros(1, 1, unet.config.clip_image_in_channels),
    }
    with torch.no_grad():
        expected = unet(**inputs).sample
        _group_offload(unet, torch.device("cpu"), to_disk=to_disk)
        assert any(hasattr(m, "_diffusers_hook") for m in unet.modules())
        torch.testing.assert_close(unet(**inputs).sample, expected)


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
        _place(model, gpu, "model_offload")
    assert next(prior.unet.parameters()).device == torch.device("cpu")  # waiting in CPU RAM
    assert pipeline(prior)._execution_device == gpu
