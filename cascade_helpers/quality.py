"""How good and how small: the quality of a reconstructed picture (PSNR, SSIM) and how much its
Stage C latents compress it — the two numbers the reconstruction notebook reports."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .sizes import _ENCODING, _LATENT_CHANNELS, check_size
from .sizes import _stage_c_latent_size as latent_size

DEFAULT_SIZE = 1024


@dataclass(frozen=True)
class Quality:
    """Reconstruction quality of one picture: PSNR in dB (higher is better, ∞ for identical pictures)
    and SSIM (1 for identical pictures)."""

    psnr: float
    ssim: float


def quality(originals: torch.Tensor, reconstructions: torch.Tensor) -> list[Quality]:
    """PSNR and SSIM per picture (B×3×H×W in [0, 1]) with scikit-image: data range 1, SSIM with the
    Gaussian window of Wang et al. (σ = 1.5, population covariance), over the three colour channels.

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
        a = original.permute(1, 2, 0).double().cpu().numpy()
        b = reconstruction.permute(1, 2, 0).double().cpu().numpy()
        ssim = structural_similarity(
            a,
            b,
            data_range=1.0,
            channel_axis=-1,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        with np.errstate(divide="ignore"):  # identical pictures: PSNR is +inf, not worth a warning
            psnr = peak_signal_noise_ratio(a, b, data_range=1.0)
        results.append(Quality(float(psnr), float(ssim)))
    return results


def mean_quality(qualities: Sequence[Quality]) -> Quality:
    return Quality(float(np.mean([q.psnr for q in qualities])), float(np.mean([q.ssim for q in qualities])))


@dataclass(frozen=True)
class Compression:
    """How much smaller the latents are than the picture they encode."""

    image_shape: tuple[int, int, int]  # 3×H×W, stored as uint8
    latent_shape: tuple[int, int, int]  # 16×h×w
    latent_dtype: torch.dtype

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
        image = "×".join(map(str, self.image_shape))
        latent = "×".join(map(str, self.latent_shape))
        dtype = str(self.latent_dtype).removeprefix("torch.")
        return (
            f"picture {image} (uint8): {self.image_bytes:,} bytes\n"
            f"latents {latent} ({dtype}): {self.latent_bytes:,} bytes\n"
            f"spatial compression (side): {self.spatial:.2f}×\n"
            f"numbers: {self.values:.1f}× fewer\n"
            f"bytes: {self.bytes:.1f}× smaller"
        )


def compression(
    height: int = DEFAULT_SIZE, width: int = DEFAULT_SIZE, latent_dtype: torch.dtype = torch.float16
) -> Compression:
    """The compression of an uint8 picture of this size into latents stored as ``latent_dtype``.

    Args:
        height, width: the picture's sides in pixels (whole multiples of 32, at least 64).
        latent_dtype: how the latents are stored (``encode_folder`` default: float16).

    Returns:
        The :class:`Compression`.
    """
    height, width = check_size(height, width, _ENCODING)
    return Compression((3, height, width), (_LATENT_CHANNELS, *latent_size(height, width)), latent_dtype)
