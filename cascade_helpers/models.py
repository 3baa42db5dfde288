"""The loaded model bundles the rest of the package works on: :class:`Prior`, :class:`Decoder` and
:class:`TextEncoder` (and the CLIP image settings a prior carries).

They live apart from :mod:`cascade_helpers.loading` so that code which *uses* loaded models
(conditioning, generation, ControlNet, LoRA) depends on these plain records only, never on how the
files were found and read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoints import Architecture
from .effnet import EfficientNetEncoder
from .previewer import Previewer


@dataclass(frozen=True)
class ClipImageSettings:
    """How the CLIP image encoder wants its input (read from ``feature_extractor/``)."""

    resize: int
    crop: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


#: the optional parts of a prior, as load_prior's flags name them
_OPTIONAL_PARTS = {
    "image_encoder": "the CLIP image encoder",
    "effnet": "the EfficientNet encoder",
    "previewer": "the previewer",
}


@dataclass
class Prior:
    """Stage C and what conditions it. ``device``/``dtype`` are where and how it computes: with
    offloading the models' own ``.device`` says "cpu" between calls."""

    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    architecture: Architecture
    image_encoder: nn.Module | None = None
    clip_image: ClipImageSettings | None = None
    effnet: EfficientNetEncoder | None = None
    previewer: Previewer | None = None
    files: list[Path] = field(default_factory=list)  # what it was loaded from, Stage C's file first

    def require(self, part: str, needed_for: str) -> nn.Module:
        """The optional ``part`` (``"image_encoder"``, ``"effnet"`` or ``"previewer"``), or an error
        saying that ``needed_for`` needs it and how to load it.

        Args:
            part: the attribute, named as ``load_prior``'s flag.
            needed_for: what the caller is doing, for the message (e.g. "image variation").

        Returns:
            The module.

        Raises:
            ValueError: the prior was loaded without it (the message names the flag to pass).
        """
        module = getattr(self, part)
        if module is None:
            raise ValueError(
                f"{needed_for} needs {_OPTIONAL_PARTS[part]}, and this prior was loaded without it: "
                f"use load_prior(..., {part}=True)"
            )
        return module


@dataclass
class Decoder:
    """Stage B (latent diffusion up to Stage A's 4-channel latents) and Stage A (to pixels)."""

    unet: nn.Module
    vqgan: nn.Module
    device: torch.device
    dtype: torch.dtype
    architecture: Architecture
    files: list[Path] = field(default_factory=list)  # what it was loaded from: Stage B's file, Stage A's


@dataclass
class TextEncoder:
    """The CLIP text encoder and its tokenizer without Stage C: what Stage B's pooled text conditioning
    needs. ``conditioning.encode_text`` accepts it like a :class:`Prior`."""

    text_encoder: nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
