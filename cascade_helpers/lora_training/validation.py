"""Validation pictures during training: each prompt through Stage C (the weights being trained) and the
decoder, or the previewer without one; saved as one grid per step and one picture per named prompt."""

from __future__ import annotations

from pathlib import Path

import PIL.Image
import torch

from ..conditioning import encode_text
from ..generation import text_to_image
from ..images import image_grid, to_pil
from ..models import Decoder, Prior
from ..sampling import OFFICIAL_DECODER, OFFICIAL_PRIOR
from ..sizes import stage_c_shape
from ..stages import generate_stage_c, preview_stage_c
from .config import LoraTrainingConfig
from .data import _save_png


@torch.no_grad()
def _validation_picture(
    prior: Prior, decoder: Decoder | None, config: LoraTrainingConfig, prompt: str
) -> PIL.Image.Image:
    """Why: the LoRA as it is now, with the validation settings: decoded, or the previewer's."""
    size, negative = config.resolution, config.validation_negative_prompt
    prior_settings = OFFICIAL_PRIOR.with_(
        steps=config.validation_prior_steps, guidance=float(config.validation_prior_guidance)
    )
    if decoder is not None:
        decoder_settings = OFFICIAL_DECODER.with_(
            steps=config.validation_decoder_steps, guidance=float(config.validation_decoder_guidance)
        )
        generation = text_to_image(
            prior, decoder, prompt, negative, height=size, width=size, seed=config.seed,
            prior_settings=prior_settings, decoder_settings=decoder_settings,
        )  # fmt: skip
        return generation.images[0]
    latents = generate_stage_c(
        prior, encode_text(prior, prompt), encode_text(prior, negative), stage_c_shape(size, size, 1),
        prior_settings, generator=torch.Generator().manual_seed(config.seed),
    )  # fmt: skip
    return to_pil(preview_stage_c(prior, latents))[0]


def _validation_pictures(prior: Prior, decoder: Decoder | None, config: LoraTrainingConfig, step: int):
    """Why: one grid per step and, for named prompts, each picture alone, written atomically."""
    library, folder = config.validation_prompts, Path(config.output_dir) / "validation"
    named = library if isinstance(library, dict) else {str(i + 1): p for i, p in enumerate(library)}
    pictures = [_validation_picture(prior, decoder, config, prompt) for prompt in named.values()]
    _save_png(image_grid(pictures), folder / f"step-{step:06d}.png")
    for name, picture in zip(named, pictures, strict=True) if isinstance(library, dict) else ():
        _save_png(picture, folder / f"step-{step:06d}-{name}.png")
    return pictures, list(named.values())
