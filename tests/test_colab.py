"""Colab as Colab runs it (issue 17): every notebook's Setup and download cells executed in a kernel that
looks like Colab's, twice, and the one repository URL everything names.

The simulation: a stand-in ``google.colab`` package (``userdata`` with an ``HF_TOKEN`` secret) on the
kernel's path, imported before the first cell as Colab does; a temporary HOME whose git config sends the
project URL to this checkout (``url.<checkout>.insteadOf``), so ``!git clone`` clones the committed state
here; the fake hub of the download tests, which answers only with the secret as token. ``%pip`` is
replaced by a recorder: the simulation installs nothing, and the recorded line is then run for real by
pip with ``--dry-run --no-index --no-build-isolation`` in the clone, where every dependency is installed,
to show that it would install the package and nothing else (never a second torch).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from test_download import CONTROLNETS, ESSENTIAL, assert_fetched

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11 or later")

ROOT = Path(__file__).parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
REPOSITORY = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
OWNER_NAME = REPOSITORY.removeprefix("https://github.com/")
SECRET = "hf_colab_secret_never_printed"

TOKENIZER = {"tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json"}
TOKENIZER |= {"tokenizer/vocab.json"}
TEXT = {"text_encoder/config.json", "text_encoder/model.bf16.safetensors"} | TOKENIZER


def reads(notebook: str, stage_c: str, stage_b: str) -> set[str]:
    """What a notebook reads at these sizes, written out from its load calls (not from its cells)."""
    stage_b_file = f"stage_b{'_lite' * (stage_b == 'lite')}_bf16.safetensors"
    stages = {f"stage_c{'_lite' * (stage_c == 'lite')}_bf16.safetensors", stage_b_file}
    decoding = {"stage_a.safetensors", "effnet_encoder.safetensors"}
    return {
        "text_to_image": ESSENTIAL["bfloat16"] | stages,
        "lora": ESSENTIAL["bfloat16"] | stages | {"lora_fernando_10k.safetensors"},
        "controlnet": TEXT | stages | CONTROLNETS | decoding | {"previewer.safetensors"},
        "reconstruct_images": TEXT | {stage_b_file} | decoding,
    }[notebook]


USERDATA = f'''"""Colab's secrets API as the notebooks use it (google.colab.userdata)."""


class SecretNotFoundError(Exception):
    """No secret of that name."""


class NotebookAccessError(Exception):
    """The secret exists but is not shared with this notebook."""


def get(key):
    """The secret's value, as Colab's Secrets panel gives it."""
    if key != "HF_TOKEN":
        raise SecretNotFoundError(key)
    return {SECRET!r}
'''

BOOTSTRAP = """\
import google.colab  # Colab's kernel has it loaded before the first cell

def _pip(line):
    '''%pip: recorded, nothing installed (a test must not reach the network)'''
    with open({calls!r}, "a") as calls:
        calls.write(line + "\\n")

get_ipython().register_magic_function(_pip, "line", "pip")
"""
PROBE = """\
import json
stages = [globals().get("STAGE_C", "big"), globals().get("STAGE_B", "big")]  # "auto" resolved by the download cell
print(json.dumps({"cwd": os.getcwd(), "models": str(MODELS_DIR.resolve()), "token": "HF_TOKEN" in os.environ,
                  "stages": stages}))
"""


def code_cells(notebook: Path) -> list[str]:
    """Setup (the first code cell), the imports, parameters (tagged) and download (the cell after it)."""
    cells = [c for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code"]
    parameters = next(i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))
    return [c.source for c in cells[: parameters + 2]]


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``folder`` with its size and modification time: what a second run must not change."""
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def probed(cell) -> dict:
    """The probe's JSON line (a progress bar's late output may share its stream)."""
    text = "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stdout")
    return json.loads(next(line for line in reversed(text.splitlines()) if line.startswith("{")))


def outputs(cells: list) -> str:
    """All a user sees of the cells: streams, results, errors."""
    return json.dumps([cell.outputs for cell in cells])


@pytest.fixture
def colab(tmp_path, hub):
    """A Colab-like kernel environment: (content folder, kernel env, pip record) around the fake hub."""
    if not (ROOT / ".git").exists():
        pytest.skip("the simulated clone needs this checkout to be a git repository")
    home, stub, content = tmp_path / "home", tmp_path / "stub" / "google" / "colab", tmp_path / "content"
    for folder in (home, stub, content):
        folder.mkdir(parents=True)
    git_config = ["git", "config", "--file", str(home / ".gitconfig")]
    subprocess.run([*git_config, f"url.file://{ROOT}.insteadOf", REPOSITORY], check=True)
    (stub / "__init__.py").write_text('"""A stand-in for Colab\'s package (tests/test_colab.py)."""\n')
    (stub / "userdata.py").write_text(USERDATA)
    hub.token = SECRET  # the Hub answers 401 unless the secret is sent
    unwanted = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k not in unwanted and not k.startswith("CASCADE_")}
    env.update(HOME=str(home), PYTHONPATH=str(stub.parents[1]), MPLBACKEND="Agg")
    return content, env, tmp_path / "pip-calls.txt"


def kernel(content: Path, env: dict[str, str], pip_calls: Path, *runs: list[str]):
    """Run each list of sources in one new kernel started in ``content`` (Colab starts in /content),
    after the bootstrap; yields the executed cells of each run as it ends, so the caller can look at the
    files between runs."""
    from nbclient import NotebookClient

    cells = [nbformat.v4.new_code_cell(BOOTSTRAP.format(calls=str(pip_calls)))]
    cells += [nbformat.v4.new_code_cell(source) for run in runs for source in run]
    client = NotebookClient(
        nbformat.v4.new_notebook(cells=cells),
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(content)}},
    )
    with client.setup_kernel(env=env):
        client.execute_cell(cells[0], 0)
        start = 1
        for run in runs:
            for index in range(start, start + len(run)):
                client.execute_cell(cells[index], index)
            yield cells[start : start + len(run)]
            start += len(run)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_setup_and_download_cells_in_a_simulated_colab(colab, hub, notebook):
    content, env, pip_calls = colab
    cells = [*code_cells(notebook), PROBE]
    project = content / OWNER_NAME.split("/")[1]
    runs = kernel(content, env, pip_calls, cells, cells)  # twice in the same kernel
    first = next(runs)
    after_first, pips = tree(content), pip_calls.read_text().splitlines()
    hub.seen.clear()
    second = next(runs)
    next(runs, None)  # the kernel shuts down

    assert probed(first[-1]) == probed(second[-1])
    stage_c, stage_b = probed(first[-1]).pop("stages")
    assert probed(first[-1]) == {
        "cwd": str(project),
        "models": str(project / "models"),
        "token": True,
        "stages": [stage_c, stage_b],
    }
    assert {stage_c, stage_b} <= {"big", "lite"}  # "auto" became the planner's choice
    assert (project / "download_models.sh").is_file()
    assert not (project / project.name).exists()  # no clone inside the clone
    assert_fetched(hub, project / "models", reads(notebook.stem, stage_c, stage_b))
    assert tree(content) == after_first and hub.fetched_paths() == []  # the second run changed nothing
    assert SECRET not in outputs(first + second)
    assert len(pips) == 1 and pip_calls.read_text().splitlines() == pips  # installed once, not again
    check_pip_line(pips[0], project)


def test_after_a_runtime_restart_setup_reuses_the_clone(colab):
    """A restarted kernel starts in /content again, where the clone already is: no second clone."""
    content, env, pip_calls = colab
    setup, *imports_and_parameters, _ = code_cells(NOTEBOOKS[0])
    project = content / OWNER_NAME.split("/")[1]
    for _ in kernel(content, env, pip_calls, [setup]):
        (project / "marker").write_text("a file of the first session")
    (cells,) = kernel(content, env, pip_calls, [setup, *imports_and_parameters, PROBE])
    assert probed(cells[-1])["cwd"] == str(project) and (project / "marker").exists()
    assert not (project / project.name).exists() and "fatal" not in outputs(cells)  # git was not asked again


def check_pip_line(line: str, project: Path) -> None:
    """The Setup cell's pip line, run for real in dry-run mode where every dependency is there already:
    pip would install the package alone and keep torch (the constraint pins the installed one: with
    ``--no-index`` a pin pip cannot meet from what is installed fails the run)."""
    arguments = line.split()
    constraint = Path(arguments[arguments.index("-c") + 1])
    assert constraint.read_text().startswith("torch==")
    report = project.parent / "pip-report.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            *arguments,
            "--dry-run",
            "--no-index",
            "--no-build-isolation",
            "--report",
            str(report),
        ],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "deprecated" not in result.stdout + result.stderr  # setuptools' licence-table warning is gone
    installs = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    assert installs == ["cascade-helpers"]


# --- the one repository URL -----------------------------------------------------------------------------


def test_the_repository_url_is_named_once_and_everything_uses_it():
    """pyproject's [project.urls] names the repository; badges, clone lines and the docs follow it."""
    colab = f"https://colab.research.google.com/github/{OWNER_NAME}/blob/main/notebooks/"
    for notebook in NOTEBOOKS:
        cells = nbformat.read(notebook, as_version=4).cells
        assert f"]({colab}{notebook.name})" in cells[0].source, f"{notebook.name}: the badge"
        setup = code_cells(notebook)[0]
        assert (
            f"!git clone -q --depth 1 {REPOSITORY}\n" in setup
            and f"%cd {REPOSITORY.rsplit('/')[-1]}\n" in setup
        )
    contributing, readme = (ROOT / "CONTRIBUTING.md").read_text(), (ROOT / "README.md").read_text()
    assert f"{colab}<name>.ipynb" in contributing and f"!git clone -q --depth 1 {REPOSITORY}" in contributing
    assert f"{colab}text_to_image.ipynb" in readme and f"git clone {REPOSITORY}" in readme
    texts = [
        contributing,
        readme,
        *(p.read_text() for p in NOTEBOOKS),
        *(p.read_text() for p in ROOT.glob("tests/*.py")),
    ]
    spellings = {
        m for text in texts for m in re.findall(r"github(?:\.com)?/([\w.-]+/stable-cascade-notebooks)", text)
    }
    assert spellings <= {OWNER_NAME}, f"other spellings of the repository: {spellings - {OWNER_NAME}}"


# --- README's Colab figures --------------------------------------------------------------------------


def colab_rows() -> list[str]:
    """The README's Colab table, computed from the registry's published sizes: download (essential and
    the variant, bfloat16 files), its minutes at 50 MB/s, every model on the GPU at 2 and 4 bytes per
    weight, and what waits in RAM under model offload (all but Stage A, EfficientNet and previewer)."""
    from cascade_helpers import files

    small = files._FILES["stage_a"].size + files._FILES["effnet"].size + files._FILES["previewer"].size
    rows = []
    for variant, (stage_b, stage_c) in files._VARIANTS.items():
        big = {
            p: [
                files.STAGE_C[stage_c][p],
                files.STAGE_B[stage_b][p],
                files._WEIGHTS["text_encoder"][p],
                files._WEIGHTS["image_encoder"][p],
            ]
            for p in ("bf16", "fp32")
        }
        fetched = files._essential_files("bf16") + [
            files.STAGE_B[stage_b]["bf16"],
            files.STAGE_C[stage_c]["bf16"],
        ]
        download = sum(f.size for f in fetched)
        on_gpu = {p: small + sum(f.size for f in big[p]) for p in big}
        in_ram = sum(f.size for f in big["bf16"])
        cells = [f"{download / 1e9:.2f} GB", f"{download / 50e6 / 60:.1f} min"]
        cells += [
            f"{on_gpu['bf16'] / 1e9:.2f} GB",
            f"{on_gpu['fp32'] / 1e9:.2f} GB",
            f"{in_ram / 1e9:.2f} GB",
        ]
        rows.append(f"| `{variant}` | " + " | ".join(cells) + " |")
    return rows


def test_readme_colab_figures_are_the_registry_s():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Colab") : readme.index("## ", readme.index("## Colab") + 3)]
    table = [line for line in section.splitlines() if line.startswith("| `")]
    assert table == colab_rows()
    for claim in ("12.48 of 15 GB", "(11.09 GB)", "12.31 GB leaves 0.4 GB", "5.46 GB fits", "(24.82 GB)"):
        assert claim in section, claim
