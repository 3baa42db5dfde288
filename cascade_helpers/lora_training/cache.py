"""Feature caches: EfficientNet latents, CLIP image embeddings and text embeddings, computed once and
kept on disk, keyed by file contents and a fingerprint of the encoder, so later epochs and later runs
never run the encoders again."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from ..atomic import _save_safetensors
from ..conditioning import encode_image_clip, encode_text
from ..effnet import encode as effnet_encode
from ..images import resize_and_crop
from ..models import Prior
from .data import TrainingImage, closest_bucket, crop_position, read_picture, scaled_size


def fingerprint(module: nn.Module) -> str:
    """A short hash of a model's first and last weights: cached features of another model (or other
    weights) are never reused."""
    digest = hashlib.sha1(type(module).__name__.encode())
    parameters = list(module.parameters())
    for p in (parameters[0], parameters[-1]):
        digest.update(str(tuple(p.shape)).encode())
        digest.update(p.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class CacheReport:
    """How many features were computed now and how many came from the disk cache."""

    latents_computed: int = 0
    latents_cached: int = 0
    texts_computed: int = 0
    texts_cached: int = 0
    text_encoded_each_step: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        line = (
            f"EfficientNet latents: {self.latents_computed} computed, {self.latents_cached} from the cache; "
            f"text embeddings: {self.texts_computed} computed, {self.texts_cached} from the cache"
        )
        if self.text_encoded_each_step:
            line += f"; {len(self.text_encoded_each_step)} caption(s) with a learned token are encoded at each step"
        return line


@dataclass
class CachedImage:
    latents: torch.Tensor  # 16 × h × w, float32
    image_embeds: torch.Tensor | None  # 1 × E, float32
    caption: str
    bucket: tuple[int, int]


def _cache_file(folder: Path, *parts: str) -> Path:
    return folder / f"{hashlib.sha1('|'.join(parts).encode()).hexdigest()[:24]}.safetensors"


def _load_or_compute(
    path: Path, compute: Callable[[], dict[str, torch.Tensor]]
) -> tuple[dict[str, torch.Tensor], bool]:
    if path.is_file():
        return load_file(str(path)), True
    tensors = {k: v.float() for k, v in compute().items()}
    _save_safetensors(path, tensors)  # atomic: a half-written cache file never looks complete
    return {k: v.detach().cpu() for k, v in tensors.items()}, False


def cache_images(
    prior: Prior,
    images: Sequence[TrainingImage],
    sizes: Sequence[tuple[int, int]],
    folder: Path,
    with_image_embeds: bool,
    report: CacheReport,
    *,
    crop: str = "center",
    seed: int = 0,
    max_image_size: int | None = None,
) -> list[CachedImage]:
    """EfficientNet latents (and CLIP image embeddings) of every picture, from the cache when there.

    Args:
        prior: the prior whose EfficientNet (and image encoder) encode the pictures.
        images: the pictures.
        sizes: the aspect buckets (EfficientNet input sizes); each picture goes to the closest.
        folder: the cache folder.
        with_image_embeds: also compute CLIP image embeddings.
        report: counts what was computed and what was read back.
        crop: ``"center"`` or ``"random"`` (:func:`.data.crop_position`).
        seed: the run's seed (random crops).
        max_image_size: pictures with a larger shorter side are scaled down to it first.

    Returns:
        One :class:`CachedImage` per picture, in order.
    """
    effnet = prior.require("effnet", "LoRA training")
    keys = [fingerprint(effnet), fingerprint(prior.image_encoder) if with_image_embeds else "-"]
    cached = []
    for image in tqdm(images, desc="caching latents", leave=False):
        # the bucket from the header's size: a picture already in the cache is never decoded
        bucket = closest_bucket(*scaled_size(*image.size, max_image_size), sizes)
        content = image.path.read_bytes()
        position = crop_position(crop, content, seed)
        settings = (f"crop={position}", f"max={max_image_size or None}")  # they change the latents
        path = _cache_file(
            folder / "latents", hashlib.sha1(content).hexdigest(), str(bucket), *keys, *settings
        )

        def compute(image=image, bucket=bucket, position=position):
            picture = read_picture(image.path, max_image_size)
            cropped = resize_and_crop(picture, *bucket, position)
            # as official training encodes: already at the bucket size, ImageNet normalization only
            tensors = {"latents": effnet_encode(effnet, cropped[None], downscale=False)[0]}
            if with_image_embeds:
                tensors["image_embeds"] = encode_image_clip(prior, cropped[None])[0]
            return tensors

        tensors, hit = _load_or_compute(path, compute)
        report.latents_cached += hit
        report.latents_computed += not hit
        cached.append(CachedImage(tensors["latents"], tensors.get("image_embeds"), image.caption, bucket))
    return cached


def cache_texts(
    prior: Prior, captions: Sequence[str], folder: Path, report: CacheReport
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Text conditioning (hidden 77×D, pooled 1×P) of each caption, from the cache when there.

    Args:
        prior: the prior whose text encoder encodes the captions (its fingerprint keys the cache).
        captions: the captions; each distinct one is encoded once.
        folder: the cache folder (``text/`` inside it).
        report: counts what was computed and what was read back.

    Returns:
        Caption → (hidden 77×1280, pooled 1×1280), float32, CPU.
    """
    key = fingerprint(prior.text_encoder)
    texts = {}
    for caption in dict.fromkeys(captions):
        path = _cache_file(folder / "text", caption, key)

        def compute(caption=caption):
            embeddings = encode_text(prior, caption)
            return {"hidden": embeddings.hidden[0], "pooled": embeddings.pooled[0]}

        tensors, hit = _load_or_compute(path, compute)
        report.texts_cached += hit
        report.texts_computed += not hit
        texts[caption] = (tensors["hidden"], tensors["pooled"])
    return texts
