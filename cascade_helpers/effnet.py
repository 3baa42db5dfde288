"""The EfficientNet encoder that turns images into Stage C latents (the "semantic compressor").

It is torchvision's EfficientNetV2-S feature extractor followed by a 1×1 convolution to 16 channels
and a BatchNorm without affine parameters, with the parameter names of the official
``effnet_encoder.safetensors`` (``backbone.*`` and ``mapper.*``). All weights come from that file:
torchvision's ImageNet weights are never downloaded.

``forward`` expects ImageNet-normalized images; :func:`preprocess` applies the official
preprocessing (3/4 downscale with nearest neighbour, sizes floored to multiples of 32, ImageNet
normalization), so a 1024² image becomes a 768² input and a 16×24×24 latent.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

LATENT_CHANNELS = 16
DOWNSCALE = 3 / 4  # the official factor between the image and the encoder's input
STRIDE = 32  # EfficientNetV2-S reduces each side 32×
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EfficientNetEncoder(nn.Module):
    """ImageNet-normalized images (B×3×H×W) → Stage C latents (B×16×H/32×W/32)."""

    def __init__(self) -> None:
        super().__init__()
        # weights=None: random init here, every value is replaced by load_state_dict.
        self.backbone = torchvision.models.efficientnet_v2_s(weights=None).features.eval()
        self.mapper = nn.Sequential(
            nn.Conv2d(1280, LATENT_CHANNELS, kernel_size=1, bias=False),
            nn.BatchNorm2d(LATENT_CHANNELS, affine=False),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.mapper(self.backbone(images))


def encoder_input_size(height: int, width: int) -> tuple[int, int]:
    """The official 3/4 downscale, floored to multiples of 32: 1024×1024 → 768×768."""
    return int(height * DOWNSCALE // STRIDE * STRIDE), int(width * DOWNSCALE // STRIDE * STRIDE)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (B×3×H×W) → the encoder's input, exactly as the official code prepares it."""
    size = encoder_input_size(*images.shape[-2:])
    if min(size) < STRIDE:
        raise ValueError(
            f"images of {images.shape[-2]}×{images.shape[-1]} px are too small for the EfficientNet encoder: "
            f"each side must be at least {int(STRIDE / DOWNSCALE) + 1} px"
        )
    return normalize(TF.resize(images, list(size), interpolation=InterpolationMode.NEAREST))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet normalization only, for pictures already at the encoder's input size (the official
    image-to-image example scales its input straight to 768 px and normalizes, no 3/4 step)."""
    return TF.normalize(images, IMAGENET_MEAN, IMAGENET_STD)


@torch.no_grad()
def encode(encoder: EfficientNetEncoder, images: torch.Tensor) -> torch.Tensor:
    """Pictures (B×3×H×W in [0, 1]) → Stage C latents (B×16×h×w, float32), preprocessed the official
    way, computed on the encoder's device."""
    device = next(encoder.parameters()).device
    return encoder(preprocess(images.to(device, torch.float32))).float()
