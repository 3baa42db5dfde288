"""Text-to-image, image variation, image-to-image and ControlNet pictures: Stage C, then B, then A.

Each stage is a plain function over the loaded models (:mod:`cascade_helpers.stages`, re-exported
here); the four entry points chain them for one :class:`GenerationRequest` — the prompt, size, count,
seed and both stages' settings they all share — and return the pictures with the latents of every
stage, so a notebook can show, save or re-decode them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import PIL.Image
import torch

from . import values
from .conditioning import TextEmbeddings, encode_text
from .controlnet.model import ControlOutputs
from .images import ImageInput, image_to_tensor, to_pil
from .models import Decoder, Prior
from .request import MAX_IMAGES, GenerationRequest, Prompt, make_request
from .sampling import StepCallback, diffuse, initial_noise
from .sizes import check_size, stage_b_shape, stage_c_shape
from .stages import (
    NonFiniteLatentsError,
    check_finite,
    decode_stage_a,
    encode_picture,
    generate_stage_b,
    generate_stage_c,
    preview_stage_c,
    variation_embeddings,
)

__all__ = [
    "MAX_IMAGES",
    "Generation",
    "GenerationRequest",
    "NonFiniteLatentsError",
    "check_finite",
    "Prompt",
    "make_request",
    "check_size",
    "controlnet_to_image",
    "decode_stage_a",
    "encode_picture",
    "generate_stage_b",
    "generate_stage_c",
    "image_to_image",
    "image_variation",
    "preview_stage_c",
    "stage_b_shape",
    "stage_c_shape",
    "text_to_image",
    "variation_embeddings",
]


@dataclass
class Generation:
    """Pictures and everything needed to reproduce or re-decode them."""

    images: list[PIL.Image.Image]
    stage_c_latents: torch.Tensor  # B×16×h×w, float32, CPU
    stage_b_latents: torch.Tensor  # B×4×H/4×W/4, float32, CPU
    settings: dict = field(default_factory=dict)  # prompt, seed, steps ... (saved in PNG metadata)


# --- whole generations -------------------------------------------------------------------------------


def _generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _text_conditioning(prior: Prior, request: GenerationRequest) -> tuple[TextEmbeddings, TextEmbeddings]:
    """Every picture's prompt and negative prompt through the text encoder in one call (each
    distinct text once), then one row per picture."""
    texts = list(dict.fromkeys(request.prompts + request.negative_prompts))
    encoded = encode_text(prior, texts)
    row = {text: i for i, text in enumerate(texts)}
    return (
        encoded.select([row[p] for p in request.prompts]),
        encoded.select([row[p] for p in request.negative_prompts]),
    )


def _run(
    prior: Prior,
    decoder: Decoder,
    request: GenerationRequest,
    *,
    image_embeds: torch.Tensor | None = None,
    stage_c_latents: torch.Tensor | None = None,
    x_init: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    decoder_callback: StepCallback | None = None,
    progress: bool = True,
    control: ControlOutputs | None = None,
    extra: dict | None = None,
) -> Generation:
    r = request
    generator = _generator(r.seed)
    text, negative = _text_conditioning(prior, r)
    if stage_c_latents is None:
        stage_c_latents = generate_stage_c(
            prior,
            text,
            negative,
            stage_c_shape(r.height, r.width, r.num_images),
            r.prior_settings,
            generator=generator,
            image_embeds=image_embeds,
            x_init=x_init,
            callback=callback,
            control=control,
            progress=progress,
        )
    stage_b_latents = generate_stage_b(
        decoder,
        stage_c_latents,
        text.pooled,
        negative.pooled,
        (r.height, r.width),
        r.decoder_settings,
        generator=generator,
        callback=decoder_callback,
        progress=progress,
    )
    images = decode_stage_a(decoder, stage_b_latents)
    settings = {
        **r.as_dict(),
        "prior_variant": prior.architecture,
        "decoder_variant": decoder.architecture,
        **(extra or {}),
    }
    return Generation(to_pil(images), stage_c_latents.cpu(), stage_b_latents.cpu(), settings)


def _run_from_latents(
    prior: Prior,
    decoder: Decoder,
    request: GenerationRequest,
    latents: torch.Tensor,
    noise_level: float,
    **kwargs: Any,
) -> Generation:
    """Stage C started from a picture's latents noised to ``noise_level`` (the official
    image-to-image start: the unshifted schedule for the noise, the usual shift for sampling), for
    ``int(steps × noise_level)`` steps; with no step left, the latents are decoded as they are."""
    steps = int(request.prior_settings.steps * noise_level)
    if steps == 0:
        return _run(prior, decoder, request, stage_c_latents=latents, **kwargs)
    noise = initial_noise(latents.shape, _generator(request.seed + 1), prior.device)
    settings = request.prior_settings.with_(t_start=noise_level, steps=steps)
    # the settings record what Stage C ran ("prior") and what was asked ("requested_prior"): the
    # request rebuilt from them (GenerationRequest.from_dict) makes the same pictures again
    kwargs["extra"] = {**kwargs.get("extra", {}), "requested_prior": request.prior_settings.as_dict()}
    return _run(
        prior,
        decoder,
        dataclasses.replace(request, prior_settings=settings),
        x_init=diffuse(latents, noise_level, noise),
        **kwargs,
    )


def text_to_image(
    prior: Prior,
    decoder: Decoder,
    prompt: Prompt | GenerationRequest,
    negative_prompt: Prompt = "",
    *,
    callback: StepCallback | None = None,
    decoder_callback: StepCallback | None = None,
    progress: bool = True,
    **options: Any,
) -> Generation:
    """Pictures from a prompt.

    Args:
        prior, decoder: the loaded models (:func:`cascade_helpers.loading.load_prior` / ``load_decoder``).
        prompt: a prompt, a list of prompts (one group of pictures each), or a :class:`GenerationRequest`.
        negative_prompt: what guidance steers away from (a string, or one per prompt).
        callback: ``callback(step, denoised, sample)`` after each Stage C step (live previews).
        decoder_callback: the same after each Stage B step.
        progress: False hides both stages' tqdm bars (for a caller that shows its own: the panel).
        **options: any other :class:`GenerationRequest` field (``height``, ``num_images``, ``seed`` ...).

    Returns:
        A :class:`Generation`: the pictures, both stages' latents and the settings.
    """
    request = make_request(prompt, negative_prompt, **options)
    return _run(
        prior, decoder, request, callback=callback, decoder_callback=decoder_callback, progress=progress
    )


def image_variation(
    prior: Prior,
    decoder: Decoder,
    image: ImageInput,
    prompt: Prompt | GenerationRequest = "",
    negative_prompt: Prompt = "",
    *,
    callback: StepCallback | None = None,
    decoder_callback: StepCallback | None = None,
    progress: bool = True,
    **options: Any,
) -> Generation:
    """Variations of a picture: Stage C conditioned on its CLIP image embedding; no prompt needed (the
    official example uses none).

    Args:
        image: the picture (file, PIL image, array or tensor).
        prior, decoder, prompt, negative_prompt, callback, decoder_callback, progress, **options: as for
            :func:`text_to_image`.

    Returns:
        A :class:`Generation`.
    """
    request = make_request(prompt, negative_prompt, **options)
    embeds = variation_embeddings(prior, image).repeat_interleave(request.num_images, 0)
    steps = {"callback": callback, "decoder_callback": decoder_callback, "progress": progress}
    return _run(prior, decoder, request, image_embeds=embeds, **steps)


def image_to_image(
    prior: Prior,
    decoder: Decoder,
    image: ImageInput,
    prompt: Prompt | GenerationRequest,
    negative_prompt: Prompt = "",
    *,
    strength: float = 0.8,
    callback: StepCallback | None = None,
    decoder_callback: StepCallback | None = None,
    progress: bool = True,
    **options: Any,
) -> Generation:
    """Repaint a picture guided by a prompt.

    Args:
        image: the picture (file, PIL image, array or tensor), cover-cropped to the output's shape.
        strength: the noise level the picture's Stage C latents are taken to before denoising (official
            example: 0.8): 0 keeps the picture's encoding, 1 ignores it; ``int(steps × strength)`` steps.
        prior, decoder, prompt, negative_prompt, callback, decoder_callback, progress, **options: as for
            :func:`text_to_image`.

    Returns:
        A :class:`Generation` whose settings also record ``strength``.
    """
    strength = values._fraction(strength, "strength", "0 keeps the picture, 1 ignores it")
    request = make_request(prompt, negative_prompt, **options)
    extra = {"strength": strength}
    steps = {"callback": callback, "decoder_callback": decoder_callback, "progress": progress}
    if strength == 1.0:
        image_to_tensor(image)  # unused at this strength, but a missing or broken picture is still named
        return _run(prior, decoder, request, extra=extra, **steps)
    encoded = encode_picture(prior, image, request.height, request.width)
    latents = encoded.repeat_interleave(request.num_images, 0)
    return _run_from_latents(prior, decoder, request, latents, strength, extra=extra, **steps)


def controlnet_to_image(
    prior: Prior,
    decoder: Decoder,
    control: ControlOutputs,
    prompt: Prompt | GenerationRequest,
    negative_prompt: Prompt = "",
    *,
    init_image: ImageInput | None = None,
    init_noise: float = 1.0,
    callback: StepCallback | None = None,
    decoder_callback: StepCallback | None = None,
    progress: bool = True,
    **options: Any,
) -> Generation:
    """Pictures that follow ControlNet features and a prompt.

    Args:
        control: the ControlNet's outputs for ``num_images`` pictures (:func:`.controlnet.control_features`).
        init_image: with it, Stage C starts from that picture's latents noised to ``init_noise``, as the
            official inpainting and outpainting example does with noise level 1.0 (1 % of the picture's
            signal survives; ``int(steps × init_noise)`` steps). Without it, pure noise (canny, SR).
        init_noise: see ``init_image``; 0 keeps the picture's latents as they are.
        prior, decoder, prompt, negative_prompt, callback, decoder_callback, progress, **options: as for
            :func:`text_to_image`.

    Returns:
        A :class:`Generation`.
    """
    init_noise = values._fraction(init_noise, "init_noise", "0 keeps the picture's latents as they are")
    request = make_request(prompt, negative_prompt, **options)
    batches = {c.shape[0] for c in control if c is not None}
    if batches != {request.num_images}:
        raise ValueError(
            f"the control features are for {sorted(batches)} pictures, not num_images={request.num_images}: "
            f"compute them with control_features(..., batch={request.num_images})"
        )
    steps = {"callback": callback, "decoder_callback": decoder_callback, "progress": progress}
    if init_image is None:
        return _run(prior, decoder, request, control=control, **steps)
    latents = encode_picture(prior, init_image, request.height, request.width)
    latents = latents.repeat_interleave(request.num_images, 0)
    return _run_from_latents(prior, decoder, request, latents, init_noise, control=control, **steps)
