"""Numbers from the caller, checked where they enter: real, finite, in range.

A NaN compares false with everything, so ``if not 0 <= x <= 1`` lets ``float("nan")`` through some
checks and not others, and a NaN or infinite guidance, shift or strength reaches the sampler as
black pictures, not as an error. Every setting that scales or shifts a computation goes through
:func:`finite` (or :func:`fraction`), which refuses NaN, infinities, booleans and strings by name.
"""

from __future__ import annotations

import math
import numbers


def _real(value: object) -> bool:
    """A real, finite number; a bool is not one (``True`` as a guidance is a mistake)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _is_whole(value: object) -> bool:
    """A whole number (any integer type, NumPy's too); a bool is not one."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _about(meaning: str) -> str:
    """What a number means, in brackets, for the end of a message (nothing when not given)."""
    return f" ({meaning})" if meaning else ""


def _finite(value: object, name: str, meaning: str = "") -> float:
    """``value`` as a float if it is a real, finite number (not a bool), else a ValueError naming
    ``name`` and, when given, what the number ``meaning`` is."""
    if not _real(value):
        raise ValueError(f"{name} must be a finite number{_about(meaning)}, not {value!r}")
    return float(value)


def _at_least(value: object, name: str, low: float, meaning: str = "", *, strict: bool = False) -> float:
    """``value`` as a float if it is a finite number ≥ ``low`` (> ``low`` with ``strict``), else a
    ValueError naming ``name`` and the bound."""
    if not (_real(value) and (value > low if strict else value >= low)):
        bound = f"{'>' if strict else '≥'} {low:g}"
        raise ValueError(f"{name} must be a finite number {bound}{_about(meaning)}, not {value!r}")
    return float(value)


def _fraction(value: object, name: str, meaning: str = "") -> float:
    """``value`` as a float if it is a number in [0, 1], else a ValueError naming ``name`` and the
    range."""
    if not (_real(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1]{_about(meaning)}, not {value!r}")
    return float(value)


def _whole(value: object, name: str, low: int, high: int | None = None, meaning: str = "") -> int:
    """``value`` as an ``int`` if it is a whole number from ``low`` to ``high`` (no upper bound when
    None), else a ValueError naming ``name`` and the range."""
    if not (_is_whole(value) and value >= low and (high is None or value <= high)):
        bounds = f"from {low} to {high}" if high is not None else f"≥ {low}"
        raise ValueError(f"{name} must be a whole number {bounds}{_about(meaning)}, not {value!r}")
    return int(value)
