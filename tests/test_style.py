"""Repository hygiene that CI enforces: ruff lint and format (notebooks included), notebooks stored
without outputs and opening with the project's template."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_is_clean(command):
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    result = subprocess.run(
        [ruff, *command, "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(notebook):
    cells = json.loads(notebook.read_text())["cells"]
    dirty = [
        i
        for i, c in enumerate(cells)
        if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))
    ]
    assert not dirty, f"cells {dirty} keep outputs: run `nbstripout --keep-id {notebook.relative_to(ROOT)}`"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_opens_with_the_template(notebook):
    cells = json.loads(notebook.read_text())["cells"]
    first = "".join(cells[0]["source"])
    assert cells[0]["cell_type"] == "markdown" and first.startswith("# "), "the first cell is the H1 title"
    assert (
        f"colab.research.google.com/github/cascade-notebooks/stable-cascade-notebooks/blob/main/notebooks/{notebook.name}"
        in first
    )
    code = [c for c in cells if c["cell_type"] == "code"]
    setup = "".join(code[0]["source"])
    assert 'if "google.colab" in sys.modules' in setup, "the first code cell is the Colab-only setup"
    for variable, folder in (("CASCADE_MODELS_DIR", "models"), ("CASCADE_OUTPUT_DIR", "outputs")):
        # Colab runs in the project folder, where download_models.sh puts models/ (not ../models)
        assert f'os.environ.setdefault("{variable}", "{folder}")' in setup
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one code cell is tagged `parameters`"
    assert "os.environ" in "".join(tagged[0]["source"]), "parameters come from environment variables"
