"""Loading by Hub repo id goes through the diffusers/transformers folders of the published repos.

No network: the tiny models are saved in the diffusers layout of ``stabilityai/stable-cascade-prior``
and ``stabilityai/stable-cascade`` into a Hugging Face cache folder, and the loader runs with
``HF_HUB_OFFLINE=1`` in a fresh process (the hub libraries read these variables at import), so
every file is resolved by the real Hub code from that cache.
"""

from __future__ import annotations

import torch

from tests.hub_cache import run_against_hub_cache

SCRIPT = """
import json, sys, torch
from cascade_helpers.loading import load_decoder, load_prior
from cascade_helpers.generation import text_to_image
prior = load_prior("stabilityai/stable-cascade-prior", "big", dtype="bf16", device="cpu")
decoder = load_decoder("stabilityai/stable-cascade", "big", dtype="bf16", device="cpu")
result = text_to_image(prior, decoder, "a red cat", height=512, width=512, seed=0)
json.dump({"image": list(result.images[0].size), "latents": list(result.stage_c_latents.shape),
           "unet": str(prior.unet.dtype), "clip_crop": list(prior.clip_image.crop),
           "effnet": prior.effnet is not None, "previewer": prior.previewer is not None}, sys.stdout)
"""


def test_hub_ids_load_the_published_layout_offline(tiny_models, tmp_path):
    report = run_against_hub_cache(tiny_models, tmp_path, SCRIPT)
    assert report == {
        "image": [512, 512],
        "latents": [1, 16, 12, 12],
        "unet": str(torch.bfloat16),
        "clip_crop": [32, 32],
        "effnet": True,
        "previewer": True,
    }
