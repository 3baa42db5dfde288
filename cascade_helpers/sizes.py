"""Every size rule of the cascade in one place: picture sides, encoder input, latent grids.

The EfficientNet encoder sees a picture scaled by 3/4 (sides floored to multiples of 32) and reduces
each side 32×, so a 1024² picture becomes a 768² input and a 16×24×24 latent: 1024 / 24 = 42.67 per
side, the "compression factor" the official code writes as ``ceil(side / 42.67)``. For the sides
Stage C was trained on (multiples of 128) both formulas agree; we compute the latent grid from the
encoder, so the text-to-image grid and an encoded picture's grid can never differ. Stage B works on
Stage A's latents, 4× smaller than the picture. Each task's accepted sides are a :class:`_SideRule`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .values import _is_whole

_LATENT_CHANNELS = 16  # Stage C latents (the EfficientNet encoder's output)
_STAGE_B_CHANNELS = 4  # Stage A latents (Stage B's output)
_DOWNSCALE = 3 / 4  # picture side → EfficientNet input side
_STRIDE = 32  # EfficientNetV2-S reduces each side 32×
_STAGE_A_COMPRESSION = 4  # picture side / Stage A latent side (1024 → 256)
#: the smallest picture side the 3/4 downscale leaves one encoder stride of (43 px)
_SMALLEST_ENCODABLE_SIDE = math.ceil(_STRIDE / _DOWNSCALE)


@dataclass(frozen=True)
class _SideRule:
    """One rule per task, so each names its accepted sides the same way (``maximum`` None: no limit)."""

    multiple: int
    minimum: int
    maximum: int | None
    hint: str

    def describe(self) -> str:
        upper = f" to {self.maximum}" if self.maximum else ""
        return f"a multiple of {self.multiple} from {self.minimum}{upper}"

    def accepts(self, side: object) -> bool:
        upper = math.inf if self.maximum is None else self.maximum
        return _is_whole(side) and self.minimum <= side <= upper and side % self.multiple == 0


#: text-to-image and friends: the sides Stage C and B were trained on
_GENERATION = _SideRule(128, 512, 2048, "e.g. 1024, 1152, 1536; any aspect ratio works")
#: encoding pictures to latents and decoding them (reconstruction): what the encoder needs
_ENCODING = _SideRule(_STRIDE, 2 * _STRIDE, None, "1024 gives the released models' 24×24 latents")
#: the picture side LoRA training buckets are made for
_TRAINING = _SideRule(128, 256, 2048, "1024 as released")


def check_size(height: object, width: object, rule: _SideRule = _GENERATION) -> tuple[int, int]:
    """Raise a ValueError naming the side that ``rule`` refuses; return both sides as ``int``.

    Args:
        height, width: the picture's sides in pixels (whole numbers; a bool is refused).
        rule: the sides the task accepts (default: multiples of 128 from 512 to 2048).

    Returns:
        ``(height, width)`` as ints.
    """
    for name, side in (("height", height), ("width", width)):
        if not rule.accepts(side):
            raise ValueError(f"{name}={side!r}: use {rule.describe()} ({rule.hint})")
    return int(height), int(width)


def _encoder_input_size(height: int, width: int) -> tuple[int, int]:
    """The official 3/4 downscale, floored to multiples of 32: 1024×1024 → 768×768."""
    return int(height * _DOWNSCALE // _STRIDE * _STRIDE), int(width * _DOWNSCALE // _STRIDE * _STRIDE)


def _stage_c_latent_size(height: int, width: int) -> tuple[int, int]:
    """Stage C's latent grid, the encoder's input / 32: 1024×1024 → 24×24, 1536×640 → 36×15."""
    input_height, input_width = _encoder_input_size(height, width)
    return input_height // _STRIDE, input_width // _STRIDE


def stage_c_shape(height: int, width: int, batch: int) -> tuple[int, int, int, int]:
    """B×16×h×w: the Stage C latents of ``batch`` pictures of height×width.

    Args:
        height, width, batch: the pictures' sides in pixels, and their number B.

    Returns:
        ``(B, 16, h, w)``; 24×24 for 1024².
    """
    return (batch, _LATENT_CHANNELS, *_stage_c_latent_size(height, width))


def stage_b_shape(height: int, width: int, batch: int) -> tuple[int, int, int, int]:
    """B×4×H/4×W/4: the Stage A latents of ``batch`` pictures of height×width.

    Args:
        height, width, batch: the pictures' sides in pixels, and their number B.

    Returns:
        ``(B, 4, H/4, W/4)``, sides rounded up: 256×256 for 1024².
    """
    latent_side = math.ceil(height / _STAGE_A_COMPRESSION), math.ceil(width / _STAGE_A_COMPRESSION)
    return (batch, _STAGE_B_CHANNELS, *latent_side)


def _image_size_for_latents(height: int, width: int) -> tuple[int, int]:
    """Decoding's size when none is given: the smallest with this grid (24×36 → 1024×1536)."""
    return math.ceil(height / _DOWNSCALE) * _STRIDE, math.ceil(width / _DOWNSCALE) * _STRIDE
