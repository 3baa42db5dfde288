"""Text-to-image, image variation, image-to-image and ControlNet pictures: Stage C, then B, then A.

The four entry points chain the stages (:mod:`cascade_helpers.stages`) for one
:class:`~cascade_helpers.request.GenerationRequest` and return the pictures with every stage's latents
and cost, so a notebook can show, save or re-decode them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import PIL.Image
import torch

from . import values
from .conditioning import TextEmbeddings, encode_text
from .controlnet.model import ControlOutputs
from .images import ImageInput, image_to_tensor, to_pil
from .models import Decoder, Prior
from .request import GenerationRequest, _make_request, _Watch
from .sampling import diffuse, initial_noise
from .sizes import stage_c_shape
from .stages import _encode_picture, _variation_embeddings, decode_stage_a, generate_stage_b, generate_stage_c


class _StageCost(NamedTuple):
    """What one stage of a generation cost, for the table a notebook prints once."""

    seconds: float
    peak_gpu_bytes: int | None  # torch.cuda.max_memory_allocated during the stage; None on a CPU


@dataclass
class Generation:
    """Pictures and everything needed to reproduce or re-decode them, and what each stage cost."""

    images: list[PIL.Image.Image]
    stage_c_latents: torch.Tensor  # B×16×h×w, float32, CPU
    stage_b_latents: torch.Tensor  # B×4×H/4×W/4, float32, CPU
    settings: dict = field(default_factory=dict)  # prompt, seed, steps ... (saved in PNG metadata)
    costs: dict[str, _StageCost] = field(default_factory=dict)  # stage → (seconds, peak GPU bytes or None)

    def cost_table(self) -> str:
        """Each stage's seconds and peak GPU memory as one table to ``print`` (a CPU: wall time only)."""
        lines = [f"{'stage':<14}{'seconds':>9}  peak GPU memory"]
        for stage, (seconds, peak) in self.costs.items():
            memory = "CPU: wall time only" if peak is None else f"{peak / 2**30:.2f} GiB"
            lines.append(f"{stage:<14}{seconds:>9.2f}  {memory}")
        return "\n".join(lines)


@contextlib.contextmanager
def _measured(stage: str, device: torch.device, costs: dict[str, _StageCost]) -> Iterator[None]:
    """The per-stage cost (time after the GPU finished, peak allocation) a learner picks a memory mode by."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    yield
    if cuda:
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    costs[stage] = _StageCost(time.perf_counter() - start, peak)


@dataclass(frozen=True)
class _Start:
    """What the entry points add to the request's Stage C: variation, image-to-image, ControlNet."""

    image_embeds: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    noise_level: float = 1.0
    control: ControlOutputs | None = None


@torch.no_grad()
def _text_conditioning(prior: Prior, request: GenerationRequest) -> tuple[TextEmbeddings, TextEmbeddings]:
    """One encoder call for all pictures (each distinct text once), so every row has one length."""
    texts = list(dict.fromkeys(request.prompts + request.negative_prompts))
    encoded = encode_text(prior, texts, long_prompts=request.long_prompts)
    row = {text: i for i, text in enumerate(texts)}
    return (
        encoded.select([row[p] for p in request.prompts]),
        encoded.select([row[p] for p in request.negative_prompts]),
    )


def _stage_c(
    prior: Prior,
    request: GenerationRequest,
    text: tuple[TextEmbeddings, TextEmbeddings],
    generator: torch.Generator,
    start: _Start,
    watch: _Watch,
) -> torch.Tensor:
    """From latents, official image-to-image: noised unshifted, then ``int(steps × noise_level)`` steps."""
    settings, x_init = request.prior_settings, None
    if start.latents is not None:
        steps = int(settings.steps * start.noise_level)
        if steps == 0:
            return start.latents
        noise_generator = torch.Generator("cpu").manual_seed(request.seed + 1)
        noise = initial_noise(start.latents.shape, noise_generator, prior.device)
        settings = settings.with_(t_start=start.noise_level, steps=steps)
        x_init = diffuse(start.latents, start.noise_level, noise)
    shape = stage_c_shape(request.height, request.width, request.num_images)
    hooks = {"generator": generator, "callback": watch["callback"], "progress": watch["progress"]}
    inputs = {"image_embeds": start.image_embeds, "x_init": x_init, "control": start.control}
    return generate_stage_c(prior, *text, shape, settings, **hooks, **inputs)


def _generate(
    prior: Prior, decoder: Decoder, request: GenerationRequest, watch: _Watch, start: _Start, extra: dict
) -> Generation:
    """The chain all four entry points share, each stage measured; settings ``from_dict`` rebuilds."""
    costs: dict[str, _StageCost] = {}
    generator = torch.Generator("cpu").manual_seed(request.seed)  # CPU noise: the same on every device
    with _measured("text encoder", prior.device, costs):
        text, negative = _text_conditioning(prior, request)
    with _measured("Stage C", prior.device, costs):
        stage_c_latents = _stage_c(prior, request, (text, negative), generator, start, watch)
    with _measured("Stage B", decoder.device, costs):
        hooks = {"generator": generator, "callback": watch["decoder_callback"], "progress": watch["progress"]}
        pooled, size = (text.pooled, negative.pooled), (request.height, request.width)
        stage_b_latents = generate_stage_b(
            decoder, stage_c_latents, *pooled, size, request.decoder_settings, **hooks
        )
    with _measured("Stage A", decoder.device, costs):
        images = to_pil(decode_stage_a(decoder, stage_b_latents))
    variants = {"prior_variant": prior.architecture, "decoder_variant": decoder.architecture}
    settings = {**request.as_dict(), **variants, **extra}
    return Generation(images, stage_c_latents.cpu(), stage_b_latents.cpu(), settings, costs)


def text_to_image(
    prior: Prior,
    decoder: Decoder,
    prompt: str | Sequence[str] | GenerationRequest,
    negative_prompt: str | Sequence[str] = "",
    **options: Any,
) -> Generation:
    """Pictures from a prompt.

    Args:
        prior, decoder: the loaded models (:func:`cascade_helpers.loading.load_prior` / ``load_decoder``).
        prompt: a prompt, a list of prompts (one group of pictures each), or a :class:`GenerationRequest`.
        negative_prompt: what guidance steers away from (a string, or one per prompt).
        **options: any other :class:`GenerationRequest` field (``height``, ``seed`` ...), and the run's
            watchers: ``callback(step, denoised, sample)`` after each Stage C step (live previews),
            ``decoder_callback`` after each Stage B step, ``progress=False`` to hide the tqdm bars.

    Returns:
        A :class:`Generation`: the pictures, both stages' latents, the settings and each stage's cost.
    """
    request, watch = _make_request(prompt, negative_prompt, **options)
    return _generate(prior, decoder, request, watch, _Start(), {})


def image_variation(
    prior: Prior,
    decoder: Decoder,
    image: ImageInput,
    prompt: str | Sequence[str] | GenerationRequest = "",
    negative_prompt: str | Sequence[str] = "",
    **options: Any,
) -> Generation:
    """Variations of a picture: Stage C conditioned on its CLIP image embedding; no prompt needed.

    Args:
        image: the picture (file, PIL image, array or tensor).
        prior, decoder, prompt, negative_prompt, **options: as for :func:`text_to_image`.

    Returns:
        A :class:`Generation`.
    """
    request, watch = _make_request(prompt, negative_prompt, **options)
    embeds = _variation_embeddings(prior, image).repeat_interleave(request.num_images, 0)
    return _generate(prior, decoder, request, watch, _Start(image_embeds=embeds), {})


def image_to_image(
    prior: Prior,
    decoder: Decoder,
    image: ImageInput,
    prompt: str | Sequence[str] | GenerationRequest,
    negative_prompt: str | Sequence[str] = "",
    *,
    strength: float = 0.8,
    **options: Any,
) -> Generation:
    """Repaint a picture guided by a prompt.

    Args:
        image: the picture (file, PIL image, array or tensor), cover-cropped to the output's shape.
        strength: the noise level the picture's latents are taken to, 0 (keep) to 1 (ignore), official
            0.8: ``int(steps × strength)`` steps run.
        prior, decoder, prompt, negative_prompt, **options: as for :func:`text_to_image`.

    Returns:
        A :class:`Generation` whose settings also record ``strength``.
    """
    strength = values._fraction(strength, "strength", "0 keeps the picture, 1 ignores it")
    request, watch = _make_request(prompt, negative_prompt, **options)
    if strength == 1.0:
        image_to_tensor(image)  # unused at this strength, but a missing or broken picture is still named
        start = _Start()
    else:
        latents = _encode_picture(prior, image, request.height, request.width)
        start = _Start(latents=latents.repeat_interleave(request.num_images, 0), noise_level=strength)
    return _generate(prior, decoder, request, watch, start, {"strength": strength})


def controlnet_to_image(
    prior: Prior,
    decoder: Decoder,
    control: ControlOutputs,
    prompt: str | Sequence[str] | GenerationRequest,
    negative_prompt: str | Sequence[str] = "",
    *,
    init_image: ImageInput | None = None,
    init_noise: float = 1.0,
    **options: Any,
) -> Generation:
    """Pictures that follow ControlNet features and a prompt.

    Args:
        control: the ControlNet's outputs for ``num_images`` pictures (:func:`.controlnet.control_features`).
        init_image: Stage C starts from its latents noised to ``init_noise``, as official in- and
            outpainting does at 1.0 (1 % of its signal survives); without it, pure noise (canny, SR).
        init_noise: 0 keeps the picture's latents as they are; ``int(steps × init_noise)`` steps.
        prior, decoder, prompt, negative_prompt, **options: as for :func:`text_to_image`.

    Returns:
        A :class:`Generation`.
    """
    init_noise = values._fraction(init_noise, "init_noise", "0 keeps the picture's latents as they are")
    request, watch = _make_request(prompt, negative_prompt, **options)
    batches = {c.shape[0] for c in control if c is not None}
    if batches != {request.num_images}:
        raise ValueError(
            f"the control features are for {sorted(batches)} pictures, not num_images={request.num_images}: "
            f"compute them with control_features(..., batch={request.num_images})"
        )
    latents = None
    if init_image is not None:
        latents = _encode_picture(prior, init_image, request.height, request.width)
        latents = latents.repeat_interleave(request.num_images, 0)
    start = _Start(latents=latents, noise_level=init_noise, control=control)
    extra = {} if init_image is None else {"init_noise": init_noise}  # as image_to_image keeps its strength
    return _generate(prior, decoder, request, watch, start, extra)
