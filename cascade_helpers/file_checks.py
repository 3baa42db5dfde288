"""Checks on a models folder before anything is read: which files are there, which form to use,
whether each is complete and holds the right model — and, when not, the exact command that fixes it.

Every loader runs these first, so a missing, half-downloaded or misplaced file is named with the
``bash download_models.sh ...`` line that fetches it, instead of failing deep inside a library.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import torch

from . import files
from .checkpoints import (
    KIND_NAMES,
    Architecture,
    CheckpointInfo,
    TruncatedCheckpointError,
    WrongCheckpointError,
    describe,
    match_architecture,
    read_header,
)
from .files import ModelFile, Precision, Size

logger = logging.getLogger(__name__)

#: where download_models.sh puts files when given no --models-dir (beside the script)
SCRIPT_MODELS_DIR = Path(__file__).resolve().parents[1] / "models"


class MissingModelFileError(FileNotFoundError):
    """Model files are not in the models folder; the message holds the command that fetches them."""


def is_present(models_dir: Path, file: ModelFile) -> bool:
    """The file is there (a folder entry: the folder exists and is not empty)."""
    path = models_dir / file.path
    if file.folder:
        return path.is_dir() and any(path.iterdir())
    return path.is_file()


def choose_precision_file(
    models_dir: Path, candidates: dict[Precision, ModelFile], dtype: torch.dtype
) -> ModelFile:
    """The file form matching ``dtype`` if present, else the other form (cast on load). When neither
    is there, the bf16 form: the download script's default, and half the download."""
    wanted: Precision = "fp32" if dtype == torch.float32 else "bf16"
    other: Precision = "bf16" if wanted == "fp32" else "fp32"
    for precision in (wanted, other):
        if is_present(models_dir, candidates[precision]):
            return candidates[precision]
    return candidates["bf16"]


def size_present(models_dir: Path, stage: dict[Size, dict[Precision, ModelFile]]) -> Size | None:
    """Which size of a stage the folder already holds, to suggest a variant word that keeps it."""
    for size, by_precision in stage.items():
        if any(is_present(models_dir, f) for f in by_precision.values()):
            return size
    return None


def fetch_command(
    models_dir: Path, needed: list[ModelFile], stage_b: Size | None = None, stage_c: Size | None = None
) -> str:
    """``files.download_command`` for this models folder: ``--models-dir`` unless it is the script's
    default, as an absolute path (the command runs in the project folder, not in notebooks/)."""
    command = files.download_command(needed, stage_b=stage_b, stage_c=stage_c)
    folder = models_dir.resolve()
    return command if folder == SCRIPT_MODELS_DIR else f"{command} --models-dir {shlex.quote(str(folder))}"


def check_present(
    models_dir: Path, needed: list[ModelFile], stage_b: Size | None = None, stage_c: Size | None = None
) -> None:
    """Raise one error naming every missing file and the command that fetches them all."""
    missing = [f for f in needed if not is_present(models_dir, f)]
    if not missing:
        return
    lines = "\n".join(
        f"  - {models_dir / f.path}  ({f.needed_by}, {files.human_size(f.size)})" for f in missing
    )
    raise MissingModelFileError(
        f"{len(missing)} model file(s) missing from {models_dir}/:\n{lines}\n"
        f"Fetch them with (in the project folder):\n  {fetch_command(models_dir, missing, stage_b, stage_c)}"
        f"\n{files.LICENSE_NOTE}"
    )


def inspect_file(
    path: Path, kind: str, size: Size | None, fetch_command: str
) -> tuple[CheckpointInfo, Architecture | None]:
    """Header checks: complete, the right model, the right size. Tiny test weights fit any size slot."""
    try:
        info = read_header(path)
    except TruncatedCheckpointError as error:
        raise TruncatedCheckpointError(
            f"{error}.\nRe-run the download, it resumes:\n  {fetch_command}"
        ) from None
    expected = f"{KIND_NAMES[kind]}" + (f" {size}" if size else "")
    if info.kind != kind:
        raise WrongCheckpointError(
            f"{path} holds {describe(info)}, but this slot needs a {expected} checkpoint. "
            f"Did files get renamed? Fetch the right one with:\n  {fetch_command}"
        )
    architecture = match_architecture(info) if size or kind == "stage_a" else None
    if (size or kind == "stage_a") and architecture is None:
        raise WrongCheckpointError(
            f"{path} is a {KIND_NAMES[kind]} checkpoint with shapes we do not know (fine-tuned with another "
            f"architecture, or damaged). Fetch the released one with:\n  {fetch_command}"
        )
    if size and architecture not in (size, "tiny"):
        raise WrongCheckpointError(
            f"{path} holds a {KIND_NAMES[kind]} {architecture} checkpoint, but variant={size!r} was asked for. "
            f"Pass variant={architecture!r}, or fetch the {size} one with:\n  {fetch_command}"
        )
    if architecture == "tiny":
        logger.info("%s holds tiny random test weights: pictures will be noise", path)
    return info, architecture
