"""The three stages as plain functions over the loaded models, which :mod:`cascade_helpers.generation`
chains and a notebook can call one by one, and the ways a picture enters them (Stage C latents, a CLIP
embedding). Each stage checks its result once: a black picture (NaN or infinities) is refused with its
likely cause instead (a ``FloatingPointError``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .conditioning import TextEmbeddings, _encode_image_clip, no_image
from .controlnet.model import ControlOutputs, _controlled_denoiser
from .effnet import encode as effnet_encode
from .images import ImageInput, _scale_short_side, image_to_tensor, resize_and_crop
from .models import Decoder, Prior
from .sampling import OFFICIAL_DECODER, OFFICIAL_PRIOR, StageSettings, _sample, _StepCallback, unet_denoiser
from .sizes import _encoder_input_size, stage_b_shape


class _NonFiniteLatentsError(FloatingPointError):
    """Raised instead of black pictures, with the likely cause; catch it as ``FloatingPointError``."""


def _check_finite(
    result: torch.Tensor,
    stage: str,
    model: torch.nn.Module,
    dtype: torch.dtype,
    weight_files: Sequence[Path | None],
    inputs: Mapping[str, Sequence[torch.Tensor | None]],
) -> None:
    """One cheap ``isfinite`` per stage; the diagnosis, which reads every weight, only when it fails."""
    if torch.isfinite(result).all():
        return
    bad = (~torch.isfinite(result)).sum().item()
    causes = [
        f"{name} already held NaN or infinite values"
        + (" (a NaN input picture?)" if "picture" in name else "")
        for name, tensors in inputs.items()
        if any(t is not None and not torch.isfinite(t).all() for t in tensors)
    ]
    causes += _model_causes(stage, model, dtype, weight_files)
    if not causes:
        causes.append(
            "no input or weight holds NaN, so the computation overflowed: an extreme guidance or a float16 "
            "model, or a damaged weight file (run your download command again with --verify)"
        )
    raise _NonFiniteLatentsError(
        f"{stage} produced NaN or infinite values ({bad:,} of {result.numel():,}): the pictures would be black. "
        f"Likely cause: {'; '.join(causes)}."
    )


def _model_causes(
    stage: str, model: torch.nn.Module, dtype: torch.dtype, weight_files: Sequence[Path]
) -> list[str]:
    """The model's own NaN causes: weights that hold them (a damaged file), or float16's range."""
    causes = []
    broken = [
        n
        for n, p in model.named_parameters()
        if p.device.type != "meta" and not torch.isfinite(p.float()).all()
    ]
    if broken:
        named = [str(f) for f in weight_files if f] or ["the weight file"]
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
    return causes


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
    callback: _StepCallback | None = None,
    control: ControlOutputs | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Sample Stage C latents for text and optionally image conditioning.

    Args:
        prior: the loaded Stage C with its encoders.
        text, negative: the prompts' and negative prompts' conditioning, B rows each, of one length.
        shape, settings: B×16×h×w (:func:`cascade_helpers.sizes.stage_c_shape`), the sampler settings.
        generator: the CPU generator of the noise.
        image_embeds: CLIP image embeddings (B×1×768) for image variation; zeros without.
        x_init: the starting latents, already noised to ``settings.t_start`` (image-to-image).
        callback: ``callback(step, denoised, sample)`` after every step.
        control: ControlNet features for the B pictures, the same for the unconditional half (official).
        progress: False hides the tqdm progress bar.

    Returns:
        B×16×h×w latents, float32, on the prior's device (a ``FloatingPointError`` if not finite).
    """
    if text.hidden.shape[1] != negative.hidden.shape[1]:
        raise ValueError(
            f"the prompt's text embeddings are {text.hidden.shape[1]} tokens long and the negative prompt's "
            f"{negative.hidden.shape[1]}: encode both in one encode_text call (long_prompts pads every prompt "
            "of a call to the same number of windows)"
        )
    zeros = no_image(prior, shape[0])
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
    label = "Stage C" if progress else False
    latents = _sample(
        denoiser, shape, cond, uncond, settings, prior.device, generator, x_init, callback, label
    )
    inputs = {
        "the prompt's text embeddings": (text.hidden, text.pooled),
        "the negative prompt's text embeddings": (negative.hidden, negative.pooled),
        "the image embeddings (image variation)": (image_embeds,),
        "the starting latents (x_init: the input picture's encoding)": (x_init,),
        "the ControlNet features": tuple(control or ()),
    }
    _check_finite(latents, "Stage C", prior.unet, prior.dtype, [prior.stage_c_file], inputs)
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
    callback: _StepCallback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Sample Stage A latents from Stage C latents.

    Args:
        decoder, stage_c_latents: the loaded Stage B and Stage A, and B×16×h×w latents.
        pooled, negative_pooled: the prompts' and negative prompts' pooled text embeddings (B×1×1280).
        image_size: (height, width) of the pictures.
        settings, generator, callback, progress: as for :func:`generate_stage_c`.

    Returns:
        B×4×H/4×W/4 latents, float32, on the decoder's device (a ``FloatingPointError`` if not finite).
    """
    latents = stage_c_latents.to(decoder.device)
    cond = {"effnet": latents, "clip_text_pooled": pooled.to(decoder.device)}
    uncond = {"effnet": torch.zeros_like(latents), "clip_text_pooled": negative_pooled.to(decoder.device)}
    denoiser, shape = unet_denoiser(decoder.unet, decoder.dtype), stage_b_shape(*image_size, latents.shape[0])
    label = "Stage B" if progress else False
    result = _sample(
        denoiser, shape, cond, uncond, settings, decoder.device, generator, None, callback, label
    )
    inputs = {"the Stage C latents": (latents,), "the pooled text embeddings": (pooled, negative_pooled)}
    _check_finite(result, "Stage B", decoder.unet, decoder.dtype, [decoder.stage_b_file], inputs)
    return result


@torch.no_grad()
def decode_stage_a(decoder: Decoder, latents: torch.Tensor) -> torch.Tensor:
    """Stage A latents → pictures.

    Args:
        decoder, latents: the loaded Stage B and A (A runs in float32), and B×4×H/4×W/4 latents.

    Returns:
        B×3×H×W in [0, 1], float32, CPU.
    """
    vqgan = decoder.vqgan
    scaled = latents.to(decoder.device, torch.float32) * vqgan.config.scale_factor
    pictures = vqgan.decode(scaled).sample
    inputs = {"the Stage B latents": (latents,)}
    _check_finite(pictures, "Stage A", vqgan, torch.float32, [decoder.stage_a_file], inputs)
    return pictures.clamp(0, 1).float().cpu()


@torch.no_grad()
def _encode_picture(prior: Prior, image: ImageInput, height: int, width: int) -> torch.Tensor:
    """Cover-cropped straight to the encoder's input (768² for 1024²), so the latents fit any output:
    the official code scales to a 768 px short side and keeps the picture's ratio (the same only for
    outputs of that ratio)."""
    encoder = prior.require("effnet", "encoding a picture (image-to-image, ControlNet init pictures)")
    pixels = resize_and_crop(image_to_tensor(image), *_encoder_input_size(height, width))
    return effnet_encode(encoder, pixels[None], downscale=False)


@torch.no_grad()
def _variation_embeddings(prior: Prior, image: ImageInput) -> torch.Tensor:
    """The official image variation's CLIP input: short side to 768 px first, whatever the output."""
    picture = _scale_short_side(image_to_tensor(image), 768)
    return _encode_image_clip(prior, picture[None])


@torch.no_grad()
def preview_stage_c(prior: Prior, latents: torch.Tensor) -> torch.Tensor:
    """Stage C latents → rough pictures with the previewer (4 M parameters): what live previews show.

    Args:
        prior, latents: a prior loaded with ``previewer=True``, and B×16×h×w latents.

    Returns:
        B×3×8h×8w in [0, 1], float32, CPU (192² for 1024²); a ValueError without the previewer.
    """
    previewer = prior.require("previewer", "a preview of Stage C latents")
    return previewer(latents.to(prior.device, torch.float32)).clamp(0, 1).cpu()
