"""Models load from safetensors files only (``use_safetensors=True``), from a folder or from the Hub:
a pickled ``.bin`` is never read, even when it is all there is."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from tests.hub_cache import build_hub_cache, run_against_hub_cache

PACKAGE = Path(__file__).parents[1] / "cascade_helpers"
#: classes whose from_pretrained reads text or JSON, never weights
NO_WEIGHTS = ("Tokenizer", "ImageProcessor", "FeatureExtractor")


def _from_pretrained_calls():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained":
                owner = ast.unparse(node.func.value)
                yield f"{path.relative_to(PACKAGE)}:{node.lineno} {owner}", owner, node


def test_every_model_from_pretrained_in_the_package_asks_for_safetensors():
    calls = list(_from_pretrained_calls())
    models = [(where, node) for where, owner, node in calls if not owner.endswith(NO_WEIGHTS)]
    assert len(models) >= 4, "the scan finds the loaders' calls (the CLIP towers, the UNets, the VQGAN)"
    missing = [
        where
        for where, node in models
        if not any(
            k.arg == "use_safetensors" and isinstance(k.value, ast.Constant) and k.value.value is True
            for k in node.keywords
        )
    ]
    assert not missing, f"from_pretrained without use_safetensors=True: {missing}"


@pytest.fixture
def recorded(monkeypatch):
    """Every transformers / diffusers from_pretrained call from now on: (class name, keyword arguments)."""
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    calls = []
    for base in (PreTrainedModel, ModelMixin):
        original = base.from_pretrained.__func__

        def record(cls, *args, _original=original, **kwargs):
            calls.append((cls.__name__, kwargs))
            return _original(cls, *args, **kwargs)

        monkeypatch.setattr(base, "from_pretrained", classmethod(record))
    return calls


def test_local_loads_pass_use_safetensors(tiny_models, recorded):
    from cascade_helpers.loading import _load_text_encoder, load_prior

    prior = load_prior(tiny_models, "big", dtype="fp32", device="cpu")
    _load_text_encoder(tiny_models, dtype="fp32", device="cpu")
    assert prior.image_encoder is not None  # read on first use
    names = [name for name, _ in recorded]
    assert names == [
        "CLIPTextModelWithProjection",
        "CLIPTextModelWithProjection",
        "CLIPVisionModelWithProjection",
    ]
    assert all(kwargs.get("use_safetensors") is True for _, kwargs in recorded), recorded


SCRIPT = """
import json, sys
from cascade_helpers.loading import load_decoder, load_prior
report = {}
for name, load in (
    ("prior", lambda: load_prior("stabilityai/stable-cascade-prior", "big", dtype="bf16", device="cpu")),
    ("decoder", lambda: load_decoder("stabilityai/stable-cascade", "big", dtype="bf16", device="cpu")),
):
    try:
        load()
        report[name] = "loaded"
    except Exception as error:
        report[name] = f"{type(error).__name__}: {error}"
json.dump(report, sys.stdout)
"""


def _pickle_instead(folder: Path, pickled_name: str) -> None:
    """Replace the safetensors weights of a saved model folder by a pickled copy of the same tensors."""
    from safetensors.torch import load_file

    (weights,) = folder.glob("*.safetensors")
    torch.save(load_file(weights), folder / pickled_name)
    weights.unlink()


def test_a_hub_repo_with_only_pickled_weights_fails_clearly(tiny_models, tmp_path, monkeypatch):
    """The prior repo's text encoder and the decoder repo's UNet as ``.bin`` only: without
    use_safetensors the libraries would load them; with it, each load fails and says what is missing."""
    from cascade_helpers import files
    from tests import hub_cache

    def build_then_pickle(models, cache):
        build_hub_cache(models, cache)
        snapshot = "snapshots/" + hub_cache.COMMIT
        prior = cache / f"models--{files._REPO_PRIOR.replace('/', '--')}" / snapshot
        decoder = cache / f"models--{files._REPO_DECODER.replace('/', '--')}" / snapshot
        _pickle_instead(prior / "text_encoder", "pytorch_model.bf16.bin")
        _pickle_instead(decoder / "decoder", "diffusion_pytorch_model.bf16.bin")

    monkeypatch.setattr(hub_cache, "build_hub_cache", build_then_pickle)
    report = run_against_hub_cache(tiny_models, tmp_path, SCRIPT)
    for name in ("prior", "decoder"):
        assert report[name].startswith("MissingModelFileError"), report
        assert "Only safetensors weights are read, never pickled .bin files" in report[name], report[name]
