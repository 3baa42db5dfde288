"""environment.yml installs what pyproject.toml declares, with the same ranges."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

# the standard library reads TOML from Python 3.11; the package supports 3.10 (pyproject.toml)
tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11 or later")

ROOT = Path(__file__).parents[1]


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    listed = {line for line in pip_section if not line.startswith("-e")}
    assert listed == declared, (
        f"only in environment.yml: {listed - declared}; only in pyproject.toml: {declared - listed}"
    )
    assert "-e .[dev]" in pip_section, "environment.yml must install the package itself"
