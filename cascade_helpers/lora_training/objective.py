"""The official training objective of Stage C (``train/train_c_lora.py`` with its ``gdf``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..sampling import diffuse, log_snr, noise_condition, p2_loss_weight


def stage_c_loss(
    unet: nn.Module,
    latents: torch.Tensor,
    conditions: dict[str, torch.Tensor],
    times: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """The official training loss of one batch: noise ``latents`` to ``times``, predict the noise
    from the cosine-time condition, per-sample MSE weighted by P2, averaged over the batch."""
    dtype = next(unet.parameters()).dtype
    snr = log_snr(times)
    noised = diffuse(latents, times, noise)
    inputs = {k: v.to(dtype) for k, v in conditions.items()}
    prediction = unet(noised.to(dtype), noise_condition(snr).to(dtype), return_dict=False, **inputs)[0]
    per_sample = F.mse_loss(prediction.float(), noise, reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * p2_loss_weight(snr)).mean()
