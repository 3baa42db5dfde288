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

The parts, one module each: :mod:`.config` (the settings), :mod:`.data` (pictures, captions, aspect
buckets, batch order), :mod:`.cache` (feature caches), :mod:`.objective` (the official loss),
:mod:`.trainer` (the loop) and :mod:`.cli` (the command line).
"""

from .cache import CachedImage, CacheReport, cache_images, cache_texts, fingerprint
from .cli import main
from .config import LORA_FILE, OFFICIAL_ASPECT_RATIOS, LoraTrainingConfig, TrainingError
from .data import (
    TrainingImage,
    batch_schedule,
    bucket_sizes,
    caption_for,
    closest_bucket,
    find_training_images,
    write_example_images,
)
from .objective import stage_c_loss
from .trainer import LoraTrainer, LossCallback, TrainingResult, ValidationCallback, stop_on_interrupt

__all__ = [
    "LORA_FILE",
    "OFFICIAL_ASPECT_RATIOS",
    "CacheReport",
    "CachedImage",
    "LoraTrainer",
    "LoraTrainingConfig",
    "LossCallback",
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
    "find_training_images",
    "fingerprint",
    "main",
    "stage_c_loss",
    "stop_on_interrupt",
    "write_example_images",
]
