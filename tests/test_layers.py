"""The package's layers run one way, and no module grows past the size a reader takes in at once.

Layers, lowest first (README's module map and CONTRIBUTING's layout table describe the same):
files/sizes/images/effnet/previewer → checkpoints/devices → models/file checks → loading →
conditioning/sampling → generation/controlnet/lora → training/reconstruction/display.
A module may import from its own layer or a lower one, never from a higher one: the sampling maths
does not pull in ControlNets, loading or generation.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "cascade_helpers"
MAX_LINES = 550

LAYERS: dict[str, int] = {
    **dict.fromkeys(["files", "sizes", "values", "atomic", "images", "effnet", "previewer", "upstream"], 0),
    **dict.fromkeys(["checkpoints", "devices", "memory", "download"], 1),
    **dict.fromkeys(["models", "file_checks", "float16", "float8"], 2),
    "loading": 3,
    **dict.fromkeys(["conditioning", "sampling", "request"], 4),
    **dict.fromkeys(["stages", "generation", "controlnet", "lora"], 5),
    **dict.fromkeys(["lora_training", "reconstruction", "quality", "display", "panel", "tiny"], 6),
}
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _concept(path: Path) -> str:
    """The top-level concept a file belongs to: ``controlnet/model.py`` → ``controlnet``."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_concepts(path: Path) -> set[str]:
    """The cascade_helpers concepts a file imports, at module level or inside functions."""
    tree = ast.parse(path.read_text())
    depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for cascade_helpers/x.py
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").startswith("cascade_helpers."):
                found.add(node.module.split(".")[1])
            elif node.level > depth:  # relative, leaving the file's own subpackage
                parts = (node.module or "").split(".")
                if parts[0]:
                    found.add(parts[0])
                else:  # from .. import x
                    found.update(alias.name for alias in node.names)
            elif node.level and depth:  # inside the same subpackage
                found.add(_concept(path))
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("cascade_helpers."))
    return found - {"__init__"}


def test_every_module_has_a_layer():
    unknown = {_concept(p) for p in MODULES} - set(LAYERS) - {"__init__"}
    assert not unknown, f"add {unknown} to LAYERS here and to the layout table in CONTRIBUTING.md"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_down_the_layers(path):
    concept = _concept(path)
    if concept == "__init__":
        return
    higher = {c for c in _imported_concepts(path) if LAYERS.get(c, -1) > LAYERS[concept]}
    assert not higher, f"{concept} (layer {LAYERS[concept]}) imports {higher} from a higher layer"


def test_sampling_knows_nothing_of_controlnets_loading_or_generation():
    imported = _imported_concepts(PACKAGE / "sampling.py")
    assert not imported & {"controlnet", "loading", "generation"}, imported


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_too_long_to_read(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{lines} lines: split it by concept (a subpackage where a concept has parts)"


def test_the_detector_sees_imports():
    """The checks above could pass by seeing nothing: the detector finds what generation imports."""
    assert {"sampling", "controlnet", "models", "sizes"} <= _imported_concepts(PACKAGE / "generation.py")
    assert "lora" in _imported_concepts(PACKAGE / "lora" / "load.py")  # same subpackage
    assert "files" in _imported_concepts(PACKAGE / "lora" / "load.py")
