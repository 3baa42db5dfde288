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
