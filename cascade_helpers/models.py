"""The loaded model bundles: :class:`Prior`, :class:`Decoder` and :class:`TextEncoder`.

Apart from :mod:`cascade_helpers.loading`, so that code which *uses* loaded models depends on these
plain records only, never on how the files were found and read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .effnet import EfficientNetEncoder
from .previewer import Previewer


@dataclass(frozen=True)
class _ClipImageSettings:
    """The CLIP image encoder's preprocessing, read from ``feature_extractor/``."""

    resize: int
    crop: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_OPTIONAL_PARTS = {
    "image_encoder": "the CLIP image encoder",
    "effnet": "the EfficientNet encoder",
    "previewer": "the previewer",
}


@dataclass
class Prior:
    """Stage C and what conditions it. ``device``/``dtype`` are where and how it computes: with
    offloading the models' own ``.device`` says "cpu" between calls. The optional parts
    (``image_encoder``, ``effnet``, ``previewer``) are read on first use; None when loaded without them.
    ``stage_c_file``: the file Stage C was read from (None from the Hub)."""

    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    architecture: str
    stage_c_file: Path | None = None
    clip_image: _ClipImageSettings | None = None
    _parts: dict[str, Callable[[], nn.Module] | nn.Module] = field(default_factory=dict, repr=False)

    def _part(self, name: str) -> nn.Module | None:
        """Read on first use and kept: what a notebook never calls costs no memory."""
        part = self._parts.get(name)
        if part is not None and not isinstance(part, nn.Module):
            part = self._parts[name] = part()
        return part

    @property
    def image_encoder(self) -> nn.Module | None:
        return self._part("image_encoder")

    @property
    def effnet(self) -> EfficientNetEncoder | None:
        return self._part("effnet")

    @property
    def previewer(self) -> Previewer | None:
        return self._part("previewer")

    def require(self, part: str, needed_for: str) -> nn.Module:
        """An optional part, read now if it was not yet.

        Args:
            part: ``"image_encoder"``, ``"effnet"`` or ``"previewer"``, as ``load_prior``'s flag.
            needed_for: what the caller is doing, for the message (e.g. "image variation").

        Returns:
            The module.

        Raises:
            ValueError: the prior was loaded without it (the message names the flag to pass).
        """
        module = self._part(part)
        if module is None:
            raise ValueError(
                f"{needed_for} needs {_OPTIONAL_PARTS[part]}, and this prior was loaded without it: "
                f"use load_prior(..., {part}=True)"
            )
        return module


@dataclass
class Decoder:
    """Stage B (latent diffusion up to Stage A's 4-channel latents) and Stage A (to pixels), with the
    files they were read from (None from the Hub)."""

    unet: nn.Module
    vqgan: nn.Module
    device: torch.device
    dtype: torch.dtype
    architecture: str
    stage_b_file: Path | None = None
    stage_a_file: Path | None = None


@dataclass
class TextEncoder:
    """The CLIP text encoder and its tokenizer without Stage C: what Stage B's pooled text conditioning
    needs. ``conditioning.encode_text`` accepts it like a :class:`Prior`."""

    text_encoder: nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
