"""Our loading path reproduces the official modules.

The fixtures were recorded from the official Stability-AI/StableCascade modules (``modules/stage_c.py``,
``stage_b.py``, ``stage_a.py``, ``effnet.py``, ``previewer.py``): the key names and shapes of every
released architecture, and the float32 outputs of the tiny architectures for deterministic weights.
Here the same weights go through our path — an official-format safetensors file, loaded with
``_load_unet`` / ``load_stage_a`` into the diffusers models — and must give the same numbers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cascade_helpers.checkpoints import _official_shapes
from cascade_helpers.effnet import EfficientNetEncoder
from cascade_helpers.loading import _load_stage_a, _load_unet
from cascade_helpers.previewer import Previewer
from tests.recorded_weights import official_weights, seeded_inputs

FIXTURES = Path(__file__).parent / "fixtures"
STATE_DICTS = json.loads((FIXTURES / "official_state_dicts.json").read_text())["architectures"]
OUTPUTS = json.loads((FIXTURES / "official_tiny_outputs.json").read_text())["outputs"]


def _digest(shapes: dict[str, tuple[int, ...]]) -> str:
    lines = "\n".join(f"{k} {list(v)}" for k, v in sorted(shapes.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


@pytest.mark.parametrize(
    "kind,architecture",
    [(k, a) for k in ("stage_c", "stage_b") for a in ("big", "lite", "tiny")]
    + [("stage_a", "big"), ("stage_a", "tiny")],
)
def test_our_configs_describe_the_official_checkpoints(kind, architecture):
    """The shipped diffusers configs, converted to official key names, have exactly the official keys
    and shapes: a released file loads strictly, and the size detection can trust them."""
    shapes = _official_shapes(kind, architecture)
    expected = STATE_DICTS[f"{kind}/{architecture}"]
    assert len(shapes) == expected["keys"]
    assert _digest(shapes) == expected["sha256"]


@pytest.mark.parametrize("name,module", [("effnet", EfficientNetEncoder), ("previewer", Previewer)])
def test_our_modules_have_the_official_state_dicts(name, module):
    shapes = {k: tuple(v.shape) for k, v in module().state_dict().items()}
    assert len(shapes) == STATE_DICTS[name]["keys"]
    assert _digest(shapes) == STATE_DICTS[name]["sha256"]


def _write(tmp_path: Path, kind: str, architecture: str) -> Path:
    path = tmp_path / f"{kind}.safetensors"
    save_file(official_weights(_official_shapes(kind, architecture)), str(path))
    return path


def _expected(name: str, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(OUTPUTS[name]).reshape(like.shape)


@torch.no_grad()
def test_stage_c_matches_the_official_module(tmp_path):
    unet = _load_unet(_write(tmp_path, "stage_c", "tiny"), "stage_c", "tiny", torch.float32)
    x, clip_text, clip_pooled, clip_img = seeded_inputs(
        100, (2, 16, 6, 6), (2, 77, 32), (2, 1, 32), (2, 1, 24)
    )
    r = torch.tensor([0.9, 0.3])
    out = unet(x, r, clip_pooled, clip_text=clip_text, clip_img=clip_img).sample
    torch.testing.assert_close(out, _expected("stage_c_tiny", out), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_stage_b_matches_the_official_module(tmp_path):
    unet = _load_unet(_write(tmp_path, "stage_b", "tiny"), "stage_b", "tiny", torch.float32)
    x, effnet, clip_pooled = seeded_inputs(101, (2, 4, 16, 16), (2, 16, 3, 3), (2, 1, 32))
    r = torch.tensor([0.9, 0.3])
    out = unet(x, r, clip_pooled, effnet=effnet).sample
    torch.testing.assert_close(out, _expected("stage_b_tiny", out), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_stage_a_decoding_matches_the_official_module(tmp_path):
    vqgan = _load_stage_a(_write(tmp_path, "stage_a", "tiny"), "tiny")
    (latents,) = seeded_inputs(102, (1, 4, 8, 8))
    # the official decode multiplies by its scale factor (0.43) first; our config carries the same factor
    out = vqgan.decode(latents * vqgan.config.scale_factor).sample
    torch.testing.assert_close(out, _expected("stage_a_tiny_decode", out), rtol=1e-4, atol=1e-4)
