"""LoRA training against bad input and faults: every error names the file, a damaged checkpoint is
skipped for the one before, no file is left half-written under its name (not even by ``kill -9``),
and Ctrl-C stops the command line with exit status 130 after saving."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
from training_setup import make_config

from cascade_helpers.lora.adapters import _lora_layers, inject_lora
from cascade_helpers.lora_training.cli import _INTERRUPTED, main
from cascade_helpers.lora_training.config import TrainingError
from cascade_helpers.lora_training.data import find_training_images
from cascade_helpers.lora_training.trainer import LoraTrainer

ROOT = Path(__file__).parents[1]

# Runs the command line as `python -m cascade_helpers.lora_training` does, with one fault arranged:
# "ctrl-c" presses Ctrl-C after the first update; "kill-in-final-save" writes half of the final
# lora.safetensors wherever the package writes it, says so, and waits there to be killed.
HARNESS = """
import os, runpy, signal, sys, time

fault = sys.argv.pop(1)
if fault == "ctrl-c":
    from cascade_helpers.lora_training.trainer import LoraTrainer

    train = LoraTrainer.train

    def pressing_ctrl_c(self, on_step=None, on_validation=None):
        press = lambda step, loss: os.kill(os.getpid(), signal.SIGINT)
        return train(self, on_step=press, on_validation=on_validation)

    LoraTrainer.train = pressing_ctrl_c
elif fault == "kill-in-final-save":
    import safetensors.torch

    save_file = safetensors.torch.save_file

    def half_then_wait(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata)
        if "lora.safetensors" in os.path.basename(str(filename)):
            with open(filename, "r+b") as file:
                file.truncate(os.path.getsize(filename) // 2)
            print("SAVING", flush=True)
            time.sleep(600)

    safetensors.torch.save_file = half_then_wait
runpy.run_module("cascade_helpers.lora_training", run_name="__main__")
"""


def _command_line(tmp_path: Path, fault: str, config) -> subprocess.Popen:
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS)
    environment = os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    }
    return subprocess.Popen(
        [sys.executable, str(harness), fault, "--config", str(config.save(tmp_path / "run.json"))],
        stdout=subprocess.PIPE, stderr=(tmp_path / "stderr.txt").open("w"), text=True, env=environment,
    )  # fmt: skip


# --- pictures and captions ---------------------------------------------------------------------------


def test_a_caption_that_is_not_utf8_is_named(tmp_path):
    PIL.Image.new("RGB", (64, 64)).save(tmp_path / "cat.png")
    (tmp_path / "cat.txt").write_bytes("a photo of [chelsea] the cat, café".encode("latin-1"))
    with pytest.raises(TrainingError, match=r"the caption .*cat\.txt is not UTF-8 text .*save it as UTF-8"):
        find_training_images(tmp_path)


def test_a_file_that_is_no_picture_is_named(tmp_path):
    (tmp_path / "notes.png").write_bytes(b"these are my notes, not a picture")
    with pytest.raises(
        TrainingError, match=r"cannot read the training picture .*notes\.png .*replace it or move it"
    ):
        find_training_images(tmp_path)


def test_a_truncated_picture_is_named(fresh_prior, pictures, tmp_path):
    folder = shutil.copytree(pictures, tmp_path / "pictures")
    damaged = folder / "chelsea_face.png"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    trainer = LoraTrainer(fresh_prior(), make_config(folder, tmp_path / "out", tmp_path / "cache"))
    with pytest.raises(TrainingError, match=r"cannot read the training picture .*chelsea_face\.png"):
        trainer.prepare()


# --- the prior: refused before anything is encoded, changed all or nothing ---------------------------


def _counting_encoder(prior) -> list:
    encoded = []
    prior.effnet.register_forward_hook(lambda module, args, output: encoded.append(1))
    return encoded


def test_a_word_the_tokenizer_has_is_refused_before_encoding_and_the_corrected_run_works(
    fresh_prior, pictures, tmp_path
):
    prior = fresh_prior()
    encoded = _counting_encoder(prior)
    bad = make_config(pictures, tmp_path / "bad", tmp_path / "cache", new_tokens=[("cat", "^dog</w>")])
    with pytest.raises(TrainingError, match="the new token 'cat' is already a word of the tokenizer"):
        LoraTrainer(prior, bad).prepare()
    assert encoded == [] and not _lora_layers(prior.unet)
    LoraTrainer(prior, make_config(pictures, tmp_path / "good", tmp_path / "cache")).prepare()
    assert len(encoded) == 2 and _lora_layers(prior.unet)
    assert prior.tokenizer.tokenize("[chelsea]") == ["[chelsea]"]


def test_a_prior_that_carries_a_lora_is_refused_before_encoding(fresh_prior, pictures, tmp_path):
    prior = fresh_prior()
    inject_lora(prior.unet)
    encoded = _counting_encoder(prior)
    with pytest.raises(TrainingError, match="already carries a LoRA. Load a fresh prior"):
        LoraTrainer(prior, make_config(pictures, tmp_path, tmp_path / "cache")).prepare()
    assert encoded == []


def test_a_failure_while_adding_the_tokens_takes_the_lora_off_and_the_retry_works(
    fresh_prior, pictures, shared_cache, tmp_path, monkeypatch
):
    prior = fresh_prior()
    embedding, rows = prior.text_encoder.get_input_embeddings(), len(prior.tokenizer)

    def out_of_memory(tokens):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(prior.tokenizer, "add_tokens", out_of_memory)  # the last change install makes
    config = make_config(pictures, tmp_path, shared_cache)
    with pytest.raises(RuntimeError, match="out of memory"):
        LoraTrainer(prior, config).prepare()
    assert not _lora_layers(prior.unet)
    assert prior.text_encoder.get_input_embeddings() is embedding and embedding.num_embeddings == rows
    monkeypatch.undo()
    trainer = LoraTrainer(prior, config)  # was "already carries a LoRA"
    trainer.prepare()
    assert _lora_layers(prior.unet) and trainer.tokens is prior.text_encoder.get_input_embeddings()


# --- the command line's exit status ------------------------------------------------------------------


def test_the_command_line_exits_1_for_refused_settings_and_2_for_an_unreadable_file(
    pictures, tmp_path, capsys
):
    settings = json.loads(make_config(pictures, tmp_path, tmp_path).save(tmp_path / "run.json").read_text())
    (tmp_path / "rank.json").write_text(json.dumps(settings | {"rank": 0}))
    assert main(["--config", str(tmp_path / "rank.json")]) == 1
    assert "error: LoraTrainingConfig rank=0: rank must be a whole number ≥ 1" in capsys.readouterr().err
    del settings["images"]
    (tmp_path / "no_images.json").write_text(json.dumps(settings))
    assert main(["--config", str(tmp_path / "no_images.json")]) == 1
    assert "no_images.json: the setting(s) ['images'] are missing" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{not JSON")
    with pytest.raises(SystemExit) as exit:
        main(["--config", str(tmp_path / "broken.json")])
    assert exit.value.code == 2 and "cannot read the training settings" in capsys.readouterr().err


# --- checkpoints -------------------------------------------------------------------------------------


def test_a_damaged_checkpoint_is_named_and_the_one_before_it_resumed(
    fresh_prior, pictures, shared_cache, tmp_path
):
    config = make_config(pictures, tmp_path, shared_cache, steps=2, checkpoint_every=1, keep_checkpoints=0)
    LoraTrainer(fresh_prior(), config).train()
    (tmp_path / "checkpoints" / "step-000002" / "state.safetensors").write_bytes(b"garbage")
    rerun = LoraTrainer(fresh_prior(), config)
    with pytest.warns(UserWarning, match=r"step-000002 cannot be resumed: state\.safetensors is damaged"):
        assert rerun.resume() == 1
    (tmp_path / "checkpoints" / "step-000001" / "progress.json").write_bytes(b"")
    with (
        pytest.raises(
            TrainingError, match=r"no checkpoint .* can be resumed .*step-000001: progress\.json is damaged"
        ),
        pytest.warns(UserWarning),
    ):
        LoraTrainer(fresh_prior(), config).resume()


class _WritesAFile:
    """Unpickling this creates ``path``: what a crafted checkpoint could run instead."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_resuming_a_checkpoint_someone_sent_runs_none_of_its_code(
    fresh_prior, pictures, shared_cache, tmp_path
):
    """Pickles under the names accelerate's ``load_state`` unpickles with ``weights_only=False``
    (``custom_checkpoint_<i>.pkl``), listed in a manifest with matching checksums: resuming writes no
    file. A checkpoint holds safetensors and JSON, and nothing else is read."""
    import torch

    config = make_config(pictures, tmp_path, shared_cache, steps=1)
    LoraTrainer(fresh_prior(), config).train()
    checkpoint, marker = tmp_path / "checkpoints" / "step-000001", tmp_path / "payload-ran"
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"):
        torch.save({"state": _WritesAFile(marker)}, checkpoint / name)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"] = {p.name: _sha256(p) for p in checkpoint.iterdir() if p.name != "manifest.json"}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    try:
        step = LoraTrainer(fresh_prior(), make_config(pictures, tmp_path, shared_cache, steps=2)).resume()
    except TrainingError:
        step = None
    assert not marker.exists(), "resuming ran code from the checkpoint"
    assert step == 1  # the files it reads are intact: resumed, the others ignored


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- nothing half-written ----------------------------------------------------------------------------


def test_a_failed_validation_save_leaves_no_half_picture(
    fresh_prior, pictures, shared_cache, tmp_path, monkeypatch
):
    config = make_config(
        pictures,
        tmp_path,
        shared_cache,
        resolution=512,
        validation_prompts=["a cat"],
        validation_prior_steps=1,
    )
    trainer = LoraTrainer(fresh_prior(), config)
    save = PIL.Image.Image.save

    def full_disk(picture, target, format=None, **options):  # writes a little, then fails
        save(picture, target, format or "PNG", **options)
        with open(target, "r+b") as file:
            file.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PIL.Image.Image, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        trainer.validate()
    assert list((tmp_path / "validation").iterdir()) == []


def test_kill_9_during_the_final_save_keeps_the_earlier_lora_and_the_next_run_clears_its_temporary(
    tiny_models, fresh_prior, pictures, shared_cache, tmp_path
):
    config = make_config(pictures, tmp_path, shared_cache, steps=1, models_dir=str(tiny_models), dtype="fp32")
    earlier = tmp_path / "lora.safetensors"
    earlier.write_bytes(b"a good LoRA from an earlier run")
    process = _command_line(tmp_path, "kill-in-final-save", config)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 300)
        assert ready and process.stdout.readline().strip() == "SAVING", (tmp_path / "stderr.txt").read_text()[
            -2000:
        ]
        process.kill()  # SIGKILL: no clean-up code runs
        process.wait(30)
    finally:
        process.kill()
    assert earlier.read_bytes() == b"a good LoRA from an earlier run"
    assert (tmp_path / "checkpoints" / "step-000001").is_dir()
    assert list(tmp_path.glob(".lora.safetensors.*.tmp")), "the kill left the half-written temporary"
    # the next run (it resumes the complete run and saves its LoRA) clears what the killed one left
    result = LoraTrainer(fresh_prior(), config).train()
    assert result.lora == earlier and earlier.read_bytes() != b"a good LoRA from an earlier run"
    assert not list(tmp_path.glob(".*.tmp"))


def test_ctrl_c_stops_the_command_line_with_status_130_after_saving(
    tiny_models, pictures, shared_cache, tmp_path
):
    config = make_config(pictures, tmp_path, shared_cache, steps=3, models_dir=str(tiny_models), dtype="fp32")
    process = _command_line(tmp_path, "ctrl-c", config)
    try:
        status = process.wait(300)
    finally:
        process.kill()
    assert status == _INTERRUPTED == 130, (tmp_path / "stderr.txt").read_text()[-2000:]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]
    assert not (tmp_path / "lora.safetensors").exists()  # not trained to the end: no LoRA yet
