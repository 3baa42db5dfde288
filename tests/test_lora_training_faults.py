"""LoRA training against bad input and faults: every error names the file, a damaged checkpoint is
skipped for the one before, no file is left half-written under its name (not even by ``kill -9``),
and Ctrl-C stops the command line with exit status 130 after saving."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
from training_setup import make_config

from cascade_helpers.lora_training import INTERRUPTED, LoraTrainer, TrainingError, find_training_images

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


# --- checkpoints -------------------------------------------------------------------------------------


def test_a_damaged_checkpoint_is_named_and_the_one_before_it_resumed(
    fresh_prior, pictures, shared_cache, tmp_path
):
    config = make_config(pictures, tmp_path, shared_cache, steps=2, checkpoint_every=1, keep_checkpoints=0)
    LoraTrainer(fresh_prior(), config).train()
    (tmp_path / "checkpoints" / "step-000002" / "optimizer.bin").write_bytes(b"garbage")
    rerun = LoraTrainer(fresh_prior(), config)
    with pytest.warns(UserWarning, match=r"step-000002 cannot be resumed: optimizer\.bin is damaged"):
        assert rerun.resume() == 1
    (tmp_path / "checkpoints" / "step-000001" / "random_states_0.pkl").write_bytes(b"")
    with (
        pytest.raises(
            TrainingError,
            match=r"no checkpoint .* can be resumed .*step-000001: random_states_0\.pkl is damaged",
        ),
        pytest.warns(UserWarning),
    ):
        LoraTrainer(fresh_prior(), config).resume()


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


def test_kill_9_during_the_final_save_keeps_the_lora_of_an_earlier_run(
    tiny_models, pictures, shared_cache, tmp_path
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


def test_ctrl_c_stops_the_command_line_with_status_130_after_saving(
    tiny_models, pictures, shared_cache, tmp_path
):
    config = make_config(pictures, tmp_path, shared_cache, steps=3, models_dir=str(tiny_models), dtype="fp32")
    process = _command_line(tmp_path, "ctrl-c", config)
    try:
        status = process.wait(300)
    finally:
        process.kill()
    assert status == INTERRUPTED == 130, (tmp_path / "stderr.txt").read_text()[-2000:]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]
    assert not (tmp_path / "lora.safetensors").exists()  # not trained to the end: no LoRA yet
