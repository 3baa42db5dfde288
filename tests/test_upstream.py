"""diffusers still provides the Stable Cascade classes where we import them from.

If this fails after a diffusers upgrade: upstream moved or dropped a class (the Stable Cascade code
is deprecated there). Pin diffusers to the tested range in pyproject.toml, or update
cascade_helpers/upstream.py to the new location.
"""

from __future__ import annotations

import importlib

import pytest

from cascade_helpers import upstream


@pytest.mark.parametrize("name,module", sorted(upstream._UPSTREAM_LOCATIONS.items()))
def test_diffusers_still_ships(name, module):
    found = getattr(importlib.import_module(module), name, None)
    assert found is not None, (
        f"diffusers no longer has {name} in {module}: Stable Cascade moved upstream. "
        "Pin diffusers (pyproject.toml) or update cascade_helpers/upstream.py."
    )
    assert (
        getattr(upstream, name, None) or getattr(upstream, f"_{name}") is found
    )  # private: package use only


def test_a_moved_class_gives_a_message_that_says_what_to_do(monkeypatch):
    monkeypatch.setitem(upstream._UPSTREAM_LOCATIONS, "PaellaVQModel", "diffusers.pipelines.wuerstchen_gone")
    with pytest.raises(ImportError, match=r"PaellaVQModel.*pyproject\.toml"):
        upstream._load("PaellaVQModel")
