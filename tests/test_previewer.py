"""The previewer: an official ``previewer.safetensors`` loads strictly into ``Previewer()`` and gives
the official module's output.

``fixtures/official_previewer.json`` is the output of the official ``modules/previewer.py`` for the
weights and latents built below (recorded locally; the official code is not part of this project).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from cascade_helpers.loading import _load_strict
from cascade_helpers.previewer import Previewer

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "official_previewer.json").read_text())


def _deterministic_weights() -> dict[str, torch.Tensor]:
    """Keys in sorted order, seed = position; BatchNorm variances kept positive; the integer
    ``num_batches_tracked`` buffers stay int64, as in the released file."""
    weights = {}
    for i, (key, value) in enumerate(sorted(Previewer().state_dict().items())):
        generator = torch.Generator().manual_seed(i)
        if not value.is_floating_point():
            weights[key] = torch.tensor(7)
        elif "running_var" in key:
            weights[key] = torch.rand(value.shape, generator=generator) + 0.5
        else:
            weights[key] = torch.randn(value.shape, generator=generator) * 0.2
    return weights


def test_takes_no_arguments_and_downloads_nothing(no_network):
    assert sum(p.numel() for p in Previewer().parameters()) > 3_000_000  # the released 16 MB (fp32)


@torch.no_grad()
def test_official_file_loads_strictly_and_matches_the_official_output(tmp_path):
    path = tmp_path / "previewer.safetensors"
    save_file(_deterministic_weights(), str(path))
    previewer = _load_strict(Previewer(), path)
    assert all(b.item() == 7 for k, b in previewer.state_dict().items() if k.endswith("num_batches_tracked"))
    latents = torch.randn((1, 16, 2, 3), generator=torch.Generator().manual_seed(103))
    out = previewer(latents)
    assert list(out.shape) == FIXTURE["shape"] == [1, 3, 16, 24]
    expected = torch.tensor(FIXTURE["output"]).reshape(out.shape)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_output_is_eight_times_the_latent_size():
    previewer = Previewer().eval()
    assert previewer(torch.randn(2, 16, 24, 24)).shape == (2, 3, 192, 192)
    assert previewer(torch.randn(1, 16, 15, 36)).shape == (1, 3, 120, 288)
