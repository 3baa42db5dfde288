"""Repository hygiene that CI enforces: ruff lint and format (notebooks included), notebooks stored
without outputs, opening with the project's template and a table of contents that matches their sections."""

from __future__ import annotations

import json
import re
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


def _nbstripout_args() -> list[str]:
    """The arguments pre-commit gives nbstripout: CI checks with exactly what contributors run."""
    import yaml

    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    hooks = [hook for repo in config["repos"] for hook in repo["hooks"] if hook["id"] == "nbstripout"]
    return hooks[0]["args"]


def test_notebooks_are_as_nbstripout_leaves_them():
    """Outputs, execution counts and the metadata nbstripout removes (widget state, timings): all gone."""
    nbstripout = shutil.which("nbstripout") or str(Path(sys.executable).parent / "nbstripout")
    result = subprocess.run(
        [nbstripout, "--verify", *_nbstripout_args(), *map(str, NOTEBOOKS)], capture_output=True, text=True
    )
    assert result.returncode == 0, (
        f"strip them: nbstripout {' '.join(_nbstripout_args())} notebooks/*.ipynb\n{result.stdout}"
    )


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_names_its_kernel(notebook):
    """JupyterLab and Colab start the kernel the notebook names; without one JupyterLab asks."""
    kernelspec = json.loads(notebook.read_text())["metadata"].get("kernelspec", {})
    assert kernelspec.get("name") == "python3", "restore metadata.kernelspec (a stripping tool removed it)"


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
    assert "colab.research.google.com/github/" in first, "the Colab badge (its URL: tests/test_colab.py)"
    code = [c for c in cells if c["cell_type"] == "code"]
    setup = "".join(code[0]["source"])
    assert 'if "google.colab" in sys.modules' in setup, "the first code cell is the Colab-only setup"
    for variable, folder in (("CASCADE_MODELS_DIR", "models"), ("CASCADE_OUTPUT_DIR", "outputs")):
        # Colab runs in the project folder, where download_models.sh puts models/ (not ../models)
        assert f'os.environ.setdefault("{variable}", "{folder}")' in setup
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one code cell is tagged `parameters`"
    assert "os.environ" in "".join(tagged[0]["source"]), "parameters come from environment variables"


def _anchor(heading: str) -> str:
    """The id JupyterLab gives a heading: its rendered text (no backticks), spaces as hyphens."""
    return heading.replace("`", "").strip().replace(" ", "-")


def _headings(cells: list[dict]) -> dict[str, int]:
    """Anchor → level of every ## and ### heading in the notebook's markdown cells."""
    found = {}
    for cell in cells:
        if cell["cell_type"] == "markdown":
            for line in "".join(cell["source"]).splitlines():
                if match := re.match(r"(#{2,3}) (.+)", line):
                    found[_anchor(match[2])] = len(match[1])
    return found


def test_anchors_are_what_jupyterlab_makes():
    assert _anchor("The official example LoRA, `[fernando]`") == "The-official-example-LoRA,-[fernando]"
    assert _headings(
        [{"cell_type": "markdown", "source": ["# Title\n", "## A b\n", "text\n", "### C `d`"]}]
    ) == {
        "A-b": 2,
        "C-d": 3,
    }


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_a_table_of_contents(notebook):
    cells = json.loads(notebook.read_text())["cells"]
    toc = "".join(cells[1]["source"])
    assert cells[1]["cell_type"] == "markdown" and toc.startswith("**Contents**"), (
        "the cell after the overview is the table of contents, starting with **Contents**"
    )
    headings = _headings(cells[2:])
    links = re.findall(r"\]\(#([^)]+)\)", toc)
    assert set(links) <= set(headings), (
        f"contents links that match no heading: {sorted(set(links) - set(headings))}"
    )
    missing = [anchor for anchor, level in headings.items() if level == 2 and anchor not in links]
    assert not missing, f"sections (##) missing from the table of contents: {missing}"
