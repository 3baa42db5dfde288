"""The tiny-model writer produces the real on-disk formats, and they survive the round trip."""

from __future__ import annotations

import json

import pytest
import torch

from cascade_helpers import files
from cascade_helpers.checkpoints import read_header
from cascade_helpers.loading import load_stage_a, load_unet_single_file
from cascade_helpers.tiny import _tiny_unet, write_stage_a, write_stage_b, write_stage_c, write_tiny_models


@pytest.mark.parametrize("kind,write", [("stage_c", write_stage_c), ("stage_b", write_stage_b)])
def test_official_format_round_trips_to_the_same_diffusers_model(tmp_path, kind, write):
    """diffusers → official keys (our writer) → diffusers (diffusers' converter) is the identity:
    a writer that mixed up q/k/v or renamed a key would break this."""
    path = write(tmp_path, "big", "fp32", seed=7)
    loaded = load_unet_single_file(path, kind, "tiny", torch.float32).state_dict()
    original = _tiny_unet(kind, 7).state_dict()
    assert loaded.keys() == original.keys()
    for key in original:
        torch.testing.assert_close(loaded[key], original[key], msg=key)


def test_stage_a_round_trip(tmp_path):
    from cascade_helpers.checkpoints import config_dir
    from cascade_helpers.upstream import PaellaVQModel

    path = write_stage_a(tmp_path, seed=3)
    assert "vquantizer.codebook.weight" in read_header(path).tensors  # the official name
    torch.manual_seed(3)
    original = PaellaVQModel.from_config(
        PaellaVQModel.load_config(config_dir("stage_a", "tiny"))
    ).state_dict()
    loaded = load_stage_a(path, "tiny").state_dict()
    for key in original:
        torch.testing.assert_close(loaded[key], original[key], msg=key)


def test_the_folder_has_every_file_the_essential_download_has(tmp_path):
    folder = write_tiny_models(tmp_path, stage_c="lite", stage_b="big", precision="fp32")
    for file in [*files.essential_files("fp32"), files.STAGE_C["lite"]["fp32"], files.STAGE_B["big"]["fp32"]]:
        assert (folder / file.path).exists(), file.path
    assert read_header(folder / "stage_c_lite.safetensors").dtypes == {"F32"}


def test_bf16_files_hold_bf16_tensors(tiny_models):
    assert read_header(tiny_models / "stage_c_bf16.safetensors").dtypes == {"BF16"}
    assert (tiny_models / "text_encoder" / "model.bf16.safetensors").exists()


def test_tiny_text_encoder_keeps_the_bigG_pooling_quirk(tiny_models):
    """bigG's config has eos_token_id=2, so transformers pools at the highest token id."""
    config = json.loads((tiny_models / "text_encoder" / "config.json").read_text())
    assert config["eos_token_id"] == 2
    vocab = json.loads((tiny_models / "tokenizer" / "vocab.json").read_text())
    assert max(vocab.values()) == vocab["<|endoftext|>"]


def test_the_install_check_command_makes_a_picture(tmp_path, capsys):
    """`python -m cascade_helpers.tiny --demo`, the README's one-minute install check."""
    import PIL.Image

    from cascade_helpers.tiny import main

    main(["--models-dir", str(tmp_path / "tiny_models"), "--demo"])
    assert "RANDOM tiny weights" in capsys.readouterr().out
    with PIL.Image.open(tmp_path / "tiny_demo.png") as picture:
        assert picture.size == (512, 512)
