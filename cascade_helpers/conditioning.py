"""Text and image conditioning, computed the way the official code computes it.

Stage C is conditioned on three CLIP inputs: ``clip_text`` (the text encoder's last hidden state,
before its final layer norm, for prompts padded to 77 tokens), ``clip_text_pooled`` (the projected
pooled embedding, B×1×1280) and ``clip_img`` (a CLIP ViT-L/14 image embedding, B×1×768, zeros when
there is no image). Stage B uses ``clip_text_pooled`` only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .models import Prior, TextEncoder


@dataclass
class TextEmbeddings:
    hidden: torch.Tensor  # B×77×D, last hidden state
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


def _warn_if_truncated(tokenizer, prompts: list[str]) -> None:
    limit = tokenizer.model_max_length
    for prompt in prompts:
        ids = tokenizer(prompt, truncation=False).input_ids
        if len(ids) > limit:
            dropped = tokenizer.decode(ids[limit - 1 : -1])
            warnings.warn(
                f"the prompt is {len(ids)} tokens long and CLIP reads {limit}: this part is ignored: {dropped!r}",
                PromptTruncatedWarning,
                stacklevel=3,
            )


@torch.no_grad()
def encode_text(prior: Prior | TextEncoder, prompts: str | list[str]) -> TextEmbeddings:
    """Prompts → Stage C/B text conditioning (float32, on the prior's device). A :class:`TextEncoder`
    loaded alone serves as well: Stage B needs no Stage C.

    Args:
        prior: the loaded prior, or a text encoder loaded alone (``loading.load_text_encoder``).
        prompts: one prompt or a list; each padded (or cut, with a :class:`PromptTruncatedWarning`)
            to CLIP's 77 tokens.

    Returns:
        :class:`TextEmbeddings`: ``hidden`` B×77×1280 and ``pooled`` B×1×1280 for the released text
        encoder, one row per prompt.
    """
    return text_conditioning(prior, prompts)


def text_conditioning(prior: Prior | TextEncoder, prompts: str | list[str]) -> TextEmbeddings:
    """:func:`encode_text` with gradients: LoRA training learns new token embeddings through it.

    Args:
        prior, prompts: as for :func:`encode_text`.

    Returns:
        :class:`TextEmbeddings`, as for :func:`encode_text`, attached to the autograd graph.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    _warn_if_truncated(prior.tokenizer, prompts)
    tokens = prior.tokenizer(
        prompts,
        truncation=True,
        padding="max_length",
        max_length=prior.tokenizer.model_max_length,
        return_tensors="pt",
    ).to(prior.device)
    output = prior.text_encoder(**tokens, output_hidden_states=True)
    return TextEmbeddings(output.hidden_states[-1].float(), output.text_embeds.unsqueeze(1).float())


def clip_image_input(prior: Prior, images: torch.Tensor) -> torch.Tensor:
    """B×3×H×W in [0, 1] → the image encoder's input: bicubic resize of the short side, centre crop,
    CLIP normalization (the official ``clip_preprocess``, with sizes from ``feature_extractor/``).

    No antialiasing: the official code pins torchvision 0.16, whose ``Resize`` does not antialias
    tensors by default, and Stage C's image conditioning was trained on embeddings made that way.
    (diffusers' pipeline goes through PIL, which does antialias.)

    Args:
        prior: a prior loaded with ``image_encoder=True`` (its ``clip_image`` settings, read from
            ``feature_extractor/``).
        images: B×3×H×W in [0, 1], on any device.

    Returns:
        B×3×crop×crop, normalized, same device and dtype as ``images``.
    """
    settings = prior.clip_image
    resized = TF.resize(images, settings.resize, interpolation=InterpolationMode.BICUBIC, antialias=False)
    return TF.normalize(TF.center_crop(resized, list(settings.crop)), settings.mean, settings.std)


@torch.no_grad()
def encode_image_clip(prior: Prior, images: torch.Tensor) -> torch.Tensor:
    """B×3×H×W pictures → ``clip_img`` conditioning (B×1×E, float32).

    Args:
        prior: a prior loaded with ``image_encoder=True``.
        images: B×3×H×W in [0, 1], on any device, not yet prepared: :func:`clip_image_input` runs here.

    Returns:
        B×1×768 for ViT-L/14 (E: the encoder's projection width), float32, on the prior's device.

    Raises:
        ValueError: the prior was loaded without its image encoder.
    """
    image_encoder = prior.require("image_encoder", "a CLIP image embedding (image variation)")
    pixels = clip_image_input(prior, images.to(prior.device)).to(prior.dtype)
    return image_encoder(pixel_values=pixels).image_embeds.unsqueeze(1).float()


def no_image(prior: Prior, batch: int) -> torch.Tensor:
    """``clip_img`` for "no image": zeros, as the official model always receives all three inputs
    (diffusers would otherwise silently drop the text sequence too).

    Args:
        prior: the loaded prior (its UNet's ``clip_image_in_channels``: 768 for the released ones).
        batch: B.

    Returns:
        B×1×768 zeros, float32, on the prior's device.
    """
    return torch.zeros(batch, 1, prior.unet.config.clip_image_in_channels, device=prior.device)
