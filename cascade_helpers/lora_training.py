"""Train a Stage C LoRA, and new tokens, on a folder of pictures: the official objective, made practical.

**The objective is the official one** (``train/train_c_lora.py`` with its ``gdf``), so a LoRA
trained here works on the real model: clean EfficientNet latents noised at a random time
t = (1 − U) + 0.001 on the cosine schedule (logSNR clamped to the variance range [1e-4, 0.9999],
shift 1), variance-preserving scaling, the model conditioned on the cosine time of that logSNR
(``noise_condition``), predicting the noise (epsilon target), the per-sample MSE weighted by the
P2 weight 1 / (1 + SNR). Captions are dropped (empty prompt) 5% of the time, and 10% of the
samples also get their CLIP image embedding, as the official ``get_conditions`` does. The Stage C
runs in eval mode (no dropout), as the official LoRA run does after its first step. AdamW, gradient
clipping at 1.0, learning rate 1e-4, LoRA rank 4 on attention (see :mod:`cascade_helpers.lora`).
Pictures are resized to cover an aspect bucket of the official ``Bucketeer`` (area
(¾·resolution)², sides multiples of 32, the official ratios) and centre-cropped; the EfficientNet
sees them at that size with ImageNet normalization, as in official training.

**Added around it** (as SimpleTuner's Stage C guide does): the EfficientNet latents, CLIP image
embeddings and text embeddings are computed once and cached on disk (keyed by file contents and a
fingerprint of the encoders), so later epochs and later runs never run the encoders — except the
text encoder for captions that contain a learned token: the gradient reaches the token's embedding
through it. Aspect buckets, gradient checkpointing, bf16 autocast, gradient accumulation, optional
EMA of the trained weights, checkpoints every N steps that a re-run resumes from (Ctrl-C / the
notebook's stop button saves one and stops cleanly), validation pictures every N steps through
Stage C and the decoder (or the previewer), and ``accelerate`` for several GPUs::

    accelerate launch -m cascade_helpers.lora_training --config outputs/lora/run.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import PIL.Image
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.transforms import functional as TF
from tqdm.auto import tqdm

from .conditioning import encode_image_clip, encode_text, text_conditioning
from .display import image_grid
from .effnet import IMAGENET_MEAN, IMAGENET_STD, STRIDE
from .generation import check_size, generate_stage_c, preview_stage_c, stage_c_shape, text_to_image
from .images import image_to_tensor, images_in_folder, resize_and_crop, to_pil
from .loading import Decoder, Prior
from .lora import (
    ATTENTION_TARGETS,
    COMFYUI_PREFIX,
    LoraFactors,
    NewToken,
    initial_token_rows,
    inject_lora,
    lora_factors,
    save_comfyui,
    save_lora,
    token_embedding,
)
from .sampling import (
    OFFICIAL_DECODER,
    OFFICIAL_PRIOR,
    diffuse,
    log_snr,
    noise_condition,
    p2_loss_weight,
    training_times,
)

#: the official config's ``multi_aspect_ratio`` (width / height); the reciprocals are added
OFFICIAL_ASPECT_RATIOS = ("1/1", "1/2", "1/3", "2/3", "3/4", "1/5", "2/5", "3/5", "4/5", "1/6", "5/6", "9/16")
EFFNET_SCALE = 3 / 4  # EfficientNet input side / picture side: 768 px for a 1024 px picture
LORA_FILE = "lora.safetensors"


class TrainingError(ValueError):
    """Training cannot start or resume as asked (no pictures, an incompatible checkpoint ...)."""


# --- the settings ------------------------------------------------------------------------------------


@dataclass
class LoraTrainingConfig:
    """Everything a run needs; saved with every checkpoint and as JSON for ``accelerate launch``.

    ``steps`` counts optimizer updates, each over ``batch_size × gradient_accumulation`` pictures
    per GPU. ``resolution`` is the picture side the buckets are made for (their area is
    resolution²), also the validation size. ``new_tokens``: ``(token, regex)`` pairs as in the
    official ``train_tokens``, e.g. ``[("[chelsea]", "^cat</w>")]``.
    """

    images: str
    output_dir: str
    new_tokens: list[NewToken] = field(default_factory=list)
    rank: int = 4
    alpha: float = 1.0
    targets: str | list[str] = ATTENTION_TARGETS
    resolution: int = 1024
    aspect_ratios: list[str] = field(default_factory=lambda: list(OFFICIAL_ASPECT_RATIOS))
    batch_size: int = 1
    gradient_accumulation: int = 4
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    steps: int = 1000
    precision: str = "bf16"  # autocast on the GPU; "fp32" for none
    gradient_checkpointing: bool = True
    ema_decay: float | None = None
    caption_dropout: float = 0.05
    image_embed_probability: float = 0.1
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    validate_every: int = 100
    validation_prompts: list[str] = field(default_factory=list)
    validation_prior_steps: int = 20
    validation_decoder_steps: int = 10
    seed: int = 0
    cache_dir: str | None = None  # default <output_dir>/cache; share it between runs on the same pictures
    # read by the command line only (a notebook passes loaded models)
    models_dir: str = "models"
    stage_c: str = "big"
    stage_b: str = "lite"
    dtype: str = "bf16"

    #: settings a checkpoint must share with the run that resumes it
    RESUME_KEYS = (
        "new_tokens",
        "rank",
        "alpha",
        "targets",
        "resolution",
        "aspect_ratios",
        "batch_size",
        "gradient_accumulation",
        "seed",
    )

    def __post_init__(self) -> None:
        self.new_tokens = [tuple(t) for t in self.new_tokens]
        if not (
            isinstance(self.resolution, int) and 256 <= self.resolution <= 2048 and self.resolution % 128 == 0
        ):
            raise ValueError(
                f"resolution must be a multiple of 128 from 256 to 2048 (1024 as released), not {self.resolution!r}"
            )
        if self.validation_prompts:
            check_size(self.resolution, self.resolution)  # validation pictures are generated at this size
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be 'bf16' or 'fp32', not {self.precision!r}")
        for name in ("rank", "batch_size", "gradient_accumulation", "steps", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> LoraTrainingConfig:
        return cls(**json.loads(Path(path).read_text()))


# --- the pictures ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingImage:
    path: Path
    caption: str


def caption_for(path: Path) -> str:
    """The sidecar ``<name>.txt`` if there is one, else the file name: underscores become spaces and
    a trailing number (``_03``, `` (2)``) is dropped, so ``[chelsea]_on_a_sofa_02.png`` reads
    "[chelsea] on a sofa"."""
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        return sidecar.read_text(encoding="utf-8").strip()
    name = re.sub(r"[\s_-]*(\(\d+\)|\d+)$", "", path.stem)
    return re.sub(r"[_\s]+", " ", name).strip()


def find_training_images(folder: str | Path) -> list[TrainingImage]:
    folder = Path(folder)
    if not folder.is_dir():
        raise TrainingError(f"no folder of training pictures at {folder}")
    found = [TrainingImage(p, caption_for(p)) for p in images_in_folder(folder)]
    if not found:
        raise TrainingError(f"{folder} holds no pictures (.png, .jpg, .webp ...)")
    return found


def bucket_sizes(resolution: int, ratios: Sequence[str]) -> list[tuple[int, int]]:
    """EfficientNet input sizes (height, width) of the official ``Bucketeer``: area (¾·resolution)²,
    sides floored to multiples of 32, one per ratio and its reciprocal."""
    values = [float(Fraction(r)) for r in ratios]
    values += [1 / v for v in values if 1 / v not in values]
    density = (resolution * EFFNET_SCALE) ** 2
    return [
        (int((density / r) ** 0.5 // STRIDE * STRIDE), int((density * r) ** 0.5 // STRIDE * STRIDE))
        for r in values
    ]


def closest_bucket(height: int, width: int, sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose width/height ratio is closest to the picture's (the official choice)."""
    return min(sizes, key=lambda s: abs(width / height - s[1] / s[0]))


def write_example_images(folder: str | Path, token: str = "[chelsea]") -> Path:
    """Six training pictures of one cat, offline: scikit-image's ``chelsea`` photo (shipped with
    the package) cropped and mirrored into landscape, square and portrait shots; four captioned by
    a sidecar ``.txt``, two by their file name."""
    from skimage import data

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    photo = PIL.Image.fromarray(data.chelsea())  # 451 × 300
    mirrored = photo.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
    shots = {
        "chelsea_sofa": (photo, f"a photo of {token} the cat on a sofa"),
        "chelsea_face": (photo.crop((90, 0, 390, 300)), f"a close-up photo of {token} the cat"),
        "chelsea_portrait": (photo.crop((120, 0, 320, 300)), f"a portrait photo of {token} the cat"),
        "chelsea_mirrored": (mirrored.crop((61, 0, 361, 300)), f"a photo of {token} the cat, looking left"),
        f"a_photo_of_{token}_the_cat_01": (mirrored, None),
        f"a_photo_of_{token}_the_cat_02": (mirrored.crop((100, 20, 300, 300)), None),
    }
    for name, (picture, caption) in shots.items():
        picture.save(folder / f"{name}.png")
        if caption:
            (folder / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
    return folder


# --- caches ------------------------------------------------------------------------------------------


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
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in compute().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    save_file(tensors, str(temporary))
    os.replace(temporary, path)  # a half-written cache file never looks complete
    return tensors, False


@torch.no_grad()
def encode_for_training(prior: Prior, picture: torch.Tensor) -> torch.Tensor:
    """One picture already at its bucket size (3×H×W in [0, 1]) → Stage C latents, as official
    training encodes: ImageNet normalization, no further resize."""
    normalized = TF.normalize(picture[None].to(prior.device, torch.float32), IMAGENET_MEAN, IMAGENET_STD)
    return prior.effnet(normalized)[0].float()


def cache_images(
    prior: Prior,
    images: Sequence[TrainingImage],
    sizes: Sequence[tuple[int, int]],
    folder: Path,
    with_image_embeds: bool,
    report: CacheReport,
) -> list[CachedImage]:
    """EfficientNet latents (and CLIP image embeddings) of every picture, from the cache when there."""
    if prior.effnet is None:
        raise TrainingError("training needs the EfficientNet encoder: load_prior(..., effnet=True)")
    keys = [fingerprint(prior.effnet), fingerprint(prior.image_encoder) if with_image_embeds else "-"]
    cached = []
    for image in tqdm(images, desc="caching latents", leave=False):
        picture = image_to_tensor(image.path)
        bucket = closest_bucket(*picture.shape[-2:], sizes)
        content = hashlib.sha1(image.path.read_bytes()).hexdigest()
        path = _cache_file(folder / "latents", content, str(bucket), *keys)

        def compute(picture=picture, bucket=bucket):
            cropped = resize_and_crop(picture, *bucket)
            tensors = {"latents": encode_for_training(prior, cropped)}
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
    """Text conditioning (hidden 77×D, pooled 1×P) of each caption, from the cache when there."""
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


# --- learned tokens ----------------------------------------------------------------------------------


class NewTokenEmbedding(nn.Module):
    """The text encoder's token embedding with trainable rows for tokens added after its vocabulary:
    only those rows learn (the official ``ReToken`` trains deltas on the same rows)."""

    def __init__(self, base: nn.Embedding, rows: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.rows = nn.Parameter(rows.detach().float().clone())

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.base.weight, self.rows.to(self.base.weight.dtype)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        size = self.base.num_embeddings
        known = self.base(ids.clamp(max=size - 1))
        new = self.rows.to(known.dtype)[(ids - size).clamp(min=0)]
        return torch.where((ids >= size)[..., None], new, known)


def install_new_tokens(prior: Prior, new_tokens: Sequence[NewToken]) -> NewTokenEmbedding | None:
    """Add ``new_tokens`` to the tokenizer, initialized the official way, with trainable embeddings."""
    if not new_tokens:
        return None
    rows = initial_token_rows(prior.text_encoder, prior.tokenizer, new_tokens)
    module = NewTokenEmbedding(token_embedding(prior.text_encoder), torch.stack(list(rows.values()))).to(
        prior.device
    )
    prior.text_encoder.text_model.embeddings.token_embedding = module
    return module


# --- the objective -----------------------------------------------------------------------------------


def stage_c_loss(
    unet: nn.Module,
    latents: torch.Tensor,
    conditions: dict[str, torch.Tensor],
    times: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """The official training loss of one batch: noise ``latents`` to ``times``, predict the noise
    from the cosine-time condition, per-sample MSE weighted by P2, averaged over the batch."""
    dtype = next(unet.parameters()).dtype
    snr = log_snr(times)
    noised = diffuse(latents, times, noise)
    inputs = {k: v.to(dtype) for k, v in conditions.items()}
    prediction = unet(noised.to(dtype), noise_condition(snr).to(dtype), return_dict=False, **inputs)[0]
    per_sample = F.mse_loss(prediction.float(), noise, reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * p2_loss_weight(snr)).mean()


def batch_schedule(
    buckets: dict[tuple[int, int], list[int]], batch_size: int, seed: int
) -> Iterator[list[int]]:
    """An endless, reproducible stream of batches: each epoch shuffles every bucket, cuts it into
    batches (the last may be smaller: small datasets lose no picture) and shuffles the batches."""
    for epoch in itertools.count():
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        batches = []
        for size in sorted(buckets):
            members = [buckets[size][i] for i in torch.randperm(len(buckets[size]), generator=generator)]
            batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
        yield from (batches[i] for i in torch.randperm(len(batches), generator=generator))


# --- stopping on Ctrl-C ------------------------------------------------------------------------------


@contextlib.contextmanager
def stop_on_interrupt() -> Iterator[dict]:
    """While active, Ctrl-C (the notebook's stop button) only asks the loop to stop after the current
    step, so the checkpoint it then saves is consistent; a second Ctrl-C aborts at once."""
    state = {"requested": False}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def request(signum, frame):
        if state["requested"]:
            raise KeyboardInterrupt
        state["requested"] = True
        tqdm.write(
            "stopping after this step and saving a checkpoint (interrupt again to abort without saving)"
        )

    previous = signal.signal(signal.SIGINT, request)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous)


# --- the trainer -------------------------------------------------------------------------------------


@dataclass
class TrainingResult:
    step: int
    losses: list[tuple[int, float]]
    interrupted: bool
    checkpoint: Path | None
    lora: Path | None


LossCallback = Callable[[int, float], None]
ValidationCallback = Callable[[int, list[PIL.Image.Image], list[str]], None]


class LoraTrainer:
    """Trains a LoRA (and new tokens) on ``prior`` in place. ``decoder`` makes validation pictures
    full pictures; without it they are the previewer's rough ones. Create it, call :meth:`prepare`
    (caches; optional), :meth:`train` (resumes from the latest checkpoint), then :meth:`save`."""

    def __init__(
        self, prior: Prior, config: LoraTrainingConfig, decoder: Decoder | None = None, accelerator=None
    ) -> None:
        from accelerate import Accelerator

        self.prior, self.config, self.decoder = prior, config, decoder
        self.accelerator = accelerator or Accelerator()
        self.output_dir = Path(config.output_dir)
        self.items: list[CachedImage] = []
        self.texts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.report: CacheReport | None = None
        self.tokens: NewTokenEmbedding | None = None
        self.losses: list[tuple[int, float]] = []
        self.step = 0
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + self.accelerator.process_index)
        self._check_placement()

    # -- set-up ---------------------------------------------------------------------------------------

    def _check_placement(self) -> None:
        for name in ("unet", "text_encoder"):
            device = next(getattr(self.prior, name).parameters()).device
            if device != self.prior.device:
                raise TrainingError(
                    f"the prior's {name} is on {device}, not {self.prior.device}: load it with memory='gpu' to train"
                )

    @property
    def cache_dir(self) -> Path:
        return Path(self.config.cache_dir) if self.config.cache_dir else self.output_dir / "cache"

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def prepare(self) -> CacheReport:
        """Cache the features (main process first, the others then read the cache), add the LoRA and
        the new tokens, set up the optimizer. Idempotent."""
        if self.report is not None:
            return self.report
        config, prior = self.config, self.prior
        images = find_training_images(config.images)
        self._check_tokens_in_captions(images)
        report = CacheReport()
        with_image_embeds = config.image_embed_probability > 0 and prior.image_encoder is not None
        with self.accelerator.main_process_first():
            sizes = bucket_sizes(config.resolution, config.aspect_ratios)
            self.items = cache_images(prior, images, sizes, self.cache_dir, with_image_embeds, report)
            plain = [c for c in {i.caption for i in images} if not self._has_new_token(c)] + [""]
            self.texts = cache_texts(prior, plain, self.cache_dir, report)
        report.text_encoded_each_step = sorted({i.caption for i in images if self._has_new_token(i.caption)})
        with torch.random.fork_rng(devices=[]):  # peft draws lora_A from the global generator: seed it
            torch.manual_seed(config.seed)
            inject_lora(prior.unet, config.rank, config.alpha, config.targets)
        self.tokens = install_new_tokens(prior, config.new_tokens)
        if config.gradient_checkpointing:
            prior.unet.enable_gradient_checkpointing()
        self.trainable = [p for p in prior.unet.parameters() if p.requires_grad] + (
            [self.tokens.rows] if self.tokens else []
        )
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.learning_rate)
        warmup = max(config.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1))
        )
        self.ema = [p.detach().float().clone() for p in self.trainable] if config.ema_decay else None
        self.report = report
        return report

    def _has_new_token(self, caption: str) -> bool:
        return any(token in caption for token, _ in self.config.new_tokens)

    def _check_tokens_in_captions(self, images: Sequence[TrainingImage]) -> None:
        for token, _ in self.config.new_tokens:
            if not any(token in i.caption for i in images):
                raise TrainingError(
                    f"no caption mentions {token}: it would never be learned. Put it in the captions (sidecar .txt or file names)"
                )

    # -- one step -------------------------------------------------------------------------------------

    def _conditions(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Text (cached, or encoded with gradients for learned tokens), pooled text, CLIP image: the
        official mix of 5% empty captions and 10% image embeddings."""
        config, device = self.config, self.prior.device
        count = len(indices)
        dropped = (torch.rand(count, generator=self.generator) < config.caption_dropout).tolist()
        with_image = (torch.rand(count, generator=self.generator) < config.image_embed_probability).tolist()
        captions = ["" if drop else self.items[i].caption for i, drop in zip(indices, dropped, strict=True)]
        encoded = iter(())
        fresh = [c for c in captions if c not in self.texts]
        if fresh:
            embeddings = text_conditioning(self.prior, fresh)
            encoded = zip(embeddings.hidden, embeddings.pooled, strict=True)
        hidden, pooled = zip(
            *[self.texts[c] if c in self.texts else next(encoded) for c in captions], strict=True
        )
        width = self.prior.unet.config.clip_image_in_channels
        images = [
            self.items[i].image_embeds
            if use and self.items[i].image_embeds is not None
            else torch.zeros(1, width)
            for i, use in zip(indices, with_image, strict=True)
        ]
        return {
            "clip_text": torch.stack([h.to(device) for h in hidden]),
            "clip_text_pooled": torch.stack([p.to(device) for p in pooled]),
            "clip_img": torch.stack(images).to(device),
        }

    def batch_loss(self, indices: list[int]) -> torch.Tensor:
        latents = torch.stack([self.items[i].latents for i in indices]).to(self.prior.device)
        conditions = self._conditions(indices)
        times = training_times(len(indices), self.generator).to(self.prior.device)
        noise = torch.randn(latents.shape, generator=self.generator).to(self.prior.device)
        autocast = torch.autocast(
            self.prior.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16"
        )
        with autocast:
            return stage_c_loss(self.prior.unet, latents, conditions, times, noise)

    def _average_gradients(self) -> None:
        if self.accelerator.num_processes == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.trainable]
        flat = self.accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
        for p, g in zip(self.trainable, flat.split([g.numel() for g in grads]), strict=True):
            p.grad = g.view_as(p)

    def _optimizer_step(self, batches: Iterator[list[int]]) -> float:
        losses = []
        for _ in range(self.config.gradient_accumulation):
            loss = self.batch_loss(next(batches))
            (loss / self.config.gradient_accumulation).backward()
            losses.append(loss.item())
        self._average_gradients()
        torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                for average, p in zip(self.ema, self.trainable, strict=True):
                    average.lerp_(p.detach().float(), 1 - self.config.ema_decay)
        return sum(losses) / len(losses)

    def _batches(self) -> Iterator[list[int]]:
        """This process's share of the batch stream, from where the run stands."""
        buckets: dict[tuple[int, int], list[int]] = {}
        for i, item in enumerate(self.items):
            buckets.setdefault(item.bucket, []).append(i)
        stream = batch_schedule(buckets, self.config.batch_size, self.config.seed)
        processes, index = self.accelerator.num_processes, self.accelerator.process_index
        done = self.step * self.config.gradient_accumulation * processes
        return itertools.islice(stream, done + index, None, processes)

    # -- the loop -------------------------------------------------------------------------------------

    def train(
        self, on_step: LossCallback | None = None, on_validation: ValidationCallback | None = None
    ) -> TrainingResult:
        """Train up to ``config.steps`` updates, continuing from the latest checkpoint. ``on_step(step,
        loss)`` runs after each update and ``on_validation(step, pictures, prompts)`` after each
        validation, on the main process. Ctrl-C saves a checkpoint and returns (``interrupted``)."""
        self.prepare()
        self.resume()
        config, main = self.config, self.accelerator.is_main_process
        batches = self._batches()
        bar = tqdm(total=config.steps, initial=self.step, desc="training", disable=not main)
        interrupted, checkpoint = False, None
        with stop_on_interrupt() as interrupt:
            while self.step < config.steps:
                loss = self._optimizer_step(batches)
                self.step += 1
                self.losses.append((self.step, loss))
                bar.update()
                bar.set_postfix(loss=f"{loss:.4f}")
                if on_step and main:
                    on_step(self.step, loss)
                interrupted = self._stop_requested(interrupt["requested"])
                last = self.step == config.steps
                if interrupted or last or self.step % config.checkpoint_every == 0:
                    checkpoint = self.save_checkpoint()
                if config.validation_prompts and (
                    last or (config.validate_every and self.step % config.validate_every == 0)
                ):
                    self.validate(on_validation)
                if interrupted:
                    tqdm.write(
                        f"stopped at step {self.step}; checkpoint saved in {checkpoint}. Run train() again to continue."
                    )
                    break
        bar.close()
        lora = self.save() if self.step >= config.steps else None
        return TrainingResult(self.step, list(self.losses), interrupted, checkpoint, lora)

    def _stop_requested(self, requested: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return requested
        flag = torch.tensor(float(requested), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    # -- EMA, saving ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def trained_weights(self) -> Iterator[None]:
        """The weights that get saved: the EMA ones when EMA is on (swapped in for the duration)."""
        if self.ema is None:
            yield
            return
        live = [p.detach().clone() for p in self.trainable]
        with torch.no_grad():
            for p, average in zip(self.trainable, self.ema, strict=True):
                p.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.trainable, live, strict=True):
                    p.copy_(value)

    def learned(self) -> tuple[dict[str, LoraFactors], dict[str, torch.Tensor]]:
        """The trained LoRA factors and new-token embedding rows (EMA weights when EMA is on)."""
        with self.trained_weights():
            factors = lora_factors(self.prior.unet)
            rows = self.tokens.rows.detach().clone() if self.tokens else []
        return factors, {token: row for (token, _), row in zip(self.config.new_tokens, rows, strict=True)}

    def save(self, path: str | Path | None = None) -> Path:
        """Write the LoRA and the learned tokens in our format (default ``<output_dir>/lora.safetensors``)."""
        factors, tokens = self.learned()
        path = Path(path) if path else self.output_dir / LORA_FILE
        if self.accelerator.is_main_process:
            save_lora(path, factors, tokens)
        return path

    def export_comfyui(self, path: str | Path, prefix: str = COMFYUI_PREFIX) -> list[Path]:
        """Write the LoRA in ComfyUI/kohya keys (and the tokens as ComfyUI embeddings)."""
        factors, tokens = self.learned()
        return save_comfyui(path, factors, tokens, prefix)

    # -- checkpoints ----------------------------------------------------------------------------------

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        names = {id(p): n for n, p in self.prior.unet.named_parameters()}
        state = {f"param.{names.get(id(p), 'tokens')}": p.detach() for p in self.trainable}
        if self.ema is not None:
            state |= {
                f"ema.{names.get(id(p), 'tokens')}": e for p, e in zip(self.trainable, self.ema, strict=True)
            }
        return {k: v.float().cpu().contiguous() for k, v in state.items()}

    def save_checkpoint(self) -> Path:
        """Everything needed to continue exactly: trained weights, EMA, optimizer, schedule, step, the
        random generators' states (one per process) and the loss history. Written to a temporary
        folder first, so an interrupted save never hides the previous checkpoint."""
        accelerator, main = self.accelerator, self.accelerator.is_main_process
        final = self.checkpoint_dir / f"step-{self.step:06d}"
        temporary = final.with_name(final.name + ".tmp")
        accelerator.wait_for_everyone()
        if main:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        accelerator.wait_for_everyone()
        torch.save(self.generator.get_state(), temporary / f"rng-{accelerator.process_index}.pt")
        if main:
            save_file(self._trainable_state(), str(temporary / "trainable.safetensors"))
            state = {
                "step": self.step,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "losses": self.losses,
                "config": dataclasses.asdict(self.config),
            }
            torch.save(state, temporary / "state.pt")
        accelerator.wait_for_everyone()
        if main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(temporary, final)
            for old in self.checkpoints()[: -self.config.keep_checkpoints]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return final

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.checkpoint_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoint_dir.iterdir() if re.fullmatch(r"step-\d{6}", p.name))

    def resume(self) -> int:
        """Load the latest checkpoint, if any, into the trainer; returns its step (0 for none)."""
        self.prepare()
        found = self.checkpoints()
        if not found or self.step:
            return self.step
        latest = found[-1]
        state = torch.load(latest / "state.pt", weights_only=True)
        self._check_compatible(state["config"], latest)
        trainable = load_file(str(latest / "trainable.safetensors"))
        saved = self._trainable_state()
        with torch.no_grad():
            for p, key in zip(self.trainable, [k for k in saved if k.startswith("param.")], strict=True):
                p.copy_(trainable[key])
            if self.ema is not None:
                for e, key in zip(self.ema, [k for k in saved if k.startswith("ema.")], strict=True):
                    e.copy_(trainable[key])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rng = latest / f"rng-{self.accelerator.process_index}.pt"
        if rng.is_file():
            self.generator.set_state(torch.load(rng, weights_only=True))
        self.losses = [tuple(x) for x in state["losses"]]
        self.step = int(state["step"])
        if self.accelerator.is_main_process:
            tqdm.write(f"resuming from {latest} (step {self.step})")
        return self.step

    def _check_compatible(self, saved: dict, where: Path) -> None:
        current = dataclasses.asdict(self.config)
        for key in LoraTrainingConfig.RESUME_KEYS:
            before = [tuple(t) for t in saved[key]] if key == "new_tokens" else saved[key]
            if before != current[key]:
                raise TrainingError(
                    f"the checkpoint in {where} was made with {key}={saved[key]!r}, this run has {current[key]!r}. "
                    "Use the same setting to continue it, or another output_dir to start afresh."
                )

    # -- validation -----------------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self, on_validation: ValidationCallback | None = None) -> list[PIL.Image.Image]:
        """Pictures of the validation prompts with the weights being trained (EMA ones if on), saved
        as ``validation/step-NNNNNN.png``; through the decoder when there is one, else the previewer."""
        self.accelerator.wait_for_everyone()
        pictures: list[PIL.Image.Image] = []
        if self.accelerator.is_main_process:
            with self.trained_weights():
                pictures = [self._validation_picture(prompt) for prompt in self.config.validation_prompts]
            path = self.output_dir / "validation" / f"step-{self.step:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image_grid(pictures).save(path)
            if on_validation:
                on_validation(self.step, pictures, list(self.config.validation_prompts))
        self.accelerator.wait_for_everyone()
        return pictures

    def _validation_picture(self, prompt: str) -> PIL.Image.Image:
        config, size = self.config, self.config.resolution
        prior_settings = OFFICIAL_PRIOR.with_(steps=config.validation_prior_steps)
        if self.decoder is not None:
            decoder_settings = OFFICIAL_DECODER.with_(steps=config.validation_decoder_steps)
            generation = text_to_image(
                self.prior, self.decoder, prompt, height=size, width=size, seed=config.seed,
                prior_settings=prior_settings, decoder_settings=decoder_settings,
            )  # fmt: skip
            return generation.images[0]
        latents = generate_stage_c(
            self.prior, encode_text(self.prior, prompt), encode_text(self.prior, ""), stage_c_shape(size, size, 1), prior_settings,
            generator=torch.Generator().manual_seed(config.seed),
        )  # fmt: skip
        return to_pil(preview_stage_c(self.prior, latents))[0]


# --- the command line (accelerate launch) ------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """``accelerate launch -m cascade_helpers.lora_training --config run.json``: the same training
    on every GPU accelerate starts, each with its share of the batches."""
    from accelerate import Accelerator

    from .loading import load_decoder, load_prior

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, required=True, help="a LoraTrainingConfig saved as JSON")
    parser.add_argument(
        "--no-decoder", action="store_true", help="validate with the previewer (no Stage B in memory)"
    )
    args = parser.parse_args(argv)
    config = LoraTrainingConfig.load(args.config)
    accelerator = Accelerator()
    device = accelerator.device
    prior = load_prior(
        config.models_dir,
        config.stage_c,
        dtype=config.dtype,
        device=device,
        image_encoder=config.image_embed_probability > 0,
    )
    decoder = None
    if config.validation_prompts and not args.no_decoder and accelerator.is_main_process:
        decoder = load_decoder(
            config.models_dir, config.stage_b, dtype=config.dtype, device=device, memory="model_offload"
        )
    trainer = LoraTrainer(prior, config, decoder, accelerator)
    result = trainer.train()
    if accelerator.is_main_process:
        print(
            f"step {result.step}: LoRA in {result.lora or 'not yet (interrupted)'}, checkpoint {result.checkpoint}"
        )


if __name__ == "__main__":
    main()
