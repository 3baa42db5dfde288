"""Train a Stage C LoRA, and new tokens, on a folder of pictures: the official objective, made practical.

**The objective is the official one** (``train/train_c_lora.py`` with its ``gdf``), so a LoRA
trained here works on the real model: clean EfficientNet latents noised at a random time
t = (1 − U) + 0.001 on the cosine schedule (logSNR clamped to the variance range [1e-4, 0.9999],
shift 1), variance-preserving scaling, the model conditioned on the cosine time of that logSNR
(``noise_condition``), predicting the noise (epsilon target), the per-sample MSE weighted by the
P2 weight 1 / (1 + SNR). Captions are dropped (empty prompt) 5% of the time, and 10% of the
samples also get their CLIP image embedding, as the official ``get_conditions`` does. The Stage C
runs in eval mode (no dropout), as the official LoRA run does after its first step. AdamW, gradient
clipping at 1.0, learning rate 1e-4 at a constant rate (the official warm-up of 1 update is
diffusers' constant schedule), LoRA rank 4 on attention (see :mod:`cascade_helpers.lora`).
Pictures are resized to cover an aspect bucket of the official ``Bucketeer`` (area
(¾·resolution)², sides multiples of 32, the official ratios) and centre-cropped; the EfficientNet
sees them at that size with ImageNet normalization, as in official training.

**The loop is accelerate's and diffusers'**: ``Accelerator.prepare``, ``accumulate``,
``backward``, ``clip_grad_norm_``, ``save_state``/``load_state`` with ``register_for_checkpointing``;
``diffusers.optimization.get_scheduler`` for the learning-rate schedule and
``diffusers.training_utils.EMAModel`` for the optional EMA. **Added around it** (as SimpleTuner's
Stage C guide does): the EfficientNet latents, CLIP image embeddings and text embeddings are computed
once and cached on disk (keyed by file contents and a fingerprint of the encoders), so later epochs
and later runs never run the encoders — except the text encoder for captions that contain a learned
token: the gradient reaches the token's embedding through it. Aspect buckets, repeats per folder,
centre or random crops, a minimum and maximum picture size, gradient checkpointing, bf16 autocast or
float32, checkpoints every N steps that a re-run resumes from exactly (Ctrl-C / the notebook's stop
button saves one and stops cleanly; a damaged one is named and the one before it used), validation
pictures every N steps through Stage C and the decoder (or the previewer) with a negative prompt and
a named prompt library, and ``accelerate`` for several GPUs::

    accelerate launch -m cascade_helpers.lora_training --config outputs/lora/run.json

The parts, one module each: :mod:`.config` (the settings, checked), :mod:`.data` (pictures,
captions, sizes, crops, aspect buckets, batch order), :mod:`.cache` (feature caches),
:mod:`.objective` (the official loss, and the module accelerate prepares), :mod:`.trainer` (the
loop), :mod:`.checkpointing` (checkpoint folders), :mod:`.validation` (validation pictures) and
:mod:`.cli` (the command line).
"""

from .cache import CachedImage, CacheReport, cache_images, cache_texts, fingerprint
from .checkpointing import CheckpointFolder
from .cli import INTERRUPTED, main
from .config import LORA_FILE, LR_SCHEDULERS, OFFICIAL_ASPECT_RATIOS, LoraTrainingConfig, TrainingError
from .data import (
    TrainingImage,
    batch_schedule,
    bucket_sizes,
    caption_for,
    closest_bucket,
    crop_position,
    find_training_images,
    picture_size,
    read_picture,
    scaled_size,
    write_example_images,
)
from .objective import StageCObjective, stage_c_loss
from .trainer import (
    LoraTrainer,
    LossCallback,
    TrainingResult,
    ValidationCallback,
    make_accelerator,
    stop_on_interrupt,
)

__all__ = [
    "INTERRUPTED",
    "LORA_FILE",
    "LR_SCHEDULERS",
    "OFFICIAL_ASPECT_RATIOS",
    "CacheReport",
    "CachedImage",
    "CheckpointFolder",
    "LoraTrainer",
    "LoraTrainingConfig",
    "LossCallback",
    "StageCObjective",
    "TrainingError",
    "TrainingImage",
    "TrainingResult",
    "ValidationCallback",
    "batch_schedule",
    "bucket_sizes",
    "cache_images",
    "cache_texts",
    "caption_for",
    "closest_bucket",
    "crop_position",
    "find_training_images",
    "fingerprint",
    "main",
    "make_accelerator",
    "picture_size",
    "read_picture",
    "scaled_size",
    "stage_c_loss",
    "stop_on_interrupt",
    "write_example_images",
]
