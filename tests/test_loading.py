"""Loading from a models folder: every variant, offline, and errors that say what to do."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from cascade_helpers import files
from cascade_helpers.checkpoints import _official_shapes, _TruncatedCheckpointError, _WrongCheckpointError
from cascade_helpers.file_checks import MissingModelFileError
from cascade_helpers.loading import load_decoder, load_prior
from cascade_helpers.tiny import (
    _tiny_unet,
    _write_stage_a,
    _write_text_encoder,
    _write_tokenizer,
    _write_unet,
)
from tests.sparse import write_sparse_checkpoint

TEXT_ONLY = {"image_encoder": False, "effnet": False, "previewer": False}


@pytest.fixture
def text_folder(tmp_path):
    """A models folder with the tokenizer and a bf16 text encoder, no stage files yet."""
    _write_tokenizer(tmp_path)
    _write_text_encoder(tmp_path, "bf16")
    return tmp_path


@pytest.mark.parametrize("stage_b", ["big", "lite"])
@pytest.mark.parametrize("stage_c", ["big", "lite"])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_every_variant_loads_from_its_official_file_names(tmp_path, stage_b, stage_c, precision):
    _write_tokenizer(tmp_path)
    _write_text_encoder(tmp_path, precision)
    _write_unet(tmp_path, "stage_c", stage_c, precision, seed=0)
    _write_unet(tmp_path, "stage_b", stage_b, precision, seed=1)
    _write_stage_a(tmp_path)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    prior = load_prior(tmp_path, stage_c, dtype=dtype, device="cpu", **TEXT_ONLY)
    decoder = load_decoder(tmp_path, stage_b, dtype=dtype, device="cpu")

    assert prior.stage_c_file == tmp_path / files.STAGE_C[stage_c][precision].path
    assert decoder.stage_b_file == tmp_path / files.STAGE_B[stage_b][precision].path
    assert (prior.architecture, decoder.architecture) == ("tiny", "tiny")
    assert prior.unet.dtype == decoder.unet.dtype == prior.text_encoder.dtype == dtype
    expected = _tiny_unet("stage_c", 0).to(dtype).state_dict()
    for key, value in prior.unet.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)


def test_a_bf16_download_serves_a_float32_run(text_folder):
    """Users download bf16 (the default) and may compute in float32: the file is cast on load."""
    _write_unet(text_folder, "stage_c", "big", "bf16")
    prior = load_prior(text_folder, "big", dtype="fp32", device="cpu", **TEXT_ONLY)
    assert prior.unet.dtype == torch.float32
    assert prior.stage_c_file == text_folder / "stage_c_bf16.safetensors"


def test_loading_never_opens_a_connection(tiny_models, no_network):
    prior = load_prior(tiny_models, "big", device="cpu")
    decoder = load_decoder(tiny_models, "big", device="cpu")
    assert prior.image_encoder is not None and prior.effnet is not None and decoder.vqgan is not None


def test_an_empty_folder_names_every_file_and_the_one_command(tmp_path):
    with pytest.raises(MissingModelFileError) as caught:
        load_prior(tmp_path, "big", device="cpu")
    message = str(caught.value)
    for path in (
        "stage_c_bf16.safetensors",
        "text_encoder/model.bf16.safetensors",
        "effnet_encoder.safetensors",
    ):
        assert path in message
    assert "bash download_models.sh essential big-big bfloat16 --models-dir" in message
    assert "non-commercial" in message


def test_a_relative_models_folder_is_named_absolutely_in_the_command(tmp_path, monkeypatch):
    """The command runs in the project folder, not where the notebook runs: ../models would miss."""
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    with pytest.raises(MissingModelFileError) as caught:
        load_prior("../models", "big", device="cpu")
    assert f"--models-dir {tmp_path / 'models'}\n" in str(caught.value)


def test_the_suggested_variant_keeps_the_stage_b_already_there(text_folder):
    _write_unet(text_folder, "stage_b", "lite", "bf16")
    with pytest.raises(MissingModelFileError, match=r"bash download_models.sh small-big bfloat16"):
        load_prior(text_folder, "big", device="cpu", **TEXT_ONLY)


def test_an_interrupted_download_says_to_rerun(text_folder):
    path = _write_unet(text_folder, "stage_c", "big", "bf16")
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(
        _TruncatedCheckpointError,
        match=r"(?s)incomplete.*resumes.*bash download_models.sh big-big bfloat16 --models-dir "
        + re.escape(str(text_folder)),
    ):
        load_prior(text_folder, "big", device="cpu", **TEXT_ONLY)


def test_a_stage_b_file_in_stage_cs_slot_is_named(text_folder):
    shutil.copy(_write_unet(text_folder, "stage_b", "big", "bf16"), text_folder / "stage_c_bf16.safetensors")
    with pytest.raises(
        _WrongCheckpointError, match=r"holds a Stage B \(decoder\) tiny checkpoint.*needs a Stage C"
    ):
        load_prior(text_folder, "big", device="cpu", **TEXT_ONLY)


def test_a_lite_checkpoint_asked_for_as_big_is_named(text_folder):
    write_sparse_checkpoint(text_folder / "stage_c_bf16.safetensors", _official_shapes("stage_c", "lite"))
    with pytest.raises(
        _WrongCheckpointError, match=r"Stage C \(prior\) lite checkpoint, but variant='big'.*variant='lite'"
    ):
        load_prior(text_folder, "big", device="cpu", **TEXT_ONLY)


def test_a_big_stage_b_asked_for_as_lite_is_named(tmp_path):
    _write_stage_a(tmp_path)
    write_sparse_checkpoint(tmp_path / "stage_b_lite_bf16.safetensors", _official_shapes("stage_b", "big"))
    with pytest.raises(
        _WrongCheckpointError, match=r"Stage B \(decoder\) big checkpoint, but variant='lite'"
    ):
        load_decoder(tmp_path, "lite", device="cpu")


def test_float16_stage_c_is_rescaled_and_allow_float16_keeps_it_raw(tiny_models):
    prior = load_prior(tiny_models, "big", dtype=torch.float16, device="cpu", **TEXT_ONLY)
    assert prior.unet.dtype == torch.float16 and prior.unet._float16_scale >= 1  # tests/test_float16.py
    prior = load_prior(tiny_models, "big", dtype=torch.float16, device="cpu", allow_float16=True, **TEXT_ONLY)
    assert prior.unet.dtype == torch.float16 and not hasattr(prior.unet, "_float16_scale")


def test_unknown_variant(tiny_models):
    with pytest.raises(ValueError, match="'big' or 'lite'"):
        load_prior(tiny_models, "medium", device="cpu")


@pytest.mark.parametrize(
    "source,local",
    [
        ("stabilityai/stable-cascade-prior", False),
        ("someone/my-cascade-finetune", False),
        ("../models", True),
        ("./models/x", True),
        ("models", True),
    ],
)
def test_folders_and_hub_ids_are_told_apart(source, local):
    from cascade_helpers.loading import _is_local_folder

    assert _is_local_folder(source) is local


@pytest.mark.parametrize("loader", ["load_prior", "load_decoder", "_load_text_encoder", "_load_effnet"])
def test_an_unreachable_hub_id_explains_both_readings(monkeypatch, loader):
    import socket

    from cascade_helpers import loading

    def no_internet(*args, **kwargs):
        raise ConnectionRefusedError("no internet in this test")

    monkeypatch.setattr(socket, "create_connection", no_internet)
    monkeypatch.setattr(socket.socket, "connect", no_internet)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # no retries with back-off
    with pytest.raises(MissingModelFileError, match="not a folder here"):
        getattr(loading, loader)("nobody/no-such-cascade", device="cpu")
