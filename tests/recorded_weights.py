"""The deterministic weights and inputs the ``official_*`` fixtures were recorded with.

The fixtures hold outputs of the official modules for these exact tensors, so every test that
compares against them builds its weights and inputs here (same recipe, same key order).
"""

from __future__ import annotations

import torch


def official_weights(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Key ``i`` in sorted order from seed ``i``: randn × 0.2; BatchNorm variances rand + 0.5 (kept
    positive); ``num_batches_tracked`` 0."""
    weights = {}
    for i, (key, shape) in enumerate(sorted(shapes.items())):
        generator = torch.Generator().manual_seed(i)
        if key.endswith("num_batches_tracked"):
            weights[key] = torch.tensor(0)
        elif "running_var" in key:
            weights[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            weights[key] = torch.randn(shape, generator=generator) * 0.2
    return weights


def seeded_inputs(seed: int, *shapes) -> list[torch.Tensor]:
    """Standard normal tensors of ``shapes``, drawn in order from one generator seeded ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in shapes]
