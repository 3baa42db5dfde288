"""Reading what a checkpoint holds from its header: complete or not, which model, which size."""

from __future__ import annotations

import pytest

from cascade_helpers.checkpoints import (
    CheckpointError,
    _describe,
    _match_architecture,
    _official_shapes,
    _read_header,
    _TruncatedCheckpointError,
)
from tests.sparse import write_sparse_checkpoint


@pytest.mark.parametrize(
    "path,kind",
    [
        ("stage_c_bf16.safetensors", "stage_c"),
        ("stage_b_bf16.safetensors", "stage_b"),
        ("stage_a.safetensors", "stage_a"),
        ("effnet_encoder.safetensors", "effnet"),
        ("previewer.safetensors", "previewer"),
    ],
)
def test_kind_is_recognized_from_the_keys(tiny_models, path, kind):
    assert _read_header(tiny_models / path).kind == kind


@pytest.mark.parametrize("kind", ["stage_c", "stage_b"])
@pytest.mark.parametrize("architecture", ["big", "lite"])
def test_released_sizes_are_recognized_from_the_shapes(tmp_path, kind, architecture):
    path = write_sparse_checkpoint(tmp_path / "x.safetensors", _official_shapes(kind, architecture))
    info = _read_header(path)
    assert (info.kind, _match_architecture(info)) == (kind, architecture)
    assert _describe(info).endswith(f"{architecture} checkpoint")


def test_a_cut_off_download_is_named_as_one(tiny_models, tmp_path):
    """safetensors itself finds the file shorter than its header says; the message names the file."""
    data = (tiny_models / "stage_c_bf16.safetensors").read_bytes()
    cut = tmp_path / "stage_c_bf16.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(_TruncatedCheckpointError, match=rf"{cut.name} is incomplete .*interrupted"):
        _read_header(cut)


def test_a_file_cut_inside_its_header(tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"\x00\x10\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(_TruncatedCheckpointError):
        _read_header(path)


def test_something_else_than_safetensors(tmp_path):
    path = tmp_path / "page.safetensors"
    path.write_bytes(b"<html>" + b"\x00" * 100)  # e.g. an error page saved under the file's name
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        _read_header(path)


@pytest.mark.parametrize(
    "header",
    [
        b"[]",
        b'{"a": 1}',
        b'{"a": {"dtype": "F32"}}',
        b'{"a": {"dtype": "F32", "shape": 3, "data_offsets": 0}}',
    ],
)
def test_json_that_is_no_safetensors_header_is_named(tmp_path, header):
    """Valid JSON of another layout is a damaged file, named as one (not a bare TypeError or KeyError)."""
    path = tmp_path / "x.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(CheckpointError, match=r"x\.safetensors is not a safetensors file \(.*header"):
        _read_header(path)
