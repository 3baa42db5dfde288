"""Test session set-up shared by the unit tests and the notebook runs (nbval).

The notebooks read their parameters from environment variables (real defaults for users). Here we
point them at a tiny random ``models/`` folder written afresh each session by the package itself, and
at few steps, so CI runs every notebook top to bottom in seconds, through the real loading code.
Notebook kernels inherit this process's environment.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

TINY_DIR = Path(__file__).parent / "outputs" / "ci_tiny_models"

# What CI gives every notebook (each notebook documents the variables it reads).
NOTEBOOK_ENV = {
    "CASCADE_MODELS_DIR": str(TINY_DIR),
    "CASCADE_OUTPUT_DIR": str(TINY_DIR.parent / "ci_notebook_outputs"),
    "CASCADE_PRIOR_STEPS": "3",
    "CASCADE_DECODER_STEPS": "2",
    "CASCADE_NUM_IMAGES": "2",
    "CASCADE_TRAIN_STEPS": "4",
    "CASCADE_TRAIN_RESOLUTION": "512",  # lora.ipynb: the smallest size validation pictures allow
    "CASCADE_STAGE_C": "big",  # not "auto": the same sizes on every machine (tests/test_colab.py runs "auto")
    "CASCADE_STAGE_B": "big",
    "HF_HUB_OFFLINE": "1",
    "MPLBACKEND": "Agg",
}


def _collecting_notebooks(config: pytest.Config) -> bool:
    """nbval is on and the run includes notebooks (no paths given means the testpaths, which do)."""
    nbval = config.getoption("--nbval", default=False) or config.getoption("--nbval-lax", default=False)
    paths = [str(Path(a.split("::")[0]).resolve()) for a in config.args]
    notebooks = str(Path(__file__).parent / "notebooks")
    return bool(nbval) and (
        not config.args or any(p.startswith(notebooks) or notebooks.startswith(p) for p in paths)
    )


def pytest_configure(config: pytest.Config) -> None:
    if _collecting_notebooks(config) and not os.environ.get("PYTEST_XDIST_WORKER"):
        from cascade_helpers.tiny import write_tiny_models

        # fresh every session: the writer may have changed, and a run left by an older version (a LoRA
        # checkpoint, saved pictures) must not decide what this one does
        shutil.rmtree(NOTEBOOK_ENV["CASCADE_OUTPUT_DIR"], ignore_errors=True)
        write_tiny_models(TINY_DIR, controlnets=True, lora=True, both_stage_b=True)
        os.environ.update(NOTEBOOK_ENV)
        # kernels import the checkout's cascade_helpers, installed or not
        root = str(Path(__file__).parent)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
