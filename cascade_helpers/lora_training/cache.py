"""Feature caches: EfficientNet latents, CLIP image and text embeddings computed once, kept on disk keyed
by file contents and the encoder's fingerprint, so later epochs and runs never run the encoders again."""

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
from ..conditioning import _encode_image_clip, encode_text
from ..effnet import encode as effnet_encode
from ..images import resize_and_crop
from ..models import Prior
from .config import LoraTrainingConfig
from .data import TrainingImage, _crop_position, _read_picture, _scaled_size, bucket_sizes, closest_bucket


def _fingerprint(module: nn.Module) -> str:
    """Why: features of other weights must never be reused: a hash of the first and last weights keys them."""
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
    """A training picture as the loop reads it: its latents (and image embedding), caption, bucket."""

    latents: torch.Tensor  # 16 × h × w, float32
    image_embeds: torch.Tensor | None  # 1 × E, float32
    caption: str
    bucket: tuple[int, int]


def _cache_file(folder: Path, *parts: str) -> Path:
    """Why: a cache entry's name is a hash of everything that decides its contents."""
    return folder / f"{hashlib.sha1('|'.join(parts).encode()).hexdigest()[:24]}.safetensors"


def _load_or_compute(path: Path, compute: Callable[[], dict], report: CacheReport, kind: str) -> dict:
    """Why: every cache reads back what is there or computes and writes it (atomically), and counts which."""
    hit = path.is_file()
    counter = f"{kind}_{'cached' if hit else 'computed'}"
    setattr(report, counter, getattr(report, counter) + 1)
    if hit:
        return load_file(str(path))
    tensors = {k: v.float() for k, v in compute().items()}
    _save_safetensors(path, tensors)  # atomic: a half-written cache file never looks complete
    return {k: v.detach().cpu() for k, v in tensors.items()}


def _cache_images(
    prior: Prior,
    images: Sequence[TrainingImage],
    config: LoraTrainingConfig,
    folder: Path,
    report: CacheReport,
) -> list[CachedImage]:
    """Why: latents (and image embeddings) once, keyed by the bytes, bucket, encoders, crop and size."""
    effnet = prior.require("effnet", "LoRA training")
    with_image_embeds, most = config.image_embed_probability > 0, config.max_image_size
    keys = [_fingerprint(effnet), _fingerprint(prior.image_encoder) if with_image_embeds else "-"]
    sizes = bucket_sizes(config.resolution, config.aspect_ratios)
    cached = []
    for image in tqdm(images, desc="caching latents", leave=False):
        # the bucket from the header's size: a picture already in the cache is never decoded
        bucket = closest_bucket(*_scaled_size(*image.size, most), sizes)
        content = image.path.read_bytes()
        position = _crop_position(config.crop, content, config.seed)
        settings = (f"crop={position}", f"max={most or None}")  # they change the latents
        path = _cache_file(
            folder / "latents", hashlib.sha1(content).hexdigest(), str(bucket), *keys, *settings
        )

        def compute(image=image, bucket=bucket, position=position):
            cropped = resize_and_crop(_read_picture(image.path, most), *bucket, position)
            # as official training encodes: already at the bucket size, ImageNet normalization only
            tensors = {"latents": effnet_encode(effnet, cropped[None], downscale=False)[0]}
            if with_image_embeds:
                tensors["image_embeds"] = _encode_image_clip(prior, cropped[None])[0]
            return tensors

        tensors = _load_or_compute(path, compute, report, "latents")
        cached.append(CachedImage(tensors["latents"], tensors.get("image_embeds"), image.caption, bucket))
    return cached


def _cache_texts(
    prior: Prior, captions: Sequence[str], folder: Path, report: CacheReport
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Why: each distinct caption's text conditioning once, keyed by it and the text encoder's fingerprint."""
    key = _fingerprint(prior.text_encoder)
    texts = {}
    for caption in dict.fromkeys(captions):
        path = _cache_file(folder / "text", caption, key)

        def compute(caption=caption):
            embeddings = encode_text(prior, caption)
            return {"hidden": embeddings.hidden[0], "pooled": embeddings.pooled[0]}

        tensors = _load_or_compute(path, compute, report, "texts")
        texts[caption] = (tensors["hidden"], tensors["pooled"])
    return texts
