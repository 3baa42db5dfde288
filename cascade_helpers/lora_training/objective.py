"""The official training objective of Stage C (``train/train_c_lora.py`` with its ``gdf``), and the
module that computes it for a batch: what accelerate prepares (and wraps for several GPUs)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..conditioning import _text_conditioning
from ..models import Prior
from ..sampling import diffuse, log_snr, noise_condition, p2_loss_weight


def stage_c_loss(
    unet: nn.Module,
    latents: torch.Tensor,
    conditions: dict[str, torch.Tensor],
    times: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """The official training loss of one batch: noise ``latents`` to ``times``, predict the noise
    from the cosine-time condition, per-sample MSE weighted by P2, averaged over the batch.

    Args:
        unet: Stage C's UNet (with its LoRA); inputs are cast to its dtype.
        latents: B×16×h×w clean latents, float32.
        conditions: ``clip_text``, ``clip_text_pooled`` and ``clip_img`` for the batch.
        times: B noise levels in (0, 1] (unshifted schedule, as official training).
        noise: Gaussian noise shaped like ``latents``: the prediction's target.

    Returns:
        The loss, a 0-d float32 tensor.
    """
    dtype = next(unet.parameters()).dtype
    snr = log_snr(times)
    noised = diffuse(latents, times, noise)
    inputs = {k: v.to(dtype) for k, v in conditions.items()}
    prediction = unet(noised.to(dtype), noise_condition(snr).to(dtype), return_dict=False, **inputs)[0]
    per_sample = F.mse_loss(prediction.float(), noise, reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * p2_loss_weight(snr)).mean()


class _StageCObjective(nn.Module):
    """Why: all that trains must sit in the module accelerate prepares, so DDP averages every gradient."""

    def __init__(self, prior: Prior, texts: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        self.unet, self.text_encoder = prior.unet, prior.text_encoder
        self.prior = prior  # the tokenizer and device; not a module, so not registered twice
        self.texts = texts  # caption → cached (hidden, pooled); a caption with a learned token has none

    def forward(
        self, latents, noise, times, clip_img, captions: Sequence[str], autocast: bool
    ) -> torch.Tensor:
        device, cached = latents.device, [self.texts.get(caption) for caption in captions]
        fresh = [caption for caption, done in zip(captions, cached, strict=True) if done is None]
        encoded = iter(())
        if fresh:  # encoded here, with gradients to the learned tokens' rows
            embeddings = _text_conditioning(self.prior, fresh)
            encoded = zip(embeddings.hidden, embeddings.pooled, strict=True)
        texts = [next(encoded) if done is None else [t.to(device) for t in done] for done in cached]
        hidden, pooled = (torch.stack(parts) for parts in zip(*texts, strict=True))
        conditions = {"clip_text": hidden, "clip_text_pooled": pooled, "clip_img": clip_img}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return stage_c_loss(self.unet, latents, conditions, times, noise)
