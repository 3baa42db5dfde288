"""Hostile input to saving pictures: a prefix that is a path, an output folder that is a file, glob
characters in a prefix — and two processes saving into one folder at once, which must never
overwrite each other's PNGs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import PIL.Image
import pytest
import torch

from cascade_helpers.display import read_settings, save_generation
from cascade_helpers.generation import Generation

ROOT = Path(__file__).parents[1]


def _generation(n: int = 2, **settings) -> Generation:
    pictures = [PIL.Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(n)]
    return Generation(
        pictures,
        torch.zeros(n, 16, 1, 1),
        torch.zeros(n, 4, 2, 2),
        {"prompt": "a cat", "seed": 7, **settings},
    )


@pytest.mark.parametrize(
    "prefix", ["../escape", "sub/name", "..\\escape", "/tmp/abs", "", "..", ".", None, 3]
)
def test_a_prefix_must_be_a_name(tmp_path, prefix):
    out = tmp_path / "out"
    with pytest.raises(
        ValueError, match=rf"prefix={re.escape(repr(prefix))}: .*without path separators.*output_dir"
    ):
        save_generation(_generation(), out, prefix=prefix)
    assert not any(p.suffix == ".png" for p in tmp_path.rglob("*"))  # nothing written, inside or out


def test_an_output_folder_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(NotADirectoryError, match=f"output_dir='{tmp_path / 'out'}' is a file, not a folder"):
        save_generation(_generation(), tmp_path / "out")


def test_glob_characters_in_a_prefix_are_plain_characters(tmp_path):
    """'run[1]' read as a glob pattern found no earlier run, so the next number was always 1, which
    was always taken: save_generation looped for ever."""
    done: list[list[Path]] = []
    worker = threading.Thread(
        target=lambda: done.extend(
            save_generation(_generation(), tmp_path, prefix="run[1]*") for _ in range(3)
        ),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=30)
    assert len(done) == 3, "save_generation did not finish"
    assert [[p.name for p in run] for run in done] == [
        [f"run[1]*-{n:04d}-seed7-{i}.png" for i in range(2)] for n in (1, 2, 3)
    ]


def test_two_processes_saving_into_one_folder_keep_every_picture(tmp_path):
    """The issue saw 51-59 of 60 PNGs kept; with exclusive names every one must survive."""
    go = tmp_path / "go"
    code = textwrap.dedent(
        f"""
        import sys, time, pathlib, PIL.Image, torch
        from cascade_helpers.display import save_generation
        from cascade_helpers.generation import Generation
        writer = sys.argv[1]
        print("ready", flush=True)
        while not pathlib.Path({str(go)!r}).exists():
            time.sleep(0.001)
        for i in range(30):
            picture = PIL.Image.new("RGB", (16, 16), (i, 0, 0))
            g = Generation([picture], torch.zeros(1), torch.zeros(1), {{"writer": writer, "i": i, "seed": 0}})
            save_generation(g, {str(tmp_path / "out")!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writers = [
        subprocess.Popen([sys.executable, "-c", code, name], env=env, stdout=subprocess.PIPE, text=True)
        for name in ("a", "b")
    ]
    for writer in writers:
        assert writer.stdout.readline().strip() == "ready"
    go.touch()
    for writer in writers:
        assert writer.wait(timeout=120) == 0
    saved = sorted((tmp_path / "out").glob("*.png"))
    kept = {(read_settings(p)["writer"], read_settings(p)["i"]) for p in saved}
    assert len(saved) == 60 and kept == {(w, i) for w in "ab" for i in range(30)}


# --- a save that fails or is killed leaves no empty PNG (issue 21: data lost) -----------------------------


def test_a_picture_that_cannot_be_saved_leaves_no_file(tmp_path):
    """PNG has no CMYK: the second picture fails. Names used to be claimed as empty files first, so
    both final names stayed behind (one 0-byte); now nothing has a final name until all are written."""
    generation = _generation(2)
    generation.images[1] = PIL.Image.new("CMYK", (8, 8))
    with pytest.raises(OSError, match="CMYK"):
        save_generation(generation, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert [p.name for p in save_generation(_generation(2), tmp_path)] == [
        f"cascade-0001-seed7-{i}.png" for i in range(2)
    ]


def test_a_save_killed_midway_leaves_no_empty_png(tmp_path):
    """``kill -9`` while the second picture is written: no final name may hold an empty or partial
    PNG (the issue found 0-byte ones). The child signals from inside the write and then blocks, so
    the kill lands there, without timers."""
    code = textwrap.dedent(
        f"""
        import sys, PIL.Image, torch
        from cascade_helpers.display import save_generation
        from cascade_helpers.generation import Generation
        real_save, calls = PIL.Image.Image.save, []
        def save(self, fp, *args, **kwargs):
            calls.append(fp)
            if len(calls) == 2:
                with open(fp, "wb") as half:
                    half.write(b"\\x89PNG half")
                print("writing", flush=True)
                sys.stdin.read()  # blocks until killed
            return real_save(self, fp, *args, **kwargs)
        PIL.Image.Image.save = save
        pictures = [PIL.Image.new("RGB", (8, 8)) for _ in range(3)]
        save_generation(Generation(pictures, torch.zeros(3), torch.zeros(3), {{"seed": 1}}), {str(tmp_path)!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "writing"
    child.kill()
    child.wait(timeout=60)
    assert list(tmp_path.glob("*.png")) == [], "a final name holds an incomplete picture"


def test_without_hard_links_the_names_are_still_claimed_whole(tmp_path, monkeypatch):
    """File systems without hard links (FAT, some cloud drives): the name is claimed exclusively and
    the complete file replaces the claim; two runs still get two numbers."""

    def no_links(source, target):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    first, second = save_generation(_generation(2), tmp_path), save_generation(_generation(2), tmp_path)
    assert [p.name for p in first + second] == [
        f"cascade-{n:04d}-seed7-{i}.png" for n in (1, 2) for i in range(2)
    ]
    assert all(read_settings(p)["prompt"] == "a cat" for p in first + second)
    assert sorted(tmp_path.iterdir()) == sorted(first + second), "no temporary left behind"
