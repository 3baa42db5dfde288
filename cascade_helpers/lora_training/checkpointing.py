"""Checkpoint folders: ``accelerator.save_state`` written into a temporary folder and renamed, so a
folder named ``step-NNNNNN`` is always complete; a manifest of checksums, so a damaged file is found
before anything is loaded and the previous intact checkpoint is used instead; the settings the run
was made with; the rotation that keeps the latest few.

What a checkpoint folder holds (accelerate's names, plus ours):

- ``trainable.safetensors`` — the trained weights only (LoRA factors, new tokens' rows), by name;
  written by our save hook instead of accelerate's copy of the whole model;
- ``optimizer.bin``, ``scheduler.bin`` — accelerate's, of the prepared optimizer and lr schedule;
- ``random_states_<process>.pkl`` — accelerate's: Python, NumPy and torch generators and its
  accumulation counter, one per process;
- ``custom_checkpoint_<i>.pkl`` — objects registered with ``register_for_checkpointing``: the step
  and loss history, our batch generator (every process's state), the EMA weights when on;
- ``config.json`` — the run's settings (a resume checks the ones that must not change);
- ``manifest.json`` — the SHA-256 of every file above, written last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

from ..atomic import _atomic_path, _write_json
from .config import LoraTrainingConfig, TrainingError

MANIFEST = "manifest.json"
CONFIG = "config.json"
TRAINABLE = "trainable.safetensors"
_NAME = re.compile(r"step-\d{6}")


class Registered:
    """Anything as an object accelerate can ``register_for_checkpointing``: a getter and a setter of
    its state (accelerate only needs ``state_dict`` / ``load_state_dict``)."""

    def __init__(self, state: Callable[[], dict], load: Callable[[dict], None]) -> None:
        self.state_dict, self.load_state_dict = state, load


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def damage(folder: Path) -> str | None:
    """Why the checkpoint in ``folder`` cannot be trusted (a file missing or changed since it was
    saved, no manifest), or None when every file is as written."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST} (not made by this version, or not finished)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its {MANIFEST} is damaged ({error})"
    if not isinstance(files, dict):
        return f"its {MANIFEST} is damaged (no list of files)"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != expected:
            return f"{name} is damaged (its bytes changed since it was saved)"
    return None


class CheckpointFolder:
    """The ``checkpoints/`` folder of a run, written and read through ``accelerator``."""

    def __init__(self, folder: Path, accelerator, config: LoraTrainingConfig) -> None:
        self.folder, self.accelerator, self.config = folder, accelerator, config

    def list(self) -> list[Path]:
        """Complete checkpoints (named ``step-NNNNNN``), oldest first; temporary ones are hidden."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if _NAME.fullmatch(p.name))

    def save(self, step: int) -> Path:
        """Save everything accelerate holds (and our registered state) as ``step-NNNNNN``: first into
        a hidden temporary folder, with the settings and a manifest, then renamed, so the name never
        holds half a checkpoint and the previous checkpoints stay until this one is complete."""
        from accelerate.utils import broadcast_object_list

        accelerator, main = self.accelerator, self.accelerator.is_main_process
        final = self.folder / f"step-{step:06d}"
        accelerator.wait_for_everyone()
        if main:  # temporaries left by a killed run
            for stale in self.folder.glob(".step-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
        with _atomic_path(final) if main else contextlib.nullcontext() as temporary:
            # every process writes its random states into the one folder the main process chose
            (where,) = broadcast_object_list([str(temporary) if main else None])
            accelerator.save_state(where)
            accelerator.wait_for_everyone()
            if main:
                _write_json(Path(where) / CONFIG, dataclasses.asdict(self.config))
                files = sorted(p for p in Path(where).iterdir() if p.is_file())
                _write_json(Path(where) / MANIFEST, {"files": {p.name: _sha256(p) for p in files}})
        if main and self.config.keep_checkpoints:
            for old in self.list()[: -self.config.keep_checkpoints]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return final

    def load_latest(self) -> Path | None:
        """Load the newest intact checkpoint into the accelerator (a damaged one is named, with what
        is wrong, and skipped for the one before); None when there is none.

        Raises:
            TrainingError: the checkpoint was made with settings this run cannot continue, or every
                checkpoint there is damaged.
        """
        damaged = []
        for folder in reversed(self.list()):
            problem = damage(folder)
            if problem:
                damaged.append(f"{folder.name}: {problem}")
                if self.accelerator.is_main_process:
                    warnings.warn(
                        f"the checkpoint {folder} cannot be resumed: {problem}. Trying the one before it.",
                        stacklevel=3,
                    )
                continue
            self._check_compatible(json.loads((folder / CONFIG).read_text()), folder)
            try:
                self.accelerator.load_state(str(folder))
            except Exception as error:  # a checksum-clean file accelerate still cannot read
                raise TrainingError(
                    f"could not load the checkpoint {folder} ({type(error).__name__}: {error}). Move it "
                    f"out of {self.folder} to resume from the one before, or use another output_dir"
                ) from error
            return folder
        if damaged:
            raise TrainingError(
                f"no checkpoint in {self.folder} can be resumed ({'; '.join(damaged)}). Delete them to "
                "start afresh, or use another output_dir"
            )
        return None

    def _check_compatible(self, saved: dict, where: Path) -> None:
        current = dataclasses.asdict(self.config)
        for key in LoraTrainingConfig.RESUME_KEYS:
            before = [tuple(t) for t in saved.get(key, [])] if key == "new_tokens" else saved.get(key)
            if before != current[key]:
                raise TrainingError(
                    f"the checkpoint in {where} was made with {key}={saved.get(key)!r}, this run has "
                    f"{current[key]!r}. Use the same setting to continue it, or another output_dir to start afresh."
                )
