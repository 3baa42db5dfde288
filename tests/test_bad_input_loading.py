"""Hostile model folders: every file the loaders read — not only the UNets — is checked first, and a
half-written, damaged or misplaced one is named with the command that fetches it again, instead of
safetensors' "incomplete metadata", a bare JSONDecodeError/KeyError, or (for a swapped encoder)
transformers quietly initializing random weights.

Each case links the tiny models into a fresh folder and damages one file there.
"""

from __future__ import annotations

import os
import re
import shutil

import pytest

from cascade_helpers.checkpoints import CheckpointError, _TruncatedCheckpointError, _WrongCheckpointError
from cascade_helpers.loading import _load_effnet, _load_text_encoder, load_decoder, load_prior


def _half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _zeros(path):
    path.write_bytes(bytes(path.stat().st_size))


def _text(text):
    return lambda path: path.write_text(text)


def _drop_key(key):
    import json

    def drop(path):
        value = json.loads(path.read_text())
        del value[key]
        path.write_text(json.dumps(value))

    return drop


def _swap_with(other):
    return lambda path: shutil.copyfile(path.parents[1] / other, path)


def _prior(models):
    return load_prior(models, "big", dtype="fp32", device="cpu")


CASES = [
    # file, damage, loader, error, what the message must say (besides the file's path)
    ("text_encoder/model.bf16.safetensors", _half, _prior, _TruncatedCheckpointError, "incomplete .*the download was interrupted"),
    ("image_encoder/model.bf16.safetensors", _half, _prior, _TruncatedCheckpointError, "incomplete"),
    ("text_encoder/model.bf16.safetensors", _swap_with("image_encoder/model.bf16.safetensors"), _prior, _WrongCheckpointError,
     "holds a CLIP image encoder checkpoint, but this slot needs a CLIP text encoder"),
    ("image_encoder/model.bf16.safetensors", _swap_with("text_encoder/model.bf16.safetensors"), _prior, _WrongCheckpointError,
     "holds a CLIP text encoder checkpoint"),
    ("feature_extractor/preprocessor_config.json", _half, _prior, CheckpointError, "is not valid JSON"),
    ("feature_extractor/preprocessor_config.json", _drop_key("image_mean"), _prior, CheckpointError, "lacks 'image_mean'"),
    ("text_encoder/config.json", _half, _prior, CheckpointError, "is not valid JSON"),
    ("text_encoder/config.json", _text("[1, 2]"), _prior, CheckpointError, "holds a JSON list, not an object"),
    ("image_encoder/config.json", _text("  \n"), _prior, CheckpointError, "is empty"),
    ("tokenizer/vocab.json", _half, _prior, CheckpointError, "is not valid JSON"),
    ("tokenizer/tokenizer_config.json", _zeros, _prior, CheckpointError, "holds NUL bytes"),
    ("tokenizer/merges.txt", _zeros, _prior, CheckpointError, "holds NUL bytes"),
    ("tokenizer/merges.txt", _text("#version: 0.2\nc a t\n"), _prior, CheckpointError, "not a pair of tokens: 'c a t'"),
    ("effnet_encoder.safetensors", _zeros, _prior, CheckpointError, r"is not a safetensors file"),
    ("previewer.safetensors", _half, _prior, _TruncatedCheckpointError, "incomplete"),
    ("tokenizer/vocab.json", _half, lambda m: _load_text_encoder(m, device="cpu"), CheckpointError, "is not valid JSON"),
    ("text_encoder/model.bf16.safetensors", _half, lambda m: _load_text_encoder(m, device="cpu"), _TruncatedCheckpointError, "incomplete"),
    ("effnet_encoder.safetensors", _half, lambda m: _load_effnet(m, device="cpu"), _TruncatedCheckpointError, "incomplete"),
    ("stage_a.safetensors", _zeros, lambda m: load_decoder(m, device="cpu"), CheckpointError, "is not a safetensors file"),
]  # fmt: skip
COMMANDS = {
    "stage_a.safetensors": "bash download_models.sh essential",
    "effnet_encoder.safetensors": "bash download_models.sh essential",
    "previewer.safetensors": "bash download_models.sh essential",
    "text_encoder/model.bf16.safetensors": "bash download_models.sh essential bfloat16",
    "image_encoder/model.bf16.safetensors": "bash download_models.sh essential bfloat16",
}


@pytest.fixture
def linked(tiny_models, tmp_path):
    """A models folder whose files are links to the tiny ones (cheap); damage() replaces one by a
    damaged copy."""
    models = tmp_path / "models"
    shutil.copytree(tiny_models, models, copy_function=os.symlink)

    def damage(relative, how):
        path = models / relative
        data = path.read_bytes()
        path.unlink()
        path.write_bytes(data)
        how(path)
        return path

    return models, damage


@pytest.mark.parametrize(
    ("relative", "how", "loader", "error", "message"),
    CASES,
    ids=[f"{c[0]}-{getattr(c[1], '__name__', 'edit')}-{i}" for i, c in enumerate(CASES)],
)
def test_a_damaged_file_is_named_with_the_command_that_fetches_it(
    linked, relative, how, loader, error, message
):
    models, damage = linked
    path = damage(relative, how)
    with pytest.raises(error) as caught:
        loader(models)
    text = str(caught.value)
    assert str(path) in text and re.search(message, text), text
    command = COMMANDS.get(relative, "bash download_models.sh essential")
    assert f"{command} --models-dir {models.resolve()}" in text, text
    if error is CheckpointError:  # the size may be right: a plain re-run would keep it
        assert "--verify" in text


def test_a_tokenizer_folder_without_its_vocabulary(linked):
    models, _ = linked
    for name in ("vocab.json", "tokenizer.json"):  # the published folder has no tokenizer.json
        (models / "tokenizer" / name).unlink(missing_ok=True)
    with pytest.raises(
        CheckpointError, match=r"(?s)tokenizer lacks vocab.json and merges.txt .*download_models.sh essential"
    ):
        _prior(models)


def test_a_models_folder_that_is_a_file(tmp_path):
    (tmp_path / "models").write_text("x")
    with pytest.raises(NotADirectoryError, match=f"{tmp_path / 'models'} is a file, not a models folder"):
        _prior(tmp_path / "models")


def test_the_intact_linked_folder_loads(linked):
    """The cases above fail because of their one damaged file, not because of the links."""
    models, _ = linked
    assert _prior(models).architecture == "tiny"
