"""The three stages as plain functions over the loaded models — Stage C (:func:`generate_stage_c`),
Stage B (:func:`generate_stage_b`), Stage A (:func:`decode_stage_a`) — and the ways a picture enters
them (:func:`encode_picture` for image-to-image and ControlNet init pictures, :func:`variation_embeddings`
for image variation) or is looked at early (:func:`preview_stage_c`). :mod:`cascade_helpers.generation`
chains them; a notebook can call them one by one.

Each stage checks its result once for NaN or infinities (:func:`check_finite`): a black picture is
refused with its likely cause instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .conditioning import TextEmbeddings, encode_image_clip, no_image
from .controlnet.model import ControlOutputs, _controlled_denoiser
from .effnet import encode as effnet_encode
from .images import ImageInput, _scale_short_side, image_to_tensor, resize_and_crop
from .models import Decoder, Prior
from .sampling import OFFICIAL_DECODER, OFFICIAL_PRIOR, StageSettings, StepCallback, sample, unet_denoiser
from .sizes import encoder_input_size, stage_b_shape

OFFICIAL_INPUT_SIDE = 768  # the official examples scale input pictures to this short side first


class NonFiniteLatentsError(FloatingPointError):
    """A stage produced NaN or infinite values: the pictures would come out black."""


def check_finite(
    result: torch.Tensor,
    stage: str,
    model: torch.nn.Module,
    dtype: torch.dtype,
    weight_files: Sequence[Path],
    inputs: Mapping[str, Sequence[torch.Tensor | None]],
) -> None:
    """Raise :class:`NonFiniteLatentsError` if ``result`` holds NaN or infinities, naming the likely
    cause: an input that already held them, weights that hold them (a damaged file), or float16. The
    check is one cheap ``isfinite``; the diagnosis, which reads every weight, runs only when it fails.

    Args:
        result, stage: what the stage produced, and its name ("Stage C", "Stage B" ...) for the message.
        model, dtype: the stage's model, whose weights are examined on failure, and its precision.
        weight_files: the files the models were loaded from, named on failure.
        inputs: what went in, by description, examined on failure.
    """
    if torch.isfinite(result).all():
        return
    bad = (~torch.isfinite(result)).sum().item()
    causes = [
        f"{name} already held NaN or infinite values"
        + (" (a NaN input picture?)" if "picture" in name else "")
        for name, tensors in inputs.items()
        if any(t is not None and not torch.isfinite(t).all() for t in tensors)
    ]
    broken = [
        n for n, p in model.named_parameters() if p.device.type != "meta" and not torch.isfinite(p).all()
    ]
    if broken:
        named = [str(f) for f in weight_files] or ["the weight file"]
        causes.append(
            f"the {stage} weights hold NaN or infinite values ({len(broken)} tensors, e.g. {broken[0]}): a damaged "
            f"weight file ({', '.join(named)}). Run your download command again with --verify: it re-hashes "
            "every file and fetches again what differs"
        )
    if dtype == torch.float16:
        causes.append(
            f"{stage} ran in float16, whose range its activations exceed: load it with dtype=torch.bfloat16 "
            "or torch.float32"
        )
    if not causes:
        causes.append(
            "no input or weight holds NaN, so the computation overflowed: an extreme guidance or a float16 "
            "model, or a damaged weight file (run your download command again with --verify)"
        )
    raise NonFiniteLatentsError(
        f"{stage} produced NaN or infinite values ({bad:,} of {result.numel():,}): the pictures would be black. "
        f"Likely cause: {'; '.join(causes)}."
    )


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
    control: ControlOutputs | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Sample Stage C latents (B×16×h×w, float32) for text and optionally image conditioning.

    Args:
        prior: the loaded Stage C with its encoders.
        text, negative: the prompts' and negative prompts' text conditioning, B rows each (``encode_text``).
        shape: B×16×h×w (:func:`cascade_helpers.sizes.stage_c_shape`).
        settings: the sampler settings.
        generator: the random generator of the noise (drawn on the CPU).
        image_embeds: CLIP image embeddings (B×1×768) for image variation; zeros without.
        x_init: the starting latents, already noised to ``settings.t_start`` (image-to-image).
        callback: ``callback(step, denoised, sample)`` after every step.
        control: ControlNet features for the B pictures (:func:`.controlnet.control_features`); the
            guided batch's unconditional half gets the same, as in the official notebook.
        progress: False hides the tqdm progress bar (for a caller that shows its own).

    Returns:
        B×16×h×w latents, float32, on the prior's device (:class:`NonFiniteLatentsError` if not finite).
    """
    batch = shape[0]
    zeros = no_image(prior, batch)
    cond = {
        "clip_text": text.hidden,
        "clip_text_pooled": text.pooled,
        "clip_img": zeros if image_embeds is None else image_embeds.to(prior.device),
    }
    uncond = {"clip_text": negative.hidden, "clip_text_pooled": negative.pooled, "clip_img": zeros}
    denoiser = unet_denoiser(prior.unet, prior.dtype)
    if control is not None:
        cond["cnet"] = uncond["cnet"] = list(control)
        denoiser = _controlled_denoiser(prior.unet, prior.dtype)
    latents = sample(
        denoiser,
        shape,
        cond,
        uncond,
        settings,
        device=prior.device,
        generator=generator,
        x_init=x_init,
        callback=callback,
        progress="Stage C" if progress else False,
    )
    inputs = {
        "the prompt's text embeddings": (text.hidden, text.pooled),
        "the negative prompt's text embeddings": (negative.hidden, negative.pooled),
        "the image embeddings (image variation)": (image_embeds,),
        "the starting latents (x_init: the input picture's encoding)": (x_init,),
        "the ControlNet features": tuple(control or ()),
    }
    check_finite(latents, "Stage C", prior.unet, prior.dtype, prior.files[:1], inputs)
    return latents


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
    progress: bool = True,
) -> torch.Tensor:
    """Sample Stage A latents (B×4×H/4×W/4, float32) from Stage C latents.

    Args:
        decoder: the loaded Stage B and Stage A.
        stage_c_latents: B×16×h×w.
        pooled, negative_pooled: the prompts' and negative prompts' pooled text embeddings (B×1×1280);
            the unconditional branch also gets zero Stage C latents, as in the official code.
        image_size: (height, width) of the pictures.
        settings, generator, callback, progress: as for :func:`generate_stage_c`.

    Returns:
        B×4×H/4×W/4 latents, float32, on the decoder's device (NonFiniteLatentsError if not finite).
    """
    latents = stage_c_latents.to(decoder.device)
    cond = {"effnet": latents, "clip_text_pooled": pooled.to(decoder.device)}
    uncond = {"effnet": torch.zeros_like(latents), "clip_text_pooled": negative_pooled.to(decoder.device)}
    result = sample(
        unet_denoiser(decoder.unet, decoder.dtype),
        stage_b_shape(*image_size, latents.shape[0]),
        cond,
        uncond,
        settings,
        device=decoder.device,
        generator=generator,
        callback=callback,
        progress="Stage B" if progress else False,
    )
    inputs = {"the Stage C latents": (latents,), "the pooled text embeddings": (pooled, negative_pooled)}
    check_finite(result, "Stage B", decoder.unet, decoder.dtype, decoder.files[:1], inputs)
    return result


@torch.no_grad()
def decode_stage_a(decoder: Decoder, latents: torch.Tensor) -> torch.Tensor:
    """Stage A latents → pictures (B×3×H×W in [0, 1], float32, CPU).

    Args:
        decoder, latents: the loaded Stage B and A (A runs in float32), and B×4×H/4×W/4 latents.

    Returns:
        B×3×H×W in [0, 1], float32, CPU.
    """
    vqgan = decoder.vqgan
    scaled = latents.to(decoder.device, torch.float32) * vqgan.config.scale_factor
    pictures = vqgan.decode(scaled).sample
    check_finite(
        pictures, "Stage A", vqgan, torch.float32, decoder.files[1:], {"the Stage B latents": (latents,)}
    )
    return pictures.clamp(0, 1).float().cpu()


@torch.no_grad()
def encode_picture(prior: Prior, image: ImageInput, height: int, width: int) -> torch.Tensor:
    """One input picture → the Stage C latents of a height×width generation, prepared as the official
    image-to-image and ControlNet examples prepare it: scaled (bilinear, antialiased) and centre-cropped
    straight to the encoder's input size (768² for 1024², hence 24×24 latents), then normalized.

    For a 1024 px short side and a picture of the output's aspect ratio this is exactly the official
    preparation (which scales to 768 px whatever the output size; we scale with the output). Otherwise
    the official code keeps the picture's aspect ratio, giving latents of another shape: we crop.

    Args:
        prior, image: a prior loaded with ``effnet=True``, and the picture (file, PIL, array, tensor).
        height, width: the generation's size in pixels.

    Returns:
        1×16×h×w, float32, on the prior's device; a ValueError without the EfficientNet encoder.
    """
    encoder = prior.require("effnet", "encoding a picture (image-to-image, ControlNet init pictures)")
    pixels = resize_and_crop(image_to_tensor(image), *encoder_input_size(height, width))
    return effnet_encode(encoder, pixels[None], downscale=False)


@torch.no_grad()
def variation_embeddings(prior: Prior, image: ImageInput) -> torch.Tensor:
    """One picture → its CLIP image embedding, prepared as the official image-variation example does:
    short side to 768 px, then CLIP's resize and centre crop (aspect ratio kept, whatever the output's).

    Args:
        prior, image: a prior loaded with ``image_encoder=True``, and the picture.

    Returns:
        1×1×768, float32, on the prior's device; a ValueError without the image encoder.
    """
    picture = _scale_short_side(image_to_tensor(image), OFFICIAL_INPUT_SIDE)
    return encode_image_clip(prior, picture[None])


@torch.no_grad()
def preview_stage_c(prior: Prior, latents: torch.Tensor) -> torch.Tensor:
    """Stage C latents → rough pictures with the previewer (4 M parameters): what live previews show.

    Args:
        prior, latents: a prior loaded with ``previewer=True``, and B×16×h×w latents.

    Returns:
        B×3×8h×8w in [0, 1], float32, CPU (192² for a 1024² image); a ValueError without the previewer.
    """
    previewer = prior.require("previewer", "a preview of Stage C latents")
    return previewer(latents.to(prior.device, torch.float32)).clamp(0, 1).cpu()
