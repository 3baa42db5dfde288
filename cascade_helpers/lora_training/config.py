"""The settings of a LoRA training run, saved with every checkpoint and as JSON for the command line."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import write_json
from ..lora import ATTENTION_TARGETS, NewToken
from ..sizes import GENERATION, TRAINING, check_size

#: the official config's ``multi_aspect_ratio`` (width / height); the reciprocals are added
OFFICIAL_ASPECT_RATIOS = ("1/1", "1/2", "1/3", "2/3", "3/4", "1/5", "2/5", "3/5", "4/5", "1/6", "5/6", "9/16")
LORA_FILE = "lora.safetensors"


class TrainingError(ValueError):
    """Training cannot start or resume as asked (no pictures, an incompatible checkpoint ...)."""


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
        check_size(self.resolution, self.resolution, TRAINING)
        if self.validation_prompts:  # validation pictures are generated at this size
            check_size(self.resolution, self.resolution, GENERATION)
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be 'bf16' or 'fp32', not {self.precision!r}")
        for name in ("rank", "batch_size", "gradient_accumulation", "steps", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")

    def save(self, path: str | Path) -> Path:
        """Write the settings as JSON (atomically), for ``--config`` and for the record."""
        return write_json(path, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> LoraTrainingConfig:
        return cls(**json.loads(Path(path).read_text()))
