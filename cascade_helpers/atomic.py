"""Writing files so that a name never holds half a file: a temporary name first, then a rename.

A ``kill -9``, a full disk or an exception mid-save must not leave a truncated file under the final
name, nor replace a good file from an earlier run with a broken one. Every file the package writes goes
to a hidden temporary sibling first; ``os.replace`` (atomic on one file system) names it once complete.
:func:`_claim_name` creates a file that must not exist yet (``O_EXCL``), so two processes saving into one
folder never pick the same name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch


def _temporary_name(path: Path) -> Path:
    """Unique per call: two writers never share one."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def _atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write, renamed to ``path`` on success (a folder replaces one), else deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_name(path)
    try:
        yield temporary
        if temporary.is_dir() and path.is_dir():
            old = _temporary_name(path)  # a folder cannot be renamed over a non-empty one
            os.replace(path, old)
            try:
                os.replace(temporary, path)
            except BaseException:
                os.replace(old, path)  # the old folder takes its name back: nothing lost
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, path)
    finally:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def _atomic_files(folder: str | os.PathLike) -> Iterator[Path]:
    """For ``save_pretrained``: each file is renamed into ``folder``, keeping its other files (a bf16 and a
    float32 text encoder share ``text_encoder/``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_name(folder)
    temporary.mkdir()
    try:
        yield temporary
        for path in sorted(temporary.rglob("*")):
            if path.is_file():
                target = folder / path.relative_to(temporary)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _write_text(path: str | os.PathLike, text: str) -> Path:
    """``path.write_text(text)`` in UTF-8, atomically."""
    with _atomic_path(path) as temporary:
        temporary.write_bytes(text.encode("utf-8"))
    return Path(path)


def _write_json(path: str | os.PathLike, value) -> Path:
    """``value`` as indented JSON, atomically."""
    return _write_text(path, json.dumps(value, indent=2) + "\n")


def _save_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """``safetensors.torch.save_file``, atomically, from any tensors (it needs them contiguous on the CPU)."""
    from safetensors.torch import save_file

    prepared = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with _atomic_path(path) as temporary:
        save_file(prepared, str(temporary), metadata=metadata)
    return Path(path)


def _claim_name(path: str | os.PathLike) -> bool:
    """Owns the name (creating it empty) or returns False: two savers never pick the same one."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    os.close(fd)
    return True
