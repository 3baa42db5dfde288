"""Numbers from the caller, checked where they enter: real, finite, in range.

A NaN compares false with everything, so ``if not 0 <= x <= 1`` lets ``float("nan")`` through some
checks and not others, and a NaN guidance, shift or strength reaches the sampler as black pictures,
not as an error. These checks refuse NaN, infinities, booleans and strings by name.
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
    """Every message ends with what the number means, when the caller said."""
    return f" ({meaning})" if meaning else ""


def _finite(value: object, name: str, meaning: str = "") -> float:
    """A finite float, or a ValueError that names the setting: NaN never reaches a computation."""
    if not _real(value):
        raise ValueError(f"{name} must be a finite number{_about(meaning)}, not {value!r}")
    return float(value)


def _at_least(value: object, name: str, low: float, meaning: str = "", *, strict: bool = False) -> float:
    """A finite float ≥ ``low`` (> with ``strict``), or a ValueError naming the setting and the bound."""
    if not (_real(value) and (value > low if strict else value >= low)):
        bound = f"{'>' if strict else '≥'} {low:g}"
        raise ValueError(f"{name} must be a finite number {bound}{_about(meaning)}, not {value!r}")
    return float(value)


def _fraction(value: object, name: str, meaning: str = "") -> float:
    """A float in [0, 1], or a ValueError naming the setting: NaN is refused, not compared."""
    if not (_real(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1]{_about(meaning)}, not {value!r}")
    return float(value)


def _whole(value: object, name: str, low: int, high: int | None = None, meaning: str = "") -> int:
    """An int from ``low`` to ``high`` (None: no bound), or a ValueError naming the setting and range."""
    if not (_is_whole(value) and value >= low and (high is None or value <= high)):
        bounds = f"from {low} to {high}" if high is not None else f"≥ {low}"
        raise ValueError(f"{name} must be a whole number {bounds}{_about(meaning)}, not {value!r}")
    return int(value)
