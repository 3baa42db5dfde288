"""How good and how small: the quality of a reconstructed picture (PSNR, SSIM) and how much its
Stage C latents compress it — the two numbers the reconstruction notebook reports."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .sizes import _ENCODING, _LATENT_CHANNELS, _stage_c_latent_size, check_size


@dataclass(frozen=True)
class Quality:
    """Reconstruction quality of one picture: PSNR in dB (higher is better; ∞: identical), SSIM (1: same)."""

    psnr: float
    ssim: float

    @staticmethod
    def mean(qualities: Sequence[Quality]) -> Quality:
        """The mean PSNR and SSIM of several pictures (an infinite PSNR makes the mean infinite)."""
        psnr, ssim = np.mean([(q.psnr, q.ssim) for q in qualities], axis=0)
        return Quality(float(psnr), float(ssim))


def quality(originals: torch.Tensor, reconstructions: torch.Tensor) -> list[Quality]:
    """PSNR and SSIM per picture with scikit-image (data range 1; SSIM over the colour channels with the
    Gaussian window of Wang et al.: σ 1.5, population covariance).

    Args:
        originals, reconstructions: B×3×H×W in [0, 1], the same shape.

    Returns:
        One :class:`Quality` per picture.
    """
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    if originals.shape != reconstructions.shape:
        raise ValueError(
            f"originals {tuple(originals.shape)} and reconstructions {tuple(reconstructions.shape)} differ"
        )
    results = []
    for original, reconstruction in zip(originals, reconstructions, strict=True):
        a, b = (x.permute(1, 2, 0).double().cpu().numpy() for x in (original, reconstruction))
        gaussian = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False}
        ssim = structural_similarity(a, b, data_range=1.0, channel_axis=-1, **gaussian)
        with np.errstate(divide="ignore"):  # identical pictures: PSNR is +inf, not worth a warning
            psnr = peak_signal_noise_ratio(a, b, data_range=1.0)
        results.append(Quality(float(psnr), float(ssim)))
    return results


@dataclass(frozen=True)
class Compression:
    """How much smaller the latents of an uint8 height×width picture are, stored as ``latent_dtype``
    (``encode_folder``'s default). Sides as the encoder takes them: multiples of 32, at least 64."""

    height: int = 1024
    width: int = 1024
    latent_dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        height, width = check_size(self.height, self.width, _ENCODING)
        object.__setattr__(self, "height", height)  # frozen: set the checked ints this way
        object.__setattr__(self, "width", width)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return 3, self.height, self.width

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """16×h×w: 16×24×24 for 1024²."""
        return _LATENT_CHANNELS, *_stage_c_latent_size(self.height, self.width)

    @property
    def spatial(self) -> float:
        """Picture side / latent side: 1024 / 24 = 42.67."""
        return self.image_shape[1] / self.latent_shape[1]

    @property
    def values(self) -> float:
        """Numbers in the picture / numbers in the latents: 3·1024² / (16·24²) = 341.3."""
        return math.prod(self.image_shape) / math.prod(self.latent_shape)

    @property
    def image_bytes(self) -> int:
        return math.prod(self.image_shape)

    @property
    def latent_bytes(self) -> int:
        return math.prod(self.latent_shape) * self.latent_dtype.itemsize

    @property
    def bytes(self) -> float:
        """uint8 picture bytes / latent bytes: 170.7 for float16 latents, 85.3 for float32."""
        return self.image_bytes / self.latent_bytes

    def __str__(self) -> str:
        image, latent = ("×".join(map(str, shape)) for shape in (self.image_shape, self.latent_shape))
        return (
            f"picture {image} (uint8): {self.image_bytes:,} bytes\n"
            f"latents {latent} ({str(self.latent_dtype).removeprefix('torch.')}): {self.latent_bytes:,} bytes\n"
            f"spatial compression (side): {self.spatial:.2f}×\n"
            f"numbers: {self.values:.1f}× fewer\n"
            f"bytes: {self.bytes:.1f}× smaller"
        )
