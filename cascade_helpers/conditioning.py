"""Text and image conditioning, computed the way the official code computes it.

Stage C reads three CLIP inputs: ``clip_text`` (the text encoder's last hidden state before its final
layer norm, for prompts padded to 77 tokens), ``clip_text_pooled`` (the projected pooled embedding,
B×1×1280) and ``clip_img`` (a CLIP ViT-L/14 image embedding, B×1×768, zeros without a picture); Stage B
reads ``clip_text_pooled`` only. With ``long_prompts`` every prompt of a call goes through CLIP in as many
77-token windows as the longest needs, their hidden states one after the other (Stage C's cross-attention
reads any length); the pooled embedding is the first window's, the kind Stage B was trained on (a mean
would mix in windows that are mostly padding). One window gives exactly the 77-token numbers.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .models import Prior, TextEncoder


@dataclass
class TextEmbeddings:
    hidden: torch.Tensor  # B×(77·windows)×D, last hidden state before the final layer norm
    pooled: torch.Tensor  # B×1×P, projected pooled embedding

    def repeat(self, n: int) -> TextEmbeddings:
        """Each row ``n`` times in a row (the same prompt for ``n`` pictures)."""
        return TextEmbeddings(self.hidden.repeat_interleave(n, 0), self.pooled.repeat_interleave(n, 0))

    def select(self, rows: list[int]) -> TextEmbeddings:
        """These rows, in this order (one per picture)."""
        index = torch.tensor(rows, device=self.hidden.device)
        return TextEmbeddings(self.hidden[index], self.pooled[index])


class PromptTruncatedWarning(UserWarning):
    """The prompt is longer than CLIP's 77 tokens; the end was cut off."""


def _warn_if_truncated(tokenizer, content: list[list[int]], window: int) -> None:
    """Names the dropped words: transformers' own warning ("indexing errors", silenced) is wrong here."""
    limit = tokenizer.model_max_length
    for ids in content:
        if len(ids) > window:
            dropped = tokenizer.decode(ids[window:])
            warnings.warn(
                f"the prompt is {len(ids) + 2} tokens long and CLIP reads {limit}: this part is ignored: "
                f"{dropped!r}. long_prompts=True reads it all (in windows of {limit} tokens)",
                PromptTruncatedWarning,
                stacklevel=6,  # the caller of encode_text
            )


def _windows(tokenizer, prompts: list[str], long_prompts: bool):
    """One row per 77-token window, every prompt as many as the longest (one without ``long_prompts``)."""
    window = tokenizer.model_max_length - 2  # room for the start and end tokens
    content = [tokenizer(p, add_special_tokens=False, verbose=False).input_ids for p in prompts]
    if not long_prompts:
        _warn_if_truncated(tokenizer, content, window)
    count = max(1, *(math.ceil(len(ids) / window) for ids in content)) if long_prompts else 1
    rows = [
        [tokenizer.bos_token_id, *ids[i * window : (i + 1) * window], tokenizer.eos_token_id]
        for ids in content
        for i in range(count)
    ]
    padded = tokenizer.pad(
        {"input_ids": rows}, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    )
    return padded, count


def _text_conditioning(
    prior: Prior | TextEncoder, prompts: str | list[str], long_prompts: bool = False
) -> TextEmbeddings:
    """:func:`encode_text` with gradients: LoRA training learns new token embeddings through it."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    tokens, windows = _windows(prior.tokenizer, prompts, long_prompts)
    output = prior.text_encoder(**tokens.to(prior.device), output_hidden_states=True)
    hidden = output.hidden_states[-1].float()
    pooled = output.text_embeds.float().reshape(len(prompts), windows, -1)[:, :1]
    return TextEmbeddings(hidden.reshape(len(prompts), windows * hidden.shape[1], -1), pooled)


@torch.no_grad()
def encode_text(
    prior: Prior | TextEncoder, prompts: str | list[str], *, long_prompts: bool = False
) -> TextEmbeddings:
    """Prompts → Stage C/B text conditioning (float32, on the prior's device).

    Args:
        prior: the loaded prior, or a text encoder alone (Stage B needs no Stage C).
        prompts: one prompt or a list, each padded or cut (:class:`PromptTruncatedWarning`) to 77 tokens.
        long_prompts: read prompts beyond 77 tokens in 77-token windows instead of cutting them.

    Returns:
        ``hidden`` B×77×1280 (B×(77·windows)×1280 with ``long_prompts``), ``pooled`` B×1×1280.
    """
    return _text_conditioning(prior, prompts, long_prompts)


@torch.no_grad()
def _encode_image_clip(prior: Prior, images: torch.Tensor) -> torch.Tensor:
    """The official ``clip_preprocess`` without antialiasing: its torchvision 0.16 did not antialias tensors,
    and Stage C's image conditioning was trained on embeddings made so (diffusers' PIL path does)."""
    image_encoder = prior.require("image_encoder", "a CLIP image embedding (image variation)")
    settings = prior.clip_image
    images = images.to(prior.device)
    resized = TF.resize(images, settings.resize, interpolation=InterpolationMode.BICUBIC, antialias=False)
    pixels = TF.normalize(TF.center_crop(resized, list(settings.crop)), settings.mean, settings.std)
    return image_encoder(pixel_values=pixels.to(prior.dtype)).image_embeds.unsqueeze(1).float()


def no_image(prior: Prior, batch: int) -> torch.Tensor:
    """``clip_img`` for "no image": zeros, as the official model always receives all three inputs
    (diffusers would otherwise silently drop the text sequence too).

    Args:
        prior, batch: the loaded prior, and B.

    Returns:
        B×1×768 zeros (the UNet's ``clip_image_in_channels``), float32, on the prior's device.
    """
    return torch.zeros(batch, 1, prior.unet.config.clip_image_in_channels, device=prior.device)
