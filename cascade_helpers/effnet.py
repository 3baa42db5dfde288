"""The EfficientNet encoder that turns pictures into Stage C latents (the "semantic compressor").

Its parameter names are those of the official ``effnet_encoder.safetensors`` (``backbone.*``,
``mapper.*``), where all its weights come from: torchvision's ImageNet weights are never downloaded.

:func:`encode` is the one way pictures become latents in this package, prepared either way the official
code prepares them before ImageNet normalization: ``downscale=True`` scales a picture at its output size
by 3/4 with nearest neighbour (the official reconstruction notebook and data loaders: 1024² → 768² →
16×24×24); ``downscale=False`` takes one the caller already cover-cropped to the encoder's input size
(official image-to-image, ControlNet and LoRA training: :func:`cascade_helpers.images.resize_and_crop`).
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .sizes import _LATENT_CHANNELS, _SMALLEST_ENCODABLE_SIDE, _STRIDE, _encoder_input_size

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_EFFNET_CHANNELS = 1280  # EfficientNetV2-S features (the ControlNets' bottleneck width too)


class EfficientNetEncoder(nn.Module):
    """ImageNet-normalized images (B×3×H×W) → Stage C latents (B×16×H/32×W/32)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torchvision.models.efficientnet_v2_s(weights=None).features.eval()
        self.mapper = nn.Sequential(
            nn.Conv2d(_EFFNET_CHANNELS, _LATENT_CHANNELS, kernel_size=1, bias=False),
            nn.BatchNorm2d(_LATENT_CHANNELS, affine=False),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.mapper(self.backbone(images))


def preprocess(images: torch.Tensor, *, downscale: bool = True) -> torch.Tensor:
    """Pictures in [0, 1] → the encoder's input, ImageNet-normalized as the official code prepares it.

    Args:
        images: B×3×H×W in [0, 1].
        downscale: True scales by 3/4 with nearest neighbour, sides floored to multiples of 32; False doesn't.

    Returns:
        ImageNet-normalized B×3×h×w, same dtype and device.

    Raises:
        ValueError: with ``downscale``, a picture too small to give a side of 32 px.
    """
    if downscale:
        size = _encoder_input_size(*images.shape[-2:])
        if min(size) < _STRIDE:
            raise ValueError(
                f"pictures of {images.shape[-2]}×{images.shape[-1]} px are too small for the EfficientNet "
                f"encoder: each side must be at least {_SMALLEST_ENCODABLE_SIDE} px"
            )
        images = TF.resize(images, list(size), interpolation=InterpolationMode.NEAREST)
    return TF.normalize(images, _IMAGENET_MEAN, _IMAGENET_STD)


@torch.no_grad()
def encode(encoder: EfficientNetEncoder, images: torch.Tensor, *, downscale: bool = True) -> torch.Tensor:
    """Pictures → Stage C latents, computed in float32 on the encoder's device.

    Args:
        encoder: the loaded encoder (``load_prior(...).effnet`` or ``load_effnet``).
        images: B×3×H×W pictures in [0, 1], on any device.
        downscale: True for pictures at their output size, False for ones at the encoder's input size.

    Returns:
        B×16×h×w latents, float32, on the encoder's device (h, w: the input's sides / 32).
    """
    device = next(encoder.parameters()).device
    return encoder(preprocess(images.to(device, torch.float32), downscale=downscale)).float()
