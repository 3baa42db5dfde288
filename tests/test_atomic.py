"""Writes through a temporary name (cascade_helpers.atomic): all or nothing under the final name, and
file names claimed exclusively so that concurrent savers never overwrite each other."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import PIL.Image
import pytest
import torch
from safetensors import safe_open

from cascade_helpers import atomic


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_finished_write_takes_the_final_name(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    atomic.write_text(target, "new")
    assert target.read_text() == "new" and not _leftovers(target.parent)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old" and not _leftovers(tmp_path)


def test_a_folder_replaces_the_old_folder_whole(tmp_path):
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with atomic.atomic_path(target) as temporary:
        temporary.mkdir()
        (temporary / "new.bin").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_safetensors_round_trip_with_metadata(tmp_path):
    tensor = torch.arange(6.0).reshape(2, 3).t()  # not contiguous: the writer makes it so
    path = atomic.save_safetensors(tmp_path / "x.safetensors", {"x": tensor}, {"source": "test"})
    with safe_open(str(path), framework="pt") as f:
        assert torch.equal(f.get_tensor("x"), tensor) and f.metadata() == {"source": "test"}


def test_a_name_is_claimed_once(tmp_path):
    assert atomic.claim_name(tmp_path / "a.png")
    assert not atomic.claim_name(tmp_path / "a.png")


def _save_many(folder: str, count: int, start) -> None:
    from cascade_helpers.display import save_generation
    from cascade_helpers.generation import Generation

    picture = PIL.Image.new("RGB", (8, 8), "red")
    generation = Generation([picture], torch.zeros(1), torch.zeros(1), {"prompt": "p", "seed": 1})
    start.wait()  # both processes save at the same time
    for _ in range(count):
        save_generation(generation, folder)


def test_two_processes_saving_into_one_folder_keep_every_picture(tmp_path):
    """Each saver picks the next free run number; without the exclusive claim two processes pick the
    same number and overwrite each other's files."""
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    workers = [context.Process(target=_save_many, args=(str(tmp_path), 30, start)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    saved = sorted(tmp_path.glob("cascade-*.png"))
    assert len(saved) == 60
    assert all(PIL.Image.open(p).size == (8, 8) for p in saved)  # every file complete
