"""The "diffusers" sampler settings reproduce diffusers' own Stable Cascade pipelines.

Both pipelines are built from the very tiny components our loader returns, so the only thing that
differs is the code around the models: ours (``generate_stage_c/b``, ``text_to_image``) against
``StableCascadePriorPipeline`` / ``StableCascadeDecoderPipeline``. Same seed, same numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascade_helpers.conditioning import encode_text
from cascade_helpers.generation import text_to_image
from cascade_helpers.sampling import DIFFUSERS_DECODER, DIFFUSERS_PRIOR
from cascade_helpers.sizes import stage_c_shape
from cascade_helpers.stages import decode_stage_a, generate_stage_b, generate_stage_c
from cascade_helpers.upstream import (
    DDPMWuerstchenScheduler,
    StableCascadeDecoderPipeline,
    StableCascadePriorPipeline,
)

PROMPT, NEGATIVE = "a photo of a cat", "a dog"


@pytest.fixture(scope="module")
def pipelines(tiny_pipeline):
    prior, decoder = tiny_pipeline
    prior_pipe = StableCascadePriorPipeline(
        tokenizer=prior.tokenizer,
        text_encoder=prior.text_encoder,
        prior=prior.unet,
        scheduler=DDPMWuerstchenScheduler(),
    )
    decoder_pipe = StableCascadeDecoderPipeline(
        decoder=decoder.unet,
        tokenizer=prior.tokenizer,
        text_encoder=prior.text_encoder,
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=decoder.vqgan,
    )
    for pipe in (prior_pipe, decoder_pipe):
        pipe.set_progress_bar_config(disable=True)
    return prior_pipe, decoder_pipe


def _seed(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
@pytest.mark.parametrize("with_image", [False, True], ids=["text", "text+image"])
def test_stage_c_matches_the_prior_pipeline(tiny_pipeline, pipelines, with_image):
    prior, _ = tiny_pipeline
    image_embeds = torch.randn(1, 1, prior.unet.config.clip_image_in_channels, generator=_seed(9))
    expected = pipelines[0](
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=768,
        width=512,
        num_inference_steps=4,
        guidance_scale=4.0,
        num_images_per_prompt=2,
        image_embeds=image_embeds if with_image else None,
        generator=_seed(3),
        output_type="pt",
    ).image_embeddings
    ours = generate_stage_c(
        prior,
        encode_text(prior, PROMPT).repeat(2),
        encode_text(prior, NEGATIVE).repeat(2),
        stage_c_shape(768, 512, 2),
        DIFFUSERS_PRIOR.with_(steps=4),
        generator=_seed(3),
        image_embeds=image_embeds.repeat(2, 1, 1) if with_image else None,
    )
    assert ours.shape == expected.shape == (2, 16, 18, 12)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("guidance", [0.0, 1.1])
def test_stage_b_and_a_match_the_decoder_pipeline(tiny_pipeline, pipelines, guidance):
    prior, decoder = tiny_pipeline
    stage_c = torch.randn(2, 16, 6, 6, generator=_seed(4))
    expected = pipelines[1](
        image_embeddings=stage_c,
        prompt=PROMPT,
        num_inference_steps=3,
        guidance_scale=guidance,
        generator=_seed(5),
        output_type="pt",
    ).images
    text, negative = encode_text(prior, PROMPT).repeat(2), encode_text(prior, "").repeat(2)
    latents = generate_stage_b(
        decoder,
        stage_c,
        text.pooled,
        negative.pooled,
        (256, 256),
        DIFFUSERS_DECODER.with_(steps=3, guidance=guidance),
        generator=_seed(5),
    )
    ours = decode_stage_a(decoder, latents)
    assert ours.shape == expected.shape == (2, 3, 256, 256)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_text_to_image_matches_both_pipelines_chained(tiny_pipeline, pipelines):
    """One generator through both stages, as when a user passes the same one to both pipelines."""
    prior, decoder = tiny_pipeline
    generator = _seed(11)
    embeddings = pipelines[0](
        prompt=PROMPT,
        height=512,
        width=640,
        num_inference_steps=3,
        guidance_scale=4.0,
        generator=generator,
        output_type="pt",
    ).image_embeddings
    expected = pipelines[1](
        image_embeddings=embeddings,
        prompt=PROMPT,
        num_inference_steps=2,
        guidance_scale=0.0,
        generator=generator,
        output_type="pil",
    ).images
    settings = {
        "prior_settings": DIFFUSERS_PRIOR.with_(steps=3),
        "decoder_settings": DIFFUSERS_DECODER.with_(steps=2),
    }
    ours = text_to_image(prior, decoder, PROMPT, height=512, width=640, seed=11, **settings)
    assert ours.images[0].size == expected[0].size == (640, 512)
    # float rounding may flip a pixel by one level
    assert np.abs(np.asarray(ours.images[0], int) - np.asarray(expected[0], int)).max() <= 1
