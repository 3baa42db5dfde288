"""The previewer: a small convolutional decoder from Stage C latents straight to a rough RGB picture.

Stage C latents are 16×24×24 for a 1024² image; the previewer maps them to 3×192×192 (8× larger)
with 4 M parameters, next to Stage C's 3.6 B (1.0 B lite): what makes a preview after every sampling
step affordable. Parameter names and shapes are those of the official ``previewer.safetensors``, so
it loads strictly.
"""

from __future__ import annotations

import torch
from torch import nn

from .sizes import _LATENT_CHANNELS


def _stage(layer: nn.Conv2d | nn.ConvTranspose2d) -> list[nn.Module]:
    """One official previewer stage: a layer, GELU, then BatchNorm over its outputs (in that order)."""
    return [layer, nn.GELU(), nn.BatchNorm2d(layer.out_channels)]


class Previewer(nn.Module):
    """Stage C latents (B×16×h×w) → RGB (B×3×8h×8w), values roughly in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        h = 512  # hidden width of the released previewer
        layers = _stage(nn.Conv2d(_LATENT_CHANNELS, h, kernel_size=1))
        layers += _stage(nn.Conv2d(h, h, kernel_size=3, padding=1))
        for c_in, c_out in ((h, h // 2), (h // 2, h // 4), (h // 4, h // 4)):  # three 2× upsamplings
            layers += _stage(nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2))
            layers += _stage(nn.Conv2d(c_out, c_out, kernel_size=3, padding=1))
        layers.append(nn.Conv2d(h // 4, 3, kernel_size=1))
        self.blocks = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.blocks(latents)
