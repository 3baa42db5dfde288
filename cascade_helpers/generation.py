"""Text-to-image, image variation and image-to-image: Stage C, then Stage B, then Stage A.

Each stage is a plain function over the loaded models (:func:`generate_stage_c`,
:func:`generate_stage_b`, :func:`decode_stage_a`); :func:`text_to_image` and friends chain them and
return the pictures together with the latents of every stage, so a notebook can show, save or
re-decode any of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import PIL.Image
import torch

from .conditioning import TextEmbeddings, encode_image_clip, encode_text, no_image
from .effnet import encoder_input_size
from .effnet import normalize as effnet_normalize
from .images import ImageInput, image_to_tensor, resize_and_crop, scale_short_side, to_pil
from .loading import Decoder, Prior
from .sampling import (
    OFFICIAL_DECODER,
    OFFICIAL_PRIOR,
    StageSettings,
    StepCallback,
    diffuse,
    initial_noise,
    sample,
    unet_denoiser,
)

STAGE_C_COMPRESSION = 42.67  # image side / Stage C latent side (1024 → 24)
STAGE_A_COMPRESSION = 4  # image side / Stage B latent side (1024 → 256)
SIDE_STEP, SIDE_MIN, SIDE_MAX = 128, 512, 2048
MAX_IMAGES = 16
OFFICIAL_INPUT_SIDE = 768  # the official examples scale input pictures to this short side first


@dataclass
class Generation:
    """Pictures and everything needed to reproduce or re-decode them."""

    images: list[PIL.Image.Image]
    stage_c_latents: torch.Tensor  # B×16×h×w, float32, CPU
    stage_b_latents: torch.Tensor  # B×4×H/4×W/4, float32, CPU
    settings: dict = field(default_factory=dict)  # prompt, seed, steps ... (saved in PNG metadata)


def check_size(height: int, width: int) -> None:
    """Sizes the models were trained for: multiples of 128 from 512 to 2048 per side."""
    for name, side in (("height", height), ("width", width)):
        if not (isinstance(side, int) and SIDE_MIN <= side <= SIDE_MAX and side % SIDE_STEP == 0):
            raise ValueError(
                f"{name}={side!r}: use a multiple of {SIDE_STEP} from {SIDE_MIN} to {SIDE_MAX} "
                f"(e.g. 1024, 1152, 1536); any aspect ratio works"
            )


def stage_c_shape(height: int, width: int, batch: int) -> tuple[int, int, int, int]:
    return (batch, 16, math.ceil(height / STAGE_C_COMPRESSION), math.ceil(width / STAGE_C_COMPRESSION))


def stage_b_shape(height: int, width: int, batch: int) -> tuple[int, int, int, int]:
    return (batch, 4, math.ceil(height / STAGE_A_COMPRESSION), math.ceil(width / STAGE_A_COMPRESSION))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _check_count(num_images: int) -> None:
    if not (isinstance(num_images, int) and 1 <= num_images <= MAX_IMAGES):
        raise ValueError(f"num_images must be from 1 to {MAX_IMAGES}, not {num_images!r}")


# --- the stages --------------------------------------------------------------------------------------


@torch.no_grad()
def generate_stage_c(
    prior: Prior,
    text: TextEmbeddings,
    negative: TextEmbeddings,
    shape: tuple[int, ...],
    settings: StageSettings = OFFICIAL_PRIOR,
    *,
    generator: torch.Generator | None = None,
    image_embeds: torch.Tensor | None = None,
    x_init: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    control: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Sample Stage C latents (B×16×h×w) for text (and optionally CLIP image) conditioning.

    ``control``: ControlNet features for the B pictures (:func:`cascade_helpers.controlnet.control_features`);
    the unconditional half of the guided batch gets the same features, as in the official notebook."""
    batch = shape[0]
    zeros = no_image(prior, batch)
    cond = {
        "clip_text": text.hidden,
        "clip_text_pooled": text.pooled,
        "clip_img": zeros if image_embeds is None else image_embeds.to(prior.device),
    }
    uncond = {"clip_text": negative.hidden, "clip_text_pooled": negative.pooled, "clip_img": zeros}
    if control is not None:
        cond["cnet"] = uncond["cnet"] = list(control)
    return sample(
        unet_denoiser(prior.unet, prior.dtype),
        shape,
        cond,
        uncond,
        settings,
        device=prior.device,
        generator=generator,
        x_init=x_init,
        callback=callback,
        progress="Stage C",
    )


@torch.no_grad()
def generate_stage_b(
    decoder: Decoder,
    stage_c_latents: torch.Tensor,
    pooled: torch.Tensor,
    negative_pooled: torch.Tensor,
    image_size: tuple[int, int],
    settings: StageSettings = OFFICIAL_DECODER,
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Sample Stage A latents (B×4×H/4×W/4) from Stage C latents and the pooled prompt embedding;
    the unconditional branch gets zeros for the Stage C latents, as in the official code."""
    latents = stage_c_latents.to(decoder.device)
    cond = {"effnet": latents, "clip_text_pooled": pooled.to(decoder.device)}
    uncond = {"effnet": torch.zeros_like(latents), "clip_text_pooled": negative_pooled.to(decoder.device)}
    shape = stage_b_shape(*image_size, latents.shape[0])
    return sample(
        unet_denoiser(decoder.unet, decoder.dtype),
        shape,
        cond,
        uncond,
        settings,
        device=decoder.device,
        generator=generator,
        callback=callback,
        progress="Stage B",
    )


@torch.no_grad()
def decode_stage_a(decoder: Decoder, latents: torch.Tensor) -> torch.Tensor:
    """Stage A latents → pictures (B×3×H×W in [0, 1], float32, CPU)."""
    vqgan = decoder.vqgan
    scaled = latents.to(decoder.device, torch.float32) * vqgan.config.scale_factor
    return vqgan.decode(scaled).sample.clamp(0, 1).float().cpu()


def _effnet(prior: Prior) -> torch.nn.Module:
    if prior.effnet is None:
        raise ValueError(
            "this prior was loaded without the EfficientNet encoder: use load_prior(..., effnet=True)"
        )
    return prior.effnet


@torch.no_grad()
def encode_picture(prior: Prior, image: ImageInput, height: int, width: int) -> torch.Tensor:
    """One input picture → the Stage C latents (1×16×h×w) of a height×width generation, prepared as
    the official image-to-image and ControlNet examples prepare it: scaled (bilinear, antialiased) and
    centre-cropped straight to the encoder's input size — 768² for 1024², hence 24×24 latents — then
    normalized.

    For an output with a 1024 px short side and a picture of the output's aspect ratio this is exactly
    the official preparation (the official examples always scale to 768 px, whatever the output size;
    we scale with the output). For other pictures the official code keeps the picture's aspect ratio
    and Stage C gets latents of another shape than the output's, so we crop instead. (The
    reconstruction example prepares pictures differently: :func:`cascade_helpers.effnet.encode`.)
    """
    pixels = resize_and_crop(image_to_tensor(image), *encoder_input_size(height, width))
    return _effnet(prior)(effnet_normalize(pixels[None].to(prior.device))).float()


@torch.no_grad()
def variation_embeddings(prior: Prior, image: ImageInput) -> torch.Tensor:
    """One picture → its CLIP image embedding (1×1×E), prepared as the official image-variation
    example does: short side scaled to 768 px, then CLIP's own resize and centre crop. The picture
    keeps its aspect ratio whatever size the variations are generated at."""
    picture = scale_short_side(image_to_tensor(image), OFFICIAL_INPUT_SIDE)
    return encode_image_clip(prior, picture[None])


@torch.no_grad()
def preview_stage_c(prior: Prior, latents: torch.Tensor) -> torch.Tensor:
    """Stage C latents (B×16×h×w) → rough pictures (B×3×8h×8w in [0, 1], float32, CPU) with the
    previewer (4 M parameters): 192² for a 1024² image. What live previews show."""
    if prior.previewer is None:
        raise ValueError("this prior was loaded without the previewer: use load_prior(..., previewer=True)")
    return prior.previewer(latents.to(prior.device, torch.float32)).clamp(0, 1).cpu()


# --- whole generations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    """What every generation shares: the prompt, the size and count, the seed and both stages' settings."""

    prompt: str
    negative_prompt: str
    height: int
    width: int
    num_images: int
    seed: int
    prior_settings: StageSettings
    decoder_settings: StageSettings

    def __post_init__(self) -> None:
        check_size(self.height, self.width)
        _check_count(self.num_images)


def _run(
    prior: Prior,
    decoder: Decoder,
    request: _Request,
    *,
    image_embeds: torch.Tensor | None = None,
    stage_c_latents: torch.Tensor | None = None,
    x_init: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    control: Sequence[torch.Tensor | None] | None = None,
    extra: dict | None = None,
) -> Generation:
    r = request
    generator = _generator(r.seed)
    both = encode_text(prior, [r.prompt, r.negative_prompt])  # one text-encoder call for the two
    text = TextEmbeddings(both.hidden[:1], both.pooled[:1]).repeat(r.num_images)
    negative = TextEmbeddings(both.hidden[1:], both.pooled[1:]).repeat(r.num_images)
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
        )
    stage_b_latents = generate_stage_b(
        decoder,
        stage_c_latents,
        text.pooled,
        negative.pooled,
        (r.height, r.width),
        r.decoder_settings,
        generator=generator,
    )
    images = decode_stage_a(decoder, stage_b_latents)
    settings = {
        "prompt": r.prompt,
        "negative_prompt": r.negative_prompt,
        "seed": r.seed,
        "height": r.height,
        "width": r.width,
        "num_images": r.num_images,
        "prior": _settings_dict(r.prior_settings),
        "decoder": _settings_dict(r.decoder_settings),
        "prior_variant": prior.architecture,
        "decoder_variant": decoder.architecture,
        **(extra or {}),
    }
    return Generation(to_pil(images), stage_c_latents.cpu(), stage_b_latents.cpu(), settings)


def _run_from_latents(
    prior: Prior, decoder: Decoder, request: _Request, latents: torch.Tensor, noise_level: float, **kwargs
) -> Generation:
    """Stage C started from a picture's latents noised to ``noise_level`` (the official
    image-to-image start: the unshifted schedule for the noise, the usual shift for sampling), for
    ``int(steps × noise_level)`` steps; with no step left, the latents are decoded as they are."""
    steps = int(request.prior_settings.steps * noise_level)
    if steps == 0:
        return _run(prior, decoder, request, stage_c_latents=latents, **kwargs)
    noise = initial_noise(latents.shape, _generator(request.seed + 1), prior.device)
    settings = request.prior_settings.with_(t_start=noise_level, steps=steps)
    return _run(
        prior,
        decoder,
        replace(request, prior_settings=settings),
        x_init=diffuse(latents, noise_level, noise),
        **kwargs,
    )


def _settings_dict(settings: StageSettings) -> dict:
    return {
        k: getattr(settings, k)
        for k in ("steps", "guidance", "shift", "guidance_rescale", "sampler", "t_start")
    }


def text_to_image(
    prior: Prior,
    decoder: Decoder,
    prompt: str,
    negative_prompt: str = "",
    *,
    height: int = 1024,
    width: int = 1024,
    num_images: int = 1,
    seed: int = 0,
    prior_settings: StageSettings = OFFICIAL_PRIOR,
    decoder_settings: StageSettings = OFFICIAL_DECODER,
    callback: StepCallback | None = None,
) -> Generation:
    """Pictures from a prompt. ``callback(step, denoised, sample)`` runs after each Stage C step."""
    request = _Request(
        prompt, negative_prompt, height, width, num_images, seed, prior_settings, decoder_settings
    )
    return _run(prior, decoder, request, callback=callback)


def image_variation(
    prior: Prior,
    decoder: Decoder,
    image: ImageInput,
    prompt: str = "",
    negative_prompt: str = "",
    *,
    height: int = 1024,
    width: int = 1024,
    num_images: int = 1,
    seed: int = 0,
    prior_settings: StageSettings = OFFICIAL_PRIOR,
    decoder_settings: StageSettings = OFFICIAL_DECODER,
    callback: StepCallback | None = None,
) -> Generation:
    """Variations of a picture: Stage C conditioned on its CLIP image embedding
    (:func:`variation_embeddings`); no prompt needed (the official example uses none)."""
    request = _Request(
        prompt, negative_prompt, height, width, num_images, seed, prior_settings, decoder_settings
    )
    embeds = variation_embeddings(prior, image).repeat_interleave(num_images, 0)
    return _run(prior, decoder, request, image_embeds=embeds, callback=callback)


def image_to_image(
    prior: Prior,
    decoder: Decoder,
    image: ImageInput,
    prompt: str,
    negative_prompt: str = "",
    *,
    strength: float = 0.8,
    height: int = 1024,
    width: int = 1024,
    num_images: int = 1,
    seed: int = 0,
    prior_settings: StageSettings = OFFICIAL_PRIOR,
    decoder_settings: StageSettings = OFFICIAL_DECODER,
    callback: StepCallback | None = None,
) -> Generation:
    """Repaint a picture guided by a prompt. ``strength`` is the noise level the picture's Stage C
    latents are taken to before denoising (official example: 0.8): 0 keeps the picture's encoding
    as it is, 1 ignores the picture entirely; Stage C runs ``int(steps × strength)`` steps."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1] (0 keeps the picture, 1 ignores it), not {strength}")
    request = _Request(
        prompt, negative_prompt, height, width, num_images, seed, prior_settings, decoder_settings
    )
    extra = {"strength": strength}
    if strength == 1.0:
        return _run(prior, decoder, request, callback=callback, extra=extra)
    encoded = encode_picture(prior, image, height, width).repeat_interleave(num_images, 0)
    return _run_from_latents(prior, decoder, request, encoded, strength, callback=callback, extra=extra)


def controlnet_to_image(
    prior: Prior,
    decoder: Decoder,
    control: Sequence[torch.Tensor | None],
    prompt: str,
    negative_prompt: str = "",
    *,
    init_image: ImageInput | None = None,
    init_noise: float = 1.0,
    height: int = 1024,
    width: int = 1024,
    num_images: int = 1,
    seed: int = 0,
    prior_settings: StageSettings = OFFICIAL_PRIOR,
    decoder_settings: StageSettings = OFFICIAL_DECODER,
    callback: StepCallback | None = None,
    extra: dict | None = None,
) -> Generation:
    """Pictures that follow ControlNet features (:func:`cascade_helpers.controlnet.control_features`,
    computed once for ``num_images`` pictures) and a prompt.

    With ``init_image``, Stage C starts from that picture's latents noised to ``init_noise``, as the
    official inpainting and outpainting example does with noise level 1.0 (1 % of the picture's signal
    survives; ``int(steps × init_noise)`` steps). Without it, from pure noise (canny, super-resolution).
    """
    if not 0.0 <= init_noise <= 1.0:
        raise ValueError(
            f"init_noise must be in [0, 1] (0 keeps the picture's latents as they are), not {init_noise}"
        )
    batches = {c.shape[0] for c in control if c is not None}
    if batches != {num_images}:
        raise ValueError(
            f"the control features are for {sorted(batches)} pictures, not num_images={num_images}: "
            f"compute them with control_features(..., batch={num_images})"
        )
    request = _Request(
        prompt, negative_prompt, height, width, num_images, seed, prior_settings, decoder_settings
    )
    if init_image is None:
        return _run(prior, decoder, request, callback=callback, control=control, extra=extra)
    latents = encode_picture(prior, init_image, height, width).repeat_interleave(num_images, 0)
    return _run_from_latents(
        prior, decoder, request, latents, init_noise, callback=callback, control=control, extra=extra
    )


def demo_picture(models_dir: str | Path, stage_b: str = "big", stage_c: str = "big") -> Path:
    """Load the models in ``models_dir`` and save one 512² picture next to them (install check)."""
    from .loading import load_decoder, load_prior

    prior = load_prior(models_dir, stage_c, image_encoder=False, effnet=False)
    decoder = load_decoder(models_dir, stage_b)
    result = text_to_image(prior, decoder, "a photo of a red cat", height=512, width=512, seed=0)
    path = Path(models_dir).parent / "tiny_demo.png"
    result.images[0].save(path)
    return path
