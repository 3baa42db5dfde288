"""Writing through cascade_helpers.atomic: a writer killed mid-write leaves the previous complete file
under the final name, never half a file.

Each test runs the writer in a child process, kills it while the new file is half written (SIGKILL
after a handshake, or the kernel's SIGXFSZ in the middle of safetensors' own write), then reads the
final name back.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cascade_helpers.atomic import _atomic_path, _claim_name, _save_safetensors, _write_json, _write_text

ROOT = Path(__file__).parents[1]
MIB = 1024 * 1024


def _child(code: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _temporaries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def test_sigkill_halfway_through_atomic_path_keeps_the_previous_file(tmp_path):
    target = tmp_path / "lora.safetensors"
    previous = os.urandom(3 * MIB)
    target.write_bytes(previous)
    child = _child(
        f"""
        import sys
        from cascade_helpers.atomic import _atomic_path
        with _atomic_path({str(target)!r}) as temporary:
            with open(temporary, "wb") as out:
                for chunk in range(32):
                    out.write(bytes([chunk]) * {MIB})
                    out.flush()
                    if chunk == 15:
                        print("half", flush=True)
                        sys.stdin.read()  # wait here, half written, until killed
        """
    )
    assert child.stdout.readline().strip() == "half"
    (temporary,) = _temporaries(tmp_path)
    assert temporary.stat().st_size == 16 * MIB  # the kill lands in the middle of the new file
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert target.read_bytes() == previous


def test_sigkill_while_save_safetensors_writes_keeps_the_previous_file(tmp_path):
    """safetensors writes the file itself (in Rust, through its own temporary file): the child saves
    a 64 MiB file again and again, and is killed the moment a temporary file shows up beside the
    final name; the kill counts when that temporary is still there after it (it landed before the
    rename). The final name must hold the last complete version, whole."""
    target = tmp_path / "lora.safetensors"
    child = _child(
        f"""
        import torch
        from cascade_helpers.atomic import _save_safetensors
        version = 0
        while True:
            version += 1
            _save_safetensors({str(target)!r}, {{"weight": torch.full((16 * {MIB},), float(version))}})
            print(version, flush=True)
        """
    )
    try:
        assert child.stdout.readline().strip() == "1"  # a first complete version exists
        caught = None
        for _ in range(2_000_000):
            if hidden := [e.name for e in os.scandir(tmp_path) if e.name.startswith(".")]:
                child.send_signal(signal.SIGKILL)
                caught = hidden
                break
        assert caught, "the writer never showed a temporary file"
        out, _ = child.communicate(timeout=30)
    finally:
        child.kill()
    assert child.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    if not left:
        pytest.skip("the kill landed after the rename this time")  # rare: the whole write took no time
    versions = [1, *[int(line) for line in out.split()]]
    weight = load_file(target)["weight"]  # complete: safetensors reads every byte it announces
    assert weight.shape == (16 * MIB,) and weight.min() == weight.max() == versions[-1]


def test_an_error_mid_write_removes_the_temporary_and_keeps_the_file(tmp_path):
    target = tmp_path / "settings.json"
    _write_json(target, {"version": 1})
    with pytest.raises(RuntimeError, match="disk gone"), _atomic_path(target) as temporary:
        temporary.write_text("{half")
        raise RuntimeError("disk gone")
    assert target.read_text() == '{\n  "version": 1\n}\n' and _temporaries(tmp_path) == []


def test_a_folder_is_replaced_whole(tmp_path):
    target = tmp_path / "checkpoint"
    with _atomic_path(target) as temporary:
        temporary.mkdir()
        (temporary / "a.txt").write_text("old")
    with _atomic_path(target) as temporary:
        temporary.mkdir()
        (temporary / "b.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p for p in tmp_path.iterdir() if p.name != "checkpoint"] == []


def test_claim_name_gives_a_name_once(tmp_path):
    assert _claim_name(tmp_path / "x.png") and not _claim_name(tmp_path / "x.png")
    _write_text(tmp_path / "x.png", "filled")
    assert (tmp_path / "x.png").read_text() == "filled"


def test_a_finished_write_takes_the_final_name_in_a_new_folder(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    _write_text(target, "new")
    assert target.read_text() == "new" and _temporaries(target.parent) == []


def test_safetensors_round_trip_with_metadata(tmp_path):
    tensor = torch.arange(6.0).reshape(2, 3).t()  # not contiguous: the writer makes it so
    path = _save_safetensors(tmp_path / "x.safetensors", {"x": tensor}, {"source": "test"})
    with safe_open(str(path), framework="pt") as f:
        assert torch.equal(f.get_tensor("x"), tensor) and f.metadata() == {"source": "test"}


def test_a_failed_folder_swap_gives_the_old_folder_its_name_back(tmp_path, monkeypatch):
    """The old folder is moved aside before the new one takes its name; when that second rename fails,
    the old one must come back, not stay hidden under a temporary name."""
    import cascade_helpers.atomic as atomic

    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "old.bin").write_text("old")
    real_replace, calls = os.replace, []

    def replace_failing_second(source, destination):
        calls.append(source)
        if len(calls) == 2:
            raise OSError("disk gone")
        real_replace(source, destination)

    monkeypatch.setattr(atomic.os, "replace", replace_failing_second)
    with pytest.raises(OSError, match="disk gone"), _atomic_path(target) as temporary:
        temporary.mkdir()
        (temporary / "new.bin").write_text("new")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]
    assert (target / "old.bin").read_text() == "old"
