"""The tiny-model writer produces the real on-disk formats, and they survive the round trip."""

from __future__ import annotations

import json

import pytest
import torch

from cascade_helpers import files
from cascade_helpers.checkpoints import _read_header
from cascade_helpers.loading import _load_stage_a, _load_unet
from cascade_helpers.tiny import _tiny_unet, _write_stage_a, _write_unet, write_tiny_models


@pytest.mark.parametrize("kind", ["stage_c", "stage_b"])
def test_official_format_round_trips_to_the_same_diffusers_model(tmp_path, kind):
    """diffusers → official keys (our writer) → diffusers (diffusers' converter) is the identity:
    a writer that mixed up q/k/v or renamed a key would break this."""
    path = _write_unet(tmp_path, kind, "big", "fp32", seed=7)
    loaded = _load_unet(path, kind, "tiny", torch.float32).state_dict()
    original = _tiny_unet(kind, 7).state_dict()
    assert loaded.keys() == original.keys()
    for key in original:
        torch.testing.assert_close(loaded[key], original[key], msg=key)


def test_stage_a_round_trip(tmp_path):
    from cascade_helpers.checkpoints import config_dir
    from cascade_helpers.upstream import PaellaVQModel

    path = _write_stage_a(tmp_path, seed=3)
    assert "vquantizer.codebook.weight" in _read_header(path).tensors  # the official name
    torch.manual_seed(3)
    original = PaellaVQModel.from_config(
        PaellaVQModel.load_config(config_dir("stage_a", "tiny"))
    ).state_dict()
    loaded = _load_stage_a(path, "tiny").state_dict()
    for key in original:
        torch.testing.assert_close(loaded[key], original[key], msg=key)


def test_the_folder_has_every_file_the_essential_download_has(tmp_path):
    folder = write_tiny_models(tmp_path, stage_c="lite", stage_b="big", precision="fp32")
    for file in [
        *files._essential_files("fp32"),
        files.STAGE_C["lite"]["fp32"],
        files.STAGE_B["big"]["fp32"],
    ]:
        assert (folder / file.path).exists(), file.path
    assert _dtypes(folder / "stage_c_lite.safetensors") == {"F32"}


def _dtypes(path):
    return {t.dtype for t in _read_header(path).tensors.values()}


def test_bf16_files_hold_bf16_tensors(tiny_models):
    assert _dtypes(tiny_models / "stage_c_bf16.safetensors") == {"BF16"}
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


def test_the_command_line_writes_everything_the_notebooks_read(tmp_path, capsys):
    """`python -m cascade_helpers.tiny --all`: the files of `download_models.sh all` (ControlNets and
    the example LoRA) and both Stage B sizes, as CI gives the notebooks."""
    from cascade_helpers.tiny import main

    main(["--models-dir", str(tmp_path), "--all"])
    wanted = [
        *files._essential_files("bf16"),
        files.STAGE_C["big"]["bf16"],
        files.STAGE_B["big"]["bf16"],
        files.STAGE_B["lite"]["bf16"],
        *files._CONTROLNETS.values(),
        files.LORA_FERNANDO,
    ]
    assert [f.path for f in wanted if not (tmp_path / f.path).exists()] == []
    assert f"written to {tmp_path}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags,expected",
    [
        ([], {"controlnets": False, "lora": False, "both_stage_b": False}),
        (["--controlnets"], {"controlnets": True, "lora": False, "both_stage_b": False}),
        (["--lora"], {"controlnets": False, "lora": True, "both_stage_b": False}),
        (["--both-stage-b"], {"controlnets": False, "lora": False, "both_stage_b": True}),
        (["--lora", "--controlnets"], {"controlnets": True, "lora": True, "both_stage_b": False}),
    ],
)
def test_each_command_line_flag_adds_its_files(tmp_path, monkeypatch, flags, expected):
    from cascade_helpers import tiny

    calls = []
    monkeypatch.setattr(tiny, "write_tiny_models", lambda folder, **options: calls.append(options) or folder)
    tiny.main(["--models-dir", str(tmp_path), "--variant", "small-big", *flags])
    (options,) = calls
    assert {k: options[k] for k in expected} == expected
    assert (options["stage_b"], options["stage_c"]) == ("lite", "big")
