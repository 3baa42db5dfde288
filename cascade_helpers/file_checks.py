"""Checks on a models folder before anything is read: which files are there, which form to use,
whether each is complete and holds the right model — and, when not, the exact command that fixes it.

Every loader runs these first, so a missing, half-downloaded or misplaced file is named with the
``bash download_models.sh ...`` line that fetches it, instead of failing deep inside a library.
"""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path

import torch

from . import files
from .checkpoints import (
    KIND_NAMES,
    Architecture,
    CheckpointError,
    CheckpointInfo,
    TruncatedCheckpointError,
    WrongCheckpointError,
    describe,
    match_architecture,
    read_header,
)
from .files import ModelFile, Precision, Size

logger = logging.getLogger(__name__)

_REFETCH = (
    "The file is damaged: fetch it again (--verify re-hashes the files there and replaces what differs):"
)

#: where download_models.sh puts files when given no --models-dir (beside the script)
SCRIPT_MODELS_DIR = Path(__file__).resolve().parents[1] / "models"


class MissingModelFileError(FileNotFoundError):
    """Model files are not in the models folder; the message holds the command that fetches them."""


def is_present(models_dir: Path, file: ModelFile) -> bool:
    """The file is there (a folder entry: the folder exists and is not empty).

    Args:
        models_dir: the models folder.
        file: the registry entry.

    Returns:
        True if present; its content is not read.
    """
    path = models_dir / file.path
    if file.folder:
        return path.is_dir() and any(path.iterdir())
    return path.is_file()


def choose_precision_file(
    models_dir: Path, candidates: dict[Precision, ModelFile], dtype: torch.dtype
) -> ModelFile:
    """The file form matching ``dtype`` if present, else the other form (cast on load). When neither
    is there, the bf16 form: the download script's default, and half the download.

    Args:
        models_dir: the models folder.
        candidates: the two forms of one file, by precision ("bf16", "fp32"), e.g.
            ``files.TEXT_ENCODER``.
        dtype: the dtype the model will run in: torch.float32 wants the fp32 form, any other the bf16.

    Returns:
        The registry entry to read (or, when neither form is there, to name in the error).
    """
    wanted: Precision = "fp32" if dtype == torch.float32 else "bf16"
    other: Precision = "bf16" if wanted == "fp32" else "fp32"
    for precision in (wanted, other):
        if is_present(models_dir, candidates[precision]):
            return candidates[precision]
    return candidates["bf16"]


def size_present(models_dir: Path, stage: dict[Size, dict[Precision, ModelFile]]) -> Size | None:
    """Which size of a stage the folder already holds, to suggest a variant word that keeps it.

    Args:
        models_dir: the models folder.
        stage: ``files.STAGE_B`` or ``files.STAGE_C``.

    Returns:
        "big" or "lite" (the first found, big first), or None if neither is there.
    """
    for size, by_precision in stage.items():
        if any(is_present(models_dir, f) for f in by_precision.values()):
            return size
    return None


def fetch_command(
    models_dir: Path, needed: list[ModelFile], stage_b: Size | None = None, stage_c: Size | None = None
) -> str:
    """``files.download_command`` for this models folder: ``--models-dir`` unless it is the script's
    default, as an absolute path (the command runs in the project folder, not in notebooks/).

    Args:
        models_dir: the models folder.
        needed: the files to fetch.
        stage_b, stage_c: the sizes the caller uses, as for :func:`cascade_helpers.files.download_command`.

    Returns:
        The ``bash download_models.sh ...`` line.
    """
    command = files.download_command(needed, stage_b=stage_b, stage_c=stage_c)
    folder = models_dir.resolve()
    return command if folder == SCRIPT_MODELS_DIR else f"{command} --models-dir {shlex.quote(str(folder))}"


def check_present(
    models_dir: Path, needed: list[ModelFile], stage_b: Size | None = None, stage_c: Size | None = None
) -> None:
    """Raise one error naming every missing file and the command that fetches them all.

    Args:
        models_dir, needed, stage_b, stage_c: as for :func:`fetch_command`.

    Raises:
        MissingModelFileError: files are missing; the message lists them with the command.
        NotADirectoryError: ``models_dir`` is a file.
    """
    if models_dir.exists() and not models_dir.is_dir():
        raise NotADirectoryError(
            f"{models_dir} is a file, not a models folder: pass the folder download_models.sh filled "
            f"(its --models-dir), e.g. {SCRIPT_MODELS_DIR}"
        )
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
    """Header checks: complete, the right model, the right size. Tiny test weights fit any size slot.

    Args:
        path: the safetensors file.
        kind: the model its slot needs (a :data:`cascade_helpers.checkpoints.Kind`, e.g. "stage_c").
        size: the architecture asked for, "big" or "lite"; None checks only the kind (Stage A's
            architecture is matched even then).
        fetch_command: the command that fetches the file again, for the messages.

    Returns:
        The header, and the architecture found ("big", "lite", "tiny"; None when ``size`` is None
        and ``kind`` is not "stage_a").

    Raises:
        TruncatedCheckpointError: the file is cut short (an interrupted download).
        WrongCheckpointError: another model, unknown shapes, or another size than ``size``.
        CheckpointError: not a safetensors file.
    """
    try:
        info = read_header(path)
    except TruncatedCheckpointError as error:
        raise TruncatedCheckpointError(
            f"{error}.\nRe-run the download, it resumes:\n  {fetch_command}"
        ) from None
    except CheckpointError as error:
        raise CheckpointError(f"{error}.\n{_REFETCH}\n  {fetch_command} --verify") from None
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


# --- every other file a loader reads -----------------------------------------------------------------

#: what each single-file weight of the registry must hold, by its path (the UNets and Stage A are
#: checked with their architecture by the loaders themselves)
_WEIGHT_KINDS: dict[str, str] = {
    files.EFFNET.path: "effnet",
    files.PREVIEWER.path: "previewer",
    **{f.path: "text_encoder" for f in files.TEXT_ENCODER.values()},
    **{f.path: "image_encoder" for f in files.IMAGE_ENCODER.values()},
}
#: the keys our loaders read from a JSON file (beyond it being a JSON object)
_JSON_KEYS: dict[str, tuple[str, ...]] = {
    files.FEATURE_EXTRACTOR.path: ("image_mean", "image_std"),
    files.TEXT_ENCODER_CONFIG.path: ("hidden_size", "vocab_size"),
    files.IMAGE_ENCODER_CONFIG.path: ("hidden_size", "image_size"),
}
#: a CLIP tokenizer folder needs its vocabulary and merges (or the single tokenizer.json)
_TOKENIZER_NEEDS = (("vocab.json", "merges.txt"), ("tokenizer.json",))


def _damaged(path: Path, what: str, command: str) -> CheckpointError:
    return CheckpointError(f"{path} {what}.\n{_REFETCH}\n  {command} --verify")


def _check_text(path: Path, command: str, keys: tuple[str, ...] = ()) -> None:
    """A text file of a models folder: UTF-8, not empty, and (``.json``) a JSON object with ``keys``."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _damaged(path, "is not UTF-8 text", command) from None
    if not text.strip() or "\0" in text:
        raise _damaged(
            path, "is empty" if not text.strip() else "holds NUL bytes, which no text file has", command
        )
    if path.name == "merges.txt":  # BPE merges: an optional "#version" line, then pairs
        lines = [line for line in text.splitlines() if line and not line.startswith("#version")]
        bad = next((i for i, line in enumerate(lines) if len(line.split(" ")) != 2), None)
        if bad is not None:
            raise _damaged(path, f"has a line that is not a pair of tokens: {lines[bad][:40]!r}", command)
    if path.suffix != ".json":
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise _damaged(path, f"is not valid JSON ({error}; cut short?)", command) from None
    if not isinstance(value, dict):
        raise _damaged(path, f"holds a JSON {type(value).__name__}, not an object", command)
    absent = [key for key in keys if key not in value]
    if absent:
        raise _damaged(path, f"lacks {', '.join(map(repr, absent))}", command)


def check_files(models_dir: Path, needed: list[ModelFile]) -> None:
    """Check that every file in ``needed`` (already known present) can be read and holds what its
    slot needs, so a half-written, damaged or misplaced file is named with the command that fetches
    it again instead of failing inside safetensors, json or transformers: weights by their header
    (complete, the right model), JSON files by parsing them (and the keys the loaders read),
    folders file by file. Stage B, Stage C and Stage A are checked by the loaders with their size
    (:func:`inspect_file`).

    Args:
        models_dir: the models folder.
        needed: the registry entries the loader will read.

    Raises:
        CheckpointError: a file is damaged or holds another model (subclasses
            :class:`~cascade_helpers.checkpoints.TruncatedCheckpointError`, ``WrongCheckpointError``),
            named with the command that fetches it again.
    """
    for file in needed:
        path = models_dir / file.path
        command = fetch_command(models_dir, [file])
        if file.folder:
            names = {p.name for p in path.iterdir()}
            if not any(all(n in names for n in group) for group in _TOKENIZER_NEEDS):
                raise _damaged(
                    path, f"lacks {' and '.join(_TOKENIZER_NEEDS[0])} (it holds {sorted(names)})", command
                )
            for entry in sorted(path.iterdir()):
                if entry.suffix in (".json", ".txt"):
                    _check_text(entry, command)
        elif file.path in _WEIGHT_KINDS:
            inspect_file(path, _WEIGHT_KINDS[file.path], None, command)
        elif path.suffix == ".json":
            _check_text(path, command, _JSON_KEYS.get(file.path, ()))
