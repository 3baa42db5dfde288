"""Writing files so that a name never holds half a file: a temporary name first, then a rename.

A ``kill -9``, a full disk or an exception in the middle of a save must not leave a truncated file
under the final name, nor replace a good file from an earlier run with a broken one. Every file the
package writes goes through :func:`atomic_path` (or the helpers below that use it): the content goes
to a hidden temporary file in the same folder, and ``os.replace`` — atomic on one file system — gives
it its final name only once it is complete. On failure the temporary file is removed and the final
name keeps whatever it held before.

:func:`claim_name` is the other half of "never overwrites": it creates a file that must not exist
yet, atomically (``O_EXCL``), so two processes saving into one folder never pick the same name.
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
    """A hidden sibling of ``path``, unique per call (two writers never share one)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def _atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; write there. When the block ends without an error it
    is renamed to ``path`` (replacing any file there); otherwise it is deleted and ``path`` is left
    as it was. Works for files and for folders (a folder replaces an existing one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_name(path)
    try:
        yield temporary
        if temporary.is_dir() and path.is_dir():
            # a folder cannot be renamed over a non-empty one: move the old one aside first
            old = _temporary_name(path)
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
    """Yield a temporary folder beside ``folder`` for a library that writes several files itself
    (transformers' ``save_pretrained``). When the block ends without an error each file is renamed
    into ``folder``, replacing one of the same name and keeping the others (a bf16 and a float32
    text encoder share ``text_encoder/``): every file appears whole or not at all."""
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


def _write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """``path.write_bytes(data)``, atomically."""
    with _atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def _write_text(path: str | os.PathLike, text: str) -> Path:
    """``path.write_text(text)`` in UTF-8, atomically."""
    return _write_bytes(path, text.encode("utf-8"))


def _write_json(path: str | os.PathLike, value) -> Path:
    """``value`` as indented JSON, atomically."""
    return _write_text(path, json.dumps(value, indent=2) + "\n")


def _save_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """``safetensors.torch.save_file``, atomically; tensors are detached, moved to the CPU and made
    contiguous first (what the format needs)."""
    from safetensors.torch import save_file

    prepared = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with _atomic_path(path) as temporary:
        save_file(prepared, str(temporary), metadata=metadata)
    return Path(path)


def _claim_name(path: str | os.PathLike) -> bool:
    """Create ``path`` empty if no file has that name yet, atomically; False if one has. The caller
    then owns the name and fills it through :func:`atomic_path`."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    os.close(fd)
    return True
