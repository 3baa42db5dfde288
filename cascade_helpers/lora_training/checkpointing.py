"""Checkpoint folders, written into a hidden temporary folder and renamed (``step-NNNNNN`` is always
complete), SHA-256 checksums written last (a damaged one is found before anything loads), the latest few
kept. Safetensors and JSON only, so one someone sent cannot run code: not accelerate's ``save_state``,
which unpickles, writes in place and deletes old checkpoints before the new one is complete.
``state.safetensors``: ``weights.<name>``, ``ema.<i>``, AdamW's ``optimizer.<i>.<name>``, ``generators``;
``progress.json``: step, losses, AdamW's groups, EMA updates; ``config.json``: the settings."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..atomic import _atomic_path, _save_safetensors, _write_json
from .config import LoraTrainingConfig, TrainingError

_STATE, _PROGRESS, _CONFIG, _MANIFEST = "state.safetensors", "progress.json", "config.json", "manifest.json"
_NAME = re.compile(r"step-\d{6}")


def _sha256(path: Path) -> str:
    """Why: the manifest's checksum of one file, read in blocks (a state file can be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _damage(folder: Path) -> str | None:
    """Why: a file missing or changed since it was saved is found before anything loads (None: intact)."""
    try:
        files = json.loads((folder / _MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"it has no {_MANIFEST} (not made by this version, or not finished)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its {_MANIFEST} is damaged ({error})"
    if not isinstance(files, dict) or not {_STATE, _PROGRESS, _CONFIG} <= set(files):
        return f"its {_MANIFEST} does not list {_STATE}, {_PROGRESS} and {_CONFIG} (not made by this version)"
    for name, expected in files.items():
        if not (folder / name).is_file():
            return f"{name} is missing"
        if _sha256(folder / name) != expected:
            return f"{name} is damaged (its bytes changed since it was saved)"
    return None


class _CheckpointFolder:
    """Why: a run's ``checkpoints/`` and its trainer's state: written by the main process, read by all."""

    def __init__(self, trainer) -> None:
        self.trainer, self.config, self.accelerator = trainer, trainer.config, trainer.accelerator
        self.folder = trainer.output_dir / "checkpoints"

    def list(self) -> list[Path]:
        """Complete checkpoints (named ``step-NNNNNN``), oldest first; temporary ones are hidden."""
        return sorted(p for p in self.folder.glob("step-*") if _NAME.fullmatch(p.name))

    def save(self) -> Path:
        """``step-NNNNNN``, complete or not at all; the older ones stay until it is."""
        tensors, progress = self._state()
        final = self.folder / f"step-{self.trainer.step:06d}"
        if self.accelerator.is_main_process:
            with _atomic_path(final) as temporary:
                temporary.mkdir()
                _save_safetensors(temporary / _STATE, tensors)
                _write_json(temporary / _PROGRESS, progress)
                _write_json(temporary / _CONFIG, dataclasses.asdict(self.config))
                checksums = {p.name: _sha256(p) for p in sorted(temporary.iterdir())}
                _write_json(temporary / _MANIFEST, {"files": checksums})
            for old in self.list()[: -self.config.keep_checkpoints] if self.config.keep_checkpoints else ():
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return final

    def load_latest(self) -> Path | None:
        """The newest intact checkpoint loaded into the trainer (a damaged one named and skipped), or None."""
        damaged = []
        for folder in reversed(self.list()):
            problem = _damage(folder)
            if problem is None:
                self._load(folder)
                return folder
            damaged.append(f"{folder.name}: {problem}")
            if self.accelerator.is_main_process:
                warnings.warn(
                    f"the checkpoint {folder} cannot be resumed: {problem}. Trying the one before it.",
                    stacklevel=3,
                )
        if damaged:
            raise TrainingError(
                f"no checkpoint in {self.folder} can be resumed ({'; '.join(damaged)}). Delete them to "
                "start afresh, or use another output_dir"
            )
        return None

    def _load(self, folder: Path) -> None:
        try:
            progress = json.loads((folder / _PROGRESS).read_text())
            self._check_compatible(json.loads((folder / _CONFIG).read_text()), progress["step"], folder)
            self._restore(load_file(str(folder / _STATE)), progress)
        except TrainingError:
            raise
        except Exception as error:  # checksum-clean files that do not fit: made by another version
            raise TrainingError(
                f"could not load the checkpoint {folder} ({type(error).__name__}: {error}). Move it "
                f"out of {self.folder} to resume from the one before, or use another output_dir"
            ) from error

    def _check_compatible(self, saved: dict, step: int, where: Path) -> None:
        current = dataclasses.asdict(self.config)
        for key in LoraTrainingConfig.RESUME_KEYS:
            before = [tuple(t) for t in saved.get(key, [])] if key == "new_tokens" else saved.get(key)
            if before != current[key]:
                raise TrainingError(
                    f"the checkpoint in {where} was made with {key}={saved.get(key)!r}, this run has "
                    f"{current[key]!r}. Use the same setting to continue it, or another output_dir to start afresh."
                )
        if step > self.config.steps:
            raise TrainingError(
                f"the checkpoint in {where} is at step {step}, beyond this run's steps={self.config.steps}: "
                "raise steps to continue it, or use another output_dir to start afresh"
            )

    def _trained(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.trainer.objective.named_parameters() if p.requires_grad}

    def _state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """What a resume needs to continue exactly (every process's generator gathered: all must call)."""
        trainer = self.trainer
        tensors = {f"weights.{n}": p.detach().float() for n, p in self._trained().items()}
        generators = trainer.generator.get_state()[None]
        if self.accelerator.num_processes > 1:
            generators = self.accelerator.gather(generators.to(self.accelerator.device)).cpu()
        tensors["generators"] = generators
        optimizer = trainer.optimizer.state_dict()
        for i, state in optimizer["state"].items():
            tensors |= {f"optimizer.{i}.{key}": torch.as_tensor(value) for key, value in state.items()}
        progress = {"step": trainer.step, "losses": trainer.losses, "param_groups": optimizer["param_groups"]}
        if trainer.ema is not None:
            tensors |= {f"ema.{i}": p for i, p in enumerate(trainer.ema.shadow_params)}
            progress["ema_updates"] = trainer.ema.optimization_step
        return tensors, progress

    def _restore(self, tensors: dict[str, torch.Tensor], progress: dict) -> None:
        trainer = self.trainer
        weights = {k.removeprefix("weights."): v for k, v in tensors.items() if k.startswith("weights.")}
        if set(weights) != set(self._trained()):
            raise TrainingError("the checkpoint holds other trained weights than this run trains")
        trainer.objective.load_state_dict(weights, strict=False)  # the trained ones: the rest stays
        optimizer: dict[int, dict[str, torch.Tensor]] = {}  # AdamW's state, stored as optimizer.<i>.<name>
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                optimizer.setdefault(int(index), {})[name] = value
        trainer.optimizer.load_state_dict({"state": optimizer, "param_groups": progress["param_groups"]})
        if trainer.ema is not None:
            shadow = [tensors[f"ema.{i}"].to(trainer.prior.device) for i in range(len(trainer.trainable))]
            trainer.ema.load_state_dict(
                {"optimization_step": progress["ema_updates"], "shadow_params": shadow}
            )
        saved, index = tensors["generators"], self.accelerator.process_index
        if index < len(saved):  # a run resumed on more processes starts the extra ones afresh
            trainer.generator.set_state(saved[index].clone())
        trainer.step, trainer.losses = int(progress["step"]), [tuple(x) for x in progress["losses"]]
