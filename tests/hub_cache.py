"""A Hugging Face cache folder holding the tiny models in the published Hub layout, for offline tests
of loading by repo id (``HF_HUB_CACHE`` pointed at it, ``HF_HUB_OFFLINE=1``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from cascade_helpers import files
from cascade_helpers.loading import load_decoder, load_prior

COMMIT = "0" * 40


def _snapshot(cache: Path, repo: str) -> Path:
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def build_hub_cache(tiny_models: Path, cache: Path) -> None:
    """The diffusers folders of ``stabilityai/stable-cascade-prior`` and ``stabilityai/stable-cascade``
    (bf16 variants), and the official single files the loaders take from the latter."""
    prior_local = load_prior(tiny_models, "big", dtype="bf16", device="cpu")
    decoder_local = load_decoder(tiny_models, "big", dtype="bf16", device="cpu")
    prior_repo, decoder_repo = _snapshot(cache, files._REPO_PRIOR), _snapshot(cache, files._REPO_DECODER)
    prior_local.unet.save_pretrained(prior_repo / "prior", variant="bf16")
    decoder_local.unet.save_pretrained(decoder_repo / "decoder", variant="bf16")
    decoder_local.vqgan.save_pretrained(decoder_repo / "vqgan")
    for repo in (prior_repo, decoder_repo):
        prior_local.text_encoder.save_pretrained(repo / "text_encoder", variant="bf16")
        prior_local.tokenizer.save_pretrained(repo / "tokenizer")
    prior_local.image_encoder.save_pretrained(prior_repo / "image_encoder", variant="bf16")
    shutil.copytree(tiny_models / "feature_extractor", prior_repo / "feature_extractor")
    for file in (files._FILES["effnet"], files._FILES["previewer"]):
        shutil.copy(tiny_models / file.path, decoder_repo / file.path)


def run_against_hub_cache(tiny_models: Path, tmp_path: Path, script: str) -> dict:
    """Build the cache, run ``script`` in a fresh process offline against it (the hub libraries read
    ``HF_HUB_CACHE``/``HF_HUB_OFFLINE`` at import), and return the JSON it printed last."""
    cache = tmp_path / "hub"
    build_hub_cache(tiny_models, cache)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path.cwd())}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
