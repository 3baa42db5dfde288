"""Stage C in float16 through the rescale of its last block group (cascade_helpers/float16.py).

The claims, each against an independent expectation (the model without the rescale, in float32):
(1) in float32 the rescaled UNet computes what the original computes, with LoRA factors on every kind
of layer the rescale changes too; (2) a tiny Stage C whose last group overflows float16 (asserted:
NaN without the rescale) gives finite latents with it, as close to float32 as float16 allows;
(3) the same through text_to_image, a ControlNet feeding the last group, and a loaded LoRA.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch

from cascade_helpers.atomic import _save_safetensors
from cascade_helpers.checkpoints import _unet_to_official
from cascade_helpers.controlnet.filters import control_features
from cascade_helpers.controlnet.model import ControlNet
from cascade_helpers.devices import UnsupportedPrecisionError
from cascade_helpers.float8 import store_in_float8
from cascade_helpers.float16 import rescale_for_float16
from cascade_helpers.generation import controlnet_to_image, text_to_image
from cascade_helpers.loading import _load_unet, load_decoder, load_prior
from cascade_helpers.lora.adapters import _lora_factors, _LoraFactors
from cascade_helpers.lora.formats import _comfyui_state_dict, _official_factors
from cascade_helpers.lora.load import _read_lora_file, load_lora
from cascade_helpers.stages import _NonFiniteLatentsError
from cascade_helpers.tiny import _write_official_lora
from cascade_helpers.upstream import _SDCascadeResBlock, _SDCascadeTimestepBlock
from tests.tiny_run import TEXT_ONLY, fast

FAST = fast(3)  # 3 Stage C steps
#: float16 against float32 after a sampling run: the plain tiny Stage C (no overflow) errs about as
#: much in float16 (measured: see test_the_plain_model_errs_as_much_in_float16)
FLOAT16_TOLERANCE = 2e-2


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _calibration_like_inputs(unet, dtype=torch.float32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    config = unet.config
    return {
        "sample": torch.randn(2, 16, 12, 12, generator=generator, dtype=dtype),
        "timestep_ratio": torch.tensor([0.9, 0.2], dtype=dtype),
        "clip_text_pooled": torch.randn(2, 1, config.clip_text_pooled_in_channels, generator=generator).to(
            dtype
        ),
        "clip_text": torch.randn(2, 77, config.clip_text_in_channels, generator=generator).to(dtype),
        "clip_img": torch.zeros(2, 1, config.clip_image_in_channels, dtype=dtype),
    }


def _run(unet, dtype=torch.float32) -> torch.Tensor:
    with torch.no_grad():
        return unet(**_calibration_like_inputs(unet, dtype), return_dict=False)[0].float()


def _make_overflow(unet) -> None:
    """Grow the last group's hidden states past float16: the TimestepBlocks' gain 1 + a to ~300 and
    the ResBlocks' residual branches ×50 (the function stays smooth: clf's LayerNorm ends the group)."""
    for block in unet.up_blocks[-1]:
        if isinstance(block, _SDCascadeTimestepBlock):
            block.mapper.bias.data[: block.mapper.out_features // 2] += 300
        elif isinstance(block, _SDCascadeResBlock):
            block.channelwise[-1].weight.data *= 50


@pytest.fixture(scope="module")
def tiny_unet(tiny_models):
    return _load_unet(tiny_models / "stage_c_bf16.safetensors", "stage_c", "tiny", torch.float32)


def _folder_with_stage_c(tiny_models: Path, folder: Path, edit) -> Path:
    """A copy of the tiny models folder whose Stage C file ``edit`` changed."""
    shutil.copytree(tiny_models, folder)
    path = folder / "stage_c_bf16.safetensors"
    unet = _load_unet(path, "stage_c", "tiny", torch.float32)
    with torch.no_grad():
        edit(unet)
    _save_safetensors(
        path, {k: v.bfloat16() for k, v in _unet_to_official(unet.state_dict(), "stage_c").items()}
    )
    return folder


@pytest.fixture(scope="module")
def overflowing(tiny_models, tmp_path_factory) -> Path:
    """The tiny models folder with a Stage C whose last block group overflows float16, and the LoRA."""
    folder = _folder_with_stage_c(tiny_models, tmp_path_factory.mktemp("overflow") / "models", _make_overflow)
    _write_official_lora(folder)
    return folder


@pytest.fixture(scope="module")
def decoder(tiny_models):
    return load_decoder(tiny_models, "big", dtype="fp32", device="cpu")


# --- (1) float32: the same function ----------------------------------------------------------------


@pytest.mark.parametrize("scale", [1, 2, 64, 2**20])
def test_in_float32_the_rescaled_unet_computes_the_same(tiny_unet, scale):
    rescaled = copy.deepcopy(tiny_unet)
    assert rescale_for_float16(rescaled, scale) == scale
    expected = _run(tiny_unet)
    assert _relative(_run(rescaled), expected) <= 1e-5
    assert (rescaled.clf[0].eps, tiny_unet.clf[0].eps) == (1e-6 / scale**2, 1e-6)


def test_in_float32_an_overflowing_unet_rescaled_as_calibrated_computes_the_same(tiny_unet):
    overflowing = copy.deepcopy(tiny_unet)
    _make_overflow(overflowing)
    rescaled = copy.deepcopy(overflowing)
    scale = rescale_for_float16(rescaled)
    assert scale >= 2**10  # hidden states of ~1e7 must come down to ~4e3
    assert _relative(_run(rescaled), _run(overflowing)) <= 1e-5


def _factors_on_every_rescaled_kind(unet) -> dict[str, _LoraFactors]:
    """Strong random LoRA factors on the upscaler's convolution, a ResBlock's last linear, an
    attention output, a TimestepBlock's mapper (whose b half is rescaled, a half not) and, outside
    the group, an attention output."""
    generator = torch.Generator().manual_seed(5)
    modules = dict(unet.named_modules())
    names = [
        "up_upscalers.0.1.blocks.1",
        "up_blocks.1.0.channelwise.4",
        "up_blocks.1.2.attention.to_out.0",
        "up_blocks.1.1.mapper",
        "up_blocks.0.2.attention.to_out.0",
    ]
    factors = {}
    for name in names:
        weight = modules[name].weight
        kernel = weight.shape[2:]
        down = torch.randn(2, weight.shape[1], *kernel, generator=generator) * 0.5
        up = torch.randn(weight.shape[0], 2, *[1] * len(kernel), generator=generator) * 0.5
        factors[name] = _LoraFactors(down, up, 2.0)
    return factors


def test_in_float32_a_lora_on_rescaled_layers_computes_the_same_and_reads_back_as_given(tiny_models):
    plain = load_prior(tiny_models, "big", dtype="fp32", device="cpu", **TEXT_ONLY)
    rescaled = load_prior(tiny_models, "big", dtype="fp32", device="cpu", **TEXT_ONLY)
    rescale_for_float16(rescaled.unet, 64)
    factors = _factors_on_every_rescaled_kind(plain.unet)
    without = _run(plain.unet)
    for prior in (plain, rescaled):
        load_lora(prior, _comfyui_state_dict(factors))
    expected = _run(plain.unet)
    assert _relative(expected, without) > 0.1  # the LoRA matters
    assert _relative(_run(rescaled.unet), expected) <= 1e-5
    for name, f in _lora_factors(rescaled.unet).items():
        torch.testing.assert_close(f.up, factors[name].up, rtol=0, atol=0)  # export sees the trained ones


# --- (2) float16: finite where it overflowed, close to float32 ------------------------------------------


def test_the_plain_model_errs_as_much_in_float16(tiny_models, decoder):
    """The yardstick for FLOAT16_TOLERANCE: a Stage C that does not overflow, without a rescale."""
    reference = text_to_image(
        load_prior(tiny_models, dtype="fp32", device="cpu", **TEXT_ONLY), decoder, "a cat", **FAST
    )
    half = text_to_image(
        load_prior(tiny_models, dtype="fp16", device="cpu", **TEXT_ONLY), decoder, "a cat", **FAST
    )
    assert _relative(half.stage_c_latents, reference.stage_c_latents) <= FLOAT16_TOLERANCE


def test_an_overflowing_stage_c_gives_nan_in_float16_and_finite_latents_rescaled(overflowing, decoder):
    raw = load_prior(overflowing, dtype=torch.float16, device="cpu", allow_float16=True, **TEXT_ONLY)
    with pytest.raises(_NonFiniteLatentsError, match="Stage C produced NaN"):
        text_to_image(raw, decoder, "a cat", **FAST)
    reference = text_to_image(
        load_prior(overflowing, dtype="fp32", device="cpu", **TEXT_ONLY), decoder, "a cat", **FAST
    )
    prior = load_prior(overflowing, dtype="fp16", device="cpu", **TEXT_ONLY)
    assert prior.unet.dtype == torch.float16 and prior.unet._float16_scale >= 2**10
    result = text_to_image(prior, decoder, "a cat", **FAST)
    assert torch.isfinite(result.stage_c_latents).all()
    assert _relative(result.stage_c_latents, reference.stage_c_latents) <= FLOAT16_TOLERANCE


def test_a_controlnet_feeding_the_last_group_is_rescaled_with_it(overflowing, decoder):
    torch.manual_seed(0)
    fed = (0, 2, 5, 7)  # of the tiny Stage C's 8 ResBlocks: first and last of each half
    controlnet = ControlNet(3, 32, fed, "effnet")
    for projection in controlnet.projections:
        projection[-1].reset_parameters()
    picture = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    control = control_features(controlnet, picture)
    control[7] = control[7] * 3e4 / control[7].abs().max()  # as large as the hidden state it joins
    assert 7 in fed  # ResBlock 7: in the last group, as 59 and 63 of the big Stage C
    reference_prior = load_prior(overflowing, dtype="fp32", device="cpu", **TEXT_ONLY)
    reference = controlnet_to_image(reference_prior, decoder, control, "a cat", **FAST).stage_c_latents
    without_7 = [None if i == 7 else c for i, c in enumerate(control)]
    unsteered = controlnet_to_image(reference_prior, decoder, without_7, "a cat", **FAST).stage_c_latents
    assert _relative(unsteered, reference) > 10 * FLOAT16_TOLERANCE  # block 7's features matter
    prior = load_prior(overflowing, dtype="fp16", device="cpu", **TEXT_ONLY)
    result = controlnet_to_image(prior, decoder, control, "a cat", **FAST).stage_c_latents
    assert _relative(result, reference) <= FLOAT16_TOLERANCE


def test_a_loaded_lora_on_the_last_group_is_rescaled_with_it(overflowing, decoder):
    lora = overflowing / "lora_fernando_10k.safetensors"
    new_tokens = [("[fernando]", "^dog</w>")]
    reference_prior = load_prior(overflowing, dtype="fp32", device="cpu", **TEXT_ONLY)
    without = text_to_image(reference_prior, decoder, "a [fernando]", **FAST).stage_c_latents
    load_lora(reference_prior, lora, strength=3, new_tokens=new_tokens)
    reference = text_to_image(reference_prior, decoder, "a [fernando]", **FAST).stage_c_latents
    assert _relative(without, reference) > 2 * FLOAT16_TOLERANCE  # the LoRA matters
    prior = load_prior(overflowing, dtype="fp16", device="cpu", **TEXT_ONLY)
    load_lora(prior, lora, strength=3, new_tokens=new_tokens)
    result = text_to_image(prior, decoder, "a [fernando]", **FAST).stage_c_latents
    assert _relative(result, reference) <= FLOAT16_TOLERANCE
    expected = _official_factors(prior.unet, _read_lora_file(lora)[0])
    for name, f in _lora_factors(prior.unet).items():
        torch.testing.assert_close(f.up, expected[name].up, rtol=0, atol=0)  # kept in float32, exactly


# --- where the rescale cannot help, and misuse -------------------------------------------------------------


def test_an_overflow_outside_the_last_group_refuses_float16_naming_the_layer(tiny_unet):
    broken = copy.deepcopy(tiny_unet)
    with torch.no_grad():
        broken.down_blocks[0][0].channelwise[-1].weight *= 1e5
    before = {k: v.clone() for k, v in broken.state_dict().items()}
    with pytest.raises(UnsupportedPrecisionError, match=r"down_blocks\.0\.0.* reaches .*bfloat16"):
        rescale_for_float16(broken)
    assert all(torch.equal(before[k], v) for k, v in broken.state_dict().items())  # left as it was


def test_load_prior_refuses_float16_where_the_rescale_cannot_help(tiny_models, tmp_path):
    def overflow_early(unet):
        unet.down_blocks[0][0].channelwise[-1].weight *= 1e5

    folder = _folder_with_stage_c(tiny_models, tmp_path / "models", overflow_early)
    with pytest.raises(
        UnsupportedPrecisionError, match=r"cannot run in float16 even rescaled: down_blocks\.0\.0"
    ):
        load_prior(folder, dtype="fp16", device="cpu", **TEXT_ONLY)
    assert load_prior(folder, dtype="bf16", device="cpu", **TEXT_ONLY).dtype == torch.bfloat16


def test_what_the_rescale_does_not_cover_is_refused(tiny_models, tiny_unet):
    stage_b = _load_unet(tiny_models / "stage_b_bf16.safetensors", "stage_b", "tiny", torch.float32)
    with pytest.raises(UnsupportedPrecisionError, match="not a Stable Cascade Stage C"):
        rescale_for_float16(stage_b)
    twice = copy.deepcopy(tiny_unet)
    rescale_for_float16(twice, 4)
    with pytest.raises(UnsupportedPrecisionError, match="rescaled already"):
        rescale_for_float16(twice, 4)
    with_lora = load_prior(tiny_models, "big", dtype="fp32", device="cpu", **TEXT_ONLY)
    load_lora(with_lora, _comfyui_state_dict(_factors_on_every_rescaled_kind(with_lora.unet)))
    with pytest.raises(UnsupportedPrecisionError, match="carries a LoRA"):
        rescale_for_float16(with_lora.unet)
    in_float8 = copy.deepcopy(tiny_unet)
    store_in_float8(in_float8, torch.float32)
    with pytest.raises(UnsupportedPrecisionError, match="float8 weights"):
        rescale_for_float16(in_float8)
    for scale in (3, 0, 2.0, True):
        with pytest.raises(ValueError, match="power of two"):
            rescale_for_float16(copy.deepcopy(tiny_unet), scale)
