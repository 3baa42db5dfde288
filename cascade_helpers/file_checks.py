"""Checks on a models folder before anything is read: which files are there, which form to use,
whether each is complete and holds the right model.

Every loader runs these first, so a missing, half-downloaded or misplaced file is named with the
``bash download_models.sh ...`` line that fetches it (built only when a check fails: ``fetch``),
instead of failing deep inside a library.
"""

from __future__ import annotations

import functools
import json
import logging
import shlex
from collections.abc import Callable
from pathlib import Path

import torch

from . import files
from .checkpoints import (
    _KIND_NAMES,
    CheckpointError,
    _Architecture,
    _CheckpointInfo,
    _describe,
    _match_architecture,
    _read_header,
    _TruncatedCheckpointError,
    _WrongCheckpointError,
)
from .files import ModelFile, Size, _Precision

_logger = logging.getLogger(__name__)

_REFETCH = (
    "The file is damaged: fetch it again (--verify re-hashes the files there and replaces what differs):"
)

#: where download_models.sh puts files without --models-dir
_SCRIPT_MODELS_DIR = Path(__file__).resolve().parents[1] / "models"


class MissingModelFileError(FileNotFoundError):
    """Model files are not in the models folder; the message holds the command that fetches them."""


def _is_present(models_dir: Path, file: ModelFile) -> bool:
    """A folder entry counts once it holds something; nothing is read."""
    path = models_dir / file.path
    return path.is_dir() and any(path.iterdir()) if file.folder else path.is_file()


def _choose_precision_file(
    models_dir: Path, candidates: dict[_Precision, ModelFile], dtype: torch.dtype
) -> ModelFile:
    """The form of ``dtype`` if present, else the other (cast on load); with neither there, bf16: the
    download script's default, and half the download."""
    order: tuple[_Precision, ...] = ("fp32", "bf16") if dtype == torch.float32 else ("bf16", "fp32")
    return next((candidates[p] for p in order if _is_present(models_dir, candidates[p])), candidates["bf16"])


def _size_present(models_dir: Path, stage: dict[Size, dict[_Precision, ModelFile]]) -> Size | None:
    """The size of a stage the folder holds (big first), so a command for the other keeps it."""
    for size, by_precision in stage.items():
        if any(_is_present(models_dir, f) for f in by_precision.values()):
            return size
    return None


def _fetch_command(
    models_dir: Path, needed: list[ModelFile], stage_b: Size | None = None, stage_c: Size | None = None
) -> str:
    """``--models-dir`` absolute (the command runs in the project folder, not notebooks/), unless default."""
    command = files.download_command(needed, stage_b=stage_b, stage_c=stage_c)
    folder = models_dir.resolve()
    return command if folder == _SCRIPT_MODELS_DIR else f"{command} --models-dir {shlex.quote(str(folder))}"


def _check_present(
    models_dir: Path, needed: list[ModelFile], stage_b: Size | None = None, stage_c: Size | None = None
) -> None:
    """One error naming every missing file, and one command for them all (in the caller's stage sizes)."""
    if models_dir.exists() and not models_dir.is_dir():
        raise NotADirectoryError(
            f"{models_dir} is a file, not a models folder: pass the folder download_models.sh filled "
            f"(its --models-dir), e.g. {_SCRIPT_MODELS_DIR}"
        )
    missing = [f for f in needed if not _is_present(models_dir, f)]
    if not missing:
        return
    lines = "\n".join(
        f"  - {models_dir / f.path}  ({f.needed_by}, {files._human_size(f.size)})" for f in missing
    )
    raise MissingModelFileError(
        f"{len(missing)} model file(s) missing from {models_dir}/:\n{lines}\n"
        f"Fetch them with (in the project folder):\n  {_fetch_command(models_dir, missing, stage_b, stage_c)}"
        f"\n{files._LICENSE_NOTE}"
    )


def _read_checked(path: Path, fetch: Callable[[], str]) -> _CheckpointInfo:
    """The reader's error, completed with what to do and the command."""
    try:
        return _read_header(path)
    except _TruncatedCheckpointError as error:
        raise _TruncatedCheckpointError(f"{error}.\nRe-run the download, it resumes:\n  {fetch()}") from None
    except CheckpointError as error:
        raise CheckpointError(f"{error}.\n{_REFETCH}\n  {fetch()} --verify") from None


def _inspect_file(
    path: Path, kind: str, size: Size | None, fetch: Callable[[], str]
) -> tuple[_CheckpointInfo, _Architecture | None]:
    """Complete, the right model, the right architecture (``size`` None: the kind only, but Stage A's is
    matched). Tiny test weights fit any size slot."""
    info = _read_checked(path, fetch)
    expected = f"{_KIND_NAMES[kind]}" + (f" {size}" if size else "")
    if info.kind != kind:
        raise _WrongCheckpointError(
            f"{path} holds {_describe(info)}, but this slot needs a {expected} checkpoint. "
            f"Did files get renamed? Fetch the right one with:\n  {fetch()}"
        )
    if not size and kind != "stage_a":
        return info, None
    architecture = _match_architecture(info)
    if architecture is None:
        raise _WrongCheckpointError(
            f"{path} is a {_KIND_NAMES[kind]} checkpoint with shapes we do not know (fine-tuned with another "
            f"architecture, or damaged). Fetch the released one with:\n  {fetch()}"
        )
    if size and architecture not in (size, "tiny"):
        raise _WrongCheckpointError(
            f"{path} holds a {_KIND_NAMES[kind]} {architecture} checkpoint, but variant={size!r} was asked for. "
            f"Pass variant={architecture!r}, or fetch the {size} one with:\n  {fetch()}"
        )
    if architecture == "tiny":
        _logger.info("%s holds tiny random test weights: pictures will be noise", path)
    return info, architecture


#: what each single-file weight must hold, by path (the UNets and Stage A: by the loaders, with their size)
_WEIGHT_KINDS: dict[str, str] = {
    files._FILES["effnet"].path: "effnet",
    files._FILES["previewer"].path: "previewer",
    **{f.path: name for name, by_precision in files._WEIGHTS.items() for f in by_precision.values()},
}
#: the keys our loaders read from a JSON file (beyond it being a JSON object)
_JSON_KEYS: dict[str, tuple[str, ...]] = {
    files._FILES["feature_extractor"].path: ("image_mean", "image_std"),
    files._FILES["text_encoder_config"].path: ("hidden_size", "vocab_size"),
    files._FILES["image_encoder_config"].path: ("hidden_size", "image_size"),
}
#: a CLIP tokenizer folder needs its vocabulary and merges (or the single tokenizer.json)
_TOKENIZER_NEEDS = (("vocab.json", "merges.txt"), ("tokenizer.json",))


def _damaged(path: Path, what: str, fetch: Callable[[], str]) -> CheckpointError:
    """A damaged text file is fetched again with ``--verify``, which replaces what differs."""
    return CheckpointError(f"{path} {what}.\n{_REFETCH}\n  {fetch()} --verify")


def _text_problem(path: Path, text: str) -> str | None:
    """What makes a text file unusable (None: nothing), found before a tokenizer fails on it obscurely."""
    if not text.strip():
        return "is empty"
    if "\0" in text:
        return "holds NUL bytes, which no text file has"
    if path.name == "merges.txt":  # BPE merges: an optional "#version" line, then pairs
        lines = [line for line in text.splitlines() if line and not line.startswith("#version")]
        bad = next((line for line in lines if len(line.split(" ")) != 2), None)
        if bad is not None:
            return f"has a line that is not a pair of tokens: {bad[:40]!r}"
    return None


def _json_problem(text: str, keys: tuple[str, ...]) -> str | None:
    """What makes a JSON file unusable for the loaders (None: nothing)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return f"is not valid JSON ({error}; cut short?)"
    if not isinstance(value, dict):
        return f"holds a JSON {type(value).__name__}, not an object"
    absent = [key for key in keys if key not in value]
    return f"lacks {', '.join(map(repr, absent))}" if absent else None


def _check_text(path: Path, fetch: Callable[[], str], keys: tuple[str, ...] = ()) -> None:
    """A cut or overwritten text file is named here, not inside transformers."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _damaged(path, "is not UTF-8 text", fetch) from None
    problem = _text_problem(path, text) or (_json_problem(text, keys) if path.suffix == ".json" else None)
    if problem:
        raise _damaged(path, problem, fetch)


def _check_folder(path: Path, fetch: Callable[[], str]) -> None:
    """A tokenizer folder needs its vocabulary files, each readable text."""
    names = {p.name for p in path.iterdir()}
    if not any(all(n in names for n in group) for group in _TOKENIZER_NEEDS):
        raise _damaged(path, f"lacks {' and '.join(_TOKENIZER_NEEDS[0])} (it holds {sorted(names)})", fetch)
    for entry in sorted(path.iterdir()):
        if entry.suffix in (".json", ".txt"):
            _check_text(entry, fetch)


def _check_files(models_dir: Path, needed: list[ModelFile]) -> None:
    """A damaged or misplaced file (known present) is named with its command instead of failing inside
    safetensors, json or transformers."""
    for file in needed:
        path = models_dir / file.path
        fetch = functools.partial(_fetch_command, models_dir, [file])
        if file.folder:
            _check_folder(path, fetch)
        elif file.path in _WEIGHT_KINDS:
            _inspect_file(path, _WEIGHT_KINDS[file.path], None, fetch)
        elif path.suffix == ".json":
            _check_text(path, fetch, _JSON_KEYS.get(file.path, ()))
