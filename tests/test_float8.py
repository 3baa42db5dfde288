"""float8 weight storage (cascade_helpers/float8.py) through load_prior / load_decoder.

The independent expectation: the same model in bfloat16 with every Linear and Conv weight outside the
last up-block group (and the upscaler feeding it) rounded through float8 by hand, each tensor scaled by
the power of two that brings its largest value to float8's range first. Layer-by-layer
upcasting must compute exactly that, and store a byte per such weight.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from training_setup import make_config

from cascade_helpers.conditioning import encode_text
from cascade_helpers.generation import text_to_image
from cascade_helpers.loading import load_decoder, load_prior
from cascade_helpers.lora.load import load_lora
from cascade_helpers.lora_training.config import TrainingError
from cascade_helpers.lora_training.trainer import LoraTrainer
from cascade_helpers.sampling import OFFICIAL_PRIOR
from cascade_helpers.stages import _NonFiniteLatentsError, generate_stage_c
from cascade_helpers.tiny import _write_official_lora
from tests.tiny_run import TEXT_ONLY, fast

ROOT = Path(__file__).resolve().parents[1]
FAST = fast(2)  # 2 Stage C steps


def _kept(name: str, last: int) -> bool:
    return name.startswith((f"up_blocks.{last}.", f"up_upscalers.{last - 1}.", f"up_repeat_mappers.{last}."))


def _rounded_by_hand(unet: nn.Module) -> int:
    """Round the weights float8 storage holds through float8 as the module docstring says (times the
    power of two that brings the largest to at most 448, then back), in place; the count of them."""
    last, rounded = len(unet.up_blocks) - 1, 0
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d | nn.ConvTranspose2d) and not _kept(name, last):
            weight = module.weight.data
            scale = 2.0 ** math.floor(math.log2(448 / weight.abs().max().item()))
            module.weight.data = (weight.float() * scale).to(torch.float8_e4m3fn).to(weight.dtype) / scale
            rounded += 1
    return rounded


def _inputs(unet: nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    config, dtype = unet.config, torch.bfloat16
    inputs = {
        "sample": torch.randn(2, config.in_channels, 16, 16, generator=generator),
        "timestep_ratio": torch.tensor([0.9, 0.3]),
        "clip_text_pooled": torch.randn(2, 1, config.clip_text_pooled_in_channels, generator=generator),
    }
    if config.clip_text_in_channels:  # Stage C
        inputs["clip_text"] = torch.randn(2, 77, config.clip_text_in_channels, generator=generator)
        inputs["clip_img"] = torch.zeros(2, 1, config.clip_image_in_channels)
    else:  # Stage B: conditioned on Stage C latents
        inputs["effnet"] = torch.randn(2, config.effnet_in_channels, 4, 4, generator=generator)
    return {k: v.to(dtype) for k, v in inputs.items()}


@pytest.mark.parametrize("stage", ["prior", "decoder"])
def test_float8_storage_computes_what_weights_rounded_through_float8_compute(tiny_models, stage):
    load = load_prior if stage == "prior" else load_decoder
    options = TEXT_ONLY if stage == "prior" else {}
    stored = load(tiny_models, dtype="bf16", device="cpu", float8=True, **options).unet
    plain = load(tiny_models, dtype="bf16", device="cpu", **options).unet
    by_hand = copy.deepcopy(plain)
    rounded = _rounded_by_hand(by_hand)
    in_float8 = [p for p in stored.parameters() if p.dtype == torch.float8_e4m3fn]
    assert len(in_float8) == rounded > 0
    last = len(stored.up_blocks) - 1
    assert all(p.dtype == torch.bfloat16 for n, p in stored.named_parameters() if _kept(n, last))
    with torch.no_grad():
        expected = by_hand(**_inputs(by_hand), return_dict=False)[0]
        assert not torch.equal(expected, plain(**_inputs(plain), return_dict=False)[0])  # the rounding shows
        torch.testing.assert_close(stored(**_inputs(stored), return_dict=False)[0], expected, rtol=0, atol=0)
    bf16_bytes = sum(p.numel() * 2 for p in by_hand.parameters())
    stored_bytes = sum(p.numel() * p.element_size() for p in stored.parameters())
    assert stored_bytes == bf16_bytes - sum(p.numel() for p in in_float8)


def test_a_float8_pipeline_generates_with_a_lora_and_float16(tiny_models, tmp_path):
    folder = tmp_path / "models"
    shutil.copytree(tiny_models, folder)
    _write_official_lora(folder)
    decoder = load_decoder(folder, dtype="fp16", device="cpu", float8=True)
    prior = load_prior(folder, dtype="fp16", device="cpu", float8=True, **TEXT_ONLY)
    assert prior.unet._float16_scale >= 1  # rescaled first, then stored in float8
    plain = text_to_image(prior, decoder, "a [fernando]", **FAST).stage_c_latents
    load_lora(
        prior, folder / "lora_fernando_10k.safetensors", strength=3, new_tokens=[("[fernando]", "^dog</w>")]
    )
    steered = text_to_image(prior, decoder, "a [fernando]", **FAST).stage_c_latents
    assert torch.isfinite(steered).all() and not torch.equal(plain, steered)


def test_a_nan_in_a_float8_model_is_diagnosed(tiny_models):
    prior = load_prior(tiny_models, dtype="bf16", device="cpu", float8=True, **TEXT_ONLY)
    text = encode_text(prior, ["a cat"])
    x_init = torch.full((1, 16, 12, 12), float("nan"))
    with pytest.raises(_NonFiniteLatentsError, match="starting latents"):
        generate_stage_c(
            prior, text, text, (1, 16, 12, 12), OFFICIAL_PRIOR.with_(t_start=0.5, steps=2), x_init=x_init
        )


def test_a_damaged_weight_in_float8_is_named(tiny_models, tmp_path):
    """An infinite weight stays out of float8 (which would saturate it to 448: a silently wrong
    picture), so that the NaN diagnosis names it."""
    folder = tmp_path / "models"
    shutil.copytree(tiny_models, folder)
    path = folder / "stage_c_bf16.safetensors"
    weights = load_file(path)
    weights["clip_txt_pooled_mapper.weight"][0, 0] = float("inf")
    save_file(weights, path)
    prior = load_prior(folder, dtype="bf16", device="cpu", float8=True, **TEXT_ONLY)
    assert prior.unet.clip_txt_pooled_mapper.weight.dtype == torch.bfloat16
    assert prior.unet.clip_txt_mapper.weight.dtype == torch.float8_e4m3fn  # the other layers
    decoder = load_decoder(folder, dtype="bf16", device="cpu", float8=True)
    with pytest.raises(_NonFiniteLatentsError, match=r"clip_txt_pooled_mapper\.weight\): a damaged"):
        text_to_image(prior, decoder, "a cat", **FAST)


def test_lora_training_refuses_a_float8_prior_by_name(tiny_models, pictures, tmp_path):
    prior = load_prior(tiny_models, dtype="bf16", device="cpu", float8=True, **TEXT_ONLY)
    with pytest.raises(TrainingError, match="float8=True cannot train: load the prior without float8"):
        LoraTrainer(prior, make_config(pictures, tmp_path, tmp_path, precision="bf16"))


def test_float8_flags_are_checked_before_anything_is_read(tmp_path):
    for load in (load_prior, load_decoder):
        with pytest.raises(TypeError, match="True or False"):
            load(tmp_path, device="cpu", float8="yes")
        with pytest.raises(ValueError, match="sequential_offload.*model_offload"):
            load(tmp_path, device="cpu", float8=True, memory="sequential_offload")


def test_the_precision_benchmark_prints_every_figure(capsys, no_network):
    """The smoke run on the tiny models; the full-size figures are the benchmark's business."""
    spec = importlib.util.spec_from_file_location("precision_benchmark", ROOT / "benchmarks" / "precision.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    threads = torch.get_num_threads()
    try:
        benchmark.main(["--tiny", "--threads", "1", "--calibrate"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    figures = r"( [\d.e+-]+ \| ×[\d.]+ \|){3} [\d.]+ \|$"
    for variant in ("float32", "bfloat16", "float16, no rescale", "float16, rescaled ÷256", "float8 storage"):
        assert re.search(rf"^\| {re.escape(variant)}[^|]* \|{figures}", out, re.MULTILINE), (
            f"{variant}:\n{out}"
        )
    assert re.search(r"^\| float32, rescaled ÷256 \| [\d.e+-]+ \| ×2\.00 \| 0\.00e\+00 \|", out, re.MULTILINE)
    assert "calibration on the float16 weights (load_prior's): scale 1," in out
    assert out.count("| float8 storage, bfloat16 compute |") == 2  # Stage C and Stage B
