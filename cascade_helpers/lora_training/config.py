"""The settings of a LoRA training run, checked when they are made (a value training could not use
fails here, not after the last step), saved with every checkpoint and as JSON for the command line."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from .. import files, values
from ..atomic import _write_json
from ..lora.adapters import ATTENTION_TARGETS, LoraError
from ..lora.tokens import _token_entries
from ..sampling import OFFICIAL_DECODER, OFFICIAL_PRIOR
from ..sizes import _GENERATION, _STRIDE, _TRAINING

#: the official config's ``multi_aspect_ratio`` (width / height); the reciprocals are added
OFFICIAL_ASPECT_RATIOS = ("1/1", "1/2", "1/3", "2/3", "3/4", "1/5", "2/5", "3/5", "4/5", "1/6", "5/6", "9/16")
_LORA_FILE = "lora.safetensors"
#: a validation prompt's name becomes part of a file name: portable characters, well under 255 bytes
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
#: the smallest bucket side: two Stage C latents (Stage C halves the latent grid once)
_SMALLEST_BUCKET_SIDE = 2 * _STRIDE
_WHOLE = {  # setting → (smallest, largest or None, what it means)
    "rank": (1, None, ""), "batch_size": (1, None, ""), "gradient_accumulation": (1, None, ""),
    "steps": (1, None, "optimizer updates"), "lr_num_cycles": (1, None, ""), "warmup_steps": (0, None, ""),
    "min_image_size": (0, None, "a side in pixels; 0 keeps every picture"),
    "checkpoint_every": (1, None, "steps"), "keep_checkpoints": (0, None, "0 keeps all, n the latest n"),
    "validate_every": (0, None, "steps; 0 validates only at the end"),
    "validation_prior_steps": (1, 1000, ""), "validation_decoder_steps": (1, 1000, ""),
    "seed": (0, 2**32 - 1, "the batches, noise, crops and validation pictures are drawn from it"),
}  # fmt: skip
_POSITIVE = ("alpha", "learning_rate", "max_grad_norm", "lr_power")
_PROBABILITIES = ("caption_dropout", "image_embed_probability")
_GUIDANCES = ("validation_prior_guidance", "validation_decoder_guidance")
_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
_CHOICES = {  # setting → (the values it takes, what the message adds)
    "lr_scheduler": (_SCHEDULES, " (diffusers' get_scheduler)"), "precision": (files._PRECISIONS, ""),
    "dtype": ((None, *files._PRECISIONS), " (Stage C overflows in float16), or None"),
    "crop": (("center", "random"), ""), "stage_c": (files._SIZES, ""), "stage_b": (files._SIZES, ""),
}  # fmt: skip


def _texts(value: object, empty: bool = False) -> bool:
    """Why: folders, module names and prompts come as lists of strings (non-empty ones but prompts)."""
    return isinstance(value, (list, tuple)) and all(
        isinstance(n, str) and (empty or n.strip()) for n in value
    )


def _names(value: object) -> bool:
    """Why: folders and module names come as one string or a list of them (JSON, by hand)."""
    return _texts([value] if isinstance(value, str) else value) and bool(value)


def _prompts(prompts: object) -> bool:
    """Why: validation prompts are a list, or a named library whose names become file names."""
    if isinstance(prompts, dict):
        names = all(isinstance(n, str) and _NAME.fullmatch(n) for n in prompts)
        return names and _prompts(list(prompts.values()))
    return isinstance(prompts, list) and _texts(prompts, empty=True)


def _fractions(ratios: object) -> list[Fraction]:
    """Why: aspect ratios are strings such as "2/3"; [] when one is no positive fraction."""
    try:
        fractions = [Fraction(r) for r in ratios]
    except (TypeError, ValueError, ZeroDivisionError):
        return []
    return fractions if all(f > 0 for f in fractions) else []


_SHAPES = {  # setting → (what its value must be, what the message says)
    "targets": (_names, "give a regex of module names, or a list of module names"),
    "images": (_names, "give a folder of pictures, or a list of folders"),
    "output_dir": (lambda v: isinstance(v, str) and v.strip(), "give the folder the run writes into"),
    "validation_prompts": (_prompts, "give a list of prompts, or a dict name → prompt (names: up to 100 "
                           "letters, digits, '_', '.', '-', as they name files)"),
    "validation_negative_prompt": (lambda v: isinstance(v, str), "must be text"),
    "gradient_checkpointing": (lambda v: isinstance(v, bool), "must be True or False"),
}  # fmt: skip


class TrainingError(ValueError):
    """Training cannot start or resume as asked (a bad setting, no pictures, a damaged checkpoint ...)."""


@dataclass
class LoraTrainingConfig:
    """Everything a run needs (README's LoRA section describes every setting). ``steps`` counts optimizer
    updates of ``batch_size × gradient_accumulation`` pictures per GPU; ``resolution`` is the buckets' side
    (area resolution²) and the validation size; ``new_tokens`` are ``(token, regex)`` pairs as the official
    ``train_tokens`` (``[("[chelsea]", "^cat</w>")]``); ``repeats`` maps folders of ``images`` to extra
    passes per epoch (0 = once, 1 = twice), as a dict or a list of ``(folder, repeats)``."""

    images: str | list[str]
    output_dir: str
    new_tokens: list[tuple[str, str | None]] = field(default_factory=list)
    rank: int = 4
    alpha: float = 1.0
    targets: str | list[str] = ATTENTION_TARGETS
    # the pictures
    resolution: int = 1024
    aspect_ratios: list[str] = field(default_factory=lambda: list(OFFICIAL_ASPECT_RATIOS))
    crop: str = "center"  # or "random": a window chosen once per picture, when its latents are cached
    repeats: dict[str, int] = field(default_factory=dict)
    min_image_size: int = 0  # pictures whose shorter side is smaller are skipped (with a message)
    max_image_size: int | None = None  # a larger shorter side is scaled down to this before bucketing
    # the optimization
    batch_size: int = 1
    gradient_accumulation: int = 4
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant_with_warmup"
    warmup_steps: int = 0
    lr_num_cycles: int = 1  # cosine_with_restarts
    lr_power: float = 1.0  # polynomial
    max_grad_norm: float = 1.0
    steps: int = 1000
    precision: str = "bf16"  # bf16 autocast, or "fp32": everything in float32 (the prior loaded so)
    gradient_checkpointing: bool = True
    ema_decay: float | None = None
    caption_dropout: float = 0.05
    image_embed_probability: float = 0.1
    # checkpoints and validation
    checkpoint_every: int = 100
    keep_checkpoints: int = 2  # 0 keeps all
    validate_every: int = 100
    validation_prompts: list[str] | dict[str, str] = field(default_factory=list)
    validation_negative_prompt: str = ""
    validation_prior_steps: int = OFFICIAL_PRIOR.steps
    validation_prior_guidance: float = OFFICIAL_PRIOR.guidance
    validation_decoder_steps: int = OFFICIAL_DECODER.steps
    validation_decoder_guidance: float = OFFICIAL_DECODER.guidance
    seed: int = 0
    cache_dir: str | None = None  # default <output_dir>/cache; share it between runs on the same pictures
    # read by the command line only (a notebook passes loaded models)
    models_dir: str = "models"
    stage_c: str = "big"
    stage_b: str = "lite"
    dtype: str | None = None  # None: "fp32" for precision="fp32", else "bf16"

    #: settings a checkpoint must share with the run that resumes it (the schedule's are honoured)
    RESUME_KEYS = (
        "new_tokens", "rank", "alpha", "targets", "resolution", "aspect_ratios", "batch_size",
        "gradient_accumulation", "ema_decay", "seed",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if isinstance(self.repeats, (list, tuple)):
            self.repeats = {str(folder): count for folder, count in self.repeats}
        self._check_numbers()
        self._check_names()
        self._check_pictures()

    def _fail(self, name: str, expected: str) -> None:
        raise TrainingError(f"LoraTrainingConfig {name}={getattr(self, name)!r}: {expected}")

    def _require(self, name: str, ok: object, expected: str) -> None:
        if not ok:
            self._fail(name, expected)

    def _checked(self, name: str, check: Callable[..., float], *bounds, **options) -> float:
        """The setting through a :mod:`cascade_helpers.values` check, its error naming the setting."""
        try:
            return check(getattr(self, name), name, *bounds, **options)
        except ValueError as error:
            self._fail(name, str(error))

    def _check_numbers(self) -> None:
        for name, (low, high, meaning) in _WHOLE.items():
            self._checked(name, values._whole, low, high, meaning=meaning)
        for name in _POSITIVE:
            self._checked(name, values._at_least, 0, strict=True)
        for name in _PROBABILITIES:
            self._checked(name, values._fraction, meaning="a probability")
        for name in _GUIDANCES:
            self._checked(name, values._at_least, 0, meaning="≤ 1 turns guidance off")
        if self.ema_decay is not None:
            decay = self._checked("ema_decay", values._fraction)
            self._require("ema_decay", 0 < decay < 1, "must be between 0 and 1 (e.g. 0.999), or None: no EMA")
        if self.max_image_size is not None:
            most = "a side in pixels, at least min_image_size, or None"
            self._checked("max_image_size", values._whole, max(self.min_image_size, 1), meaning=most)

    def _check_names(self) -> None:
        for name, (options, hint) in _CHOICES.items():
            self._require(name, getattr(self, name) in options, f"use one of {options}{hint}")
        for name, (ok, expected) in _SHAPES.items():
            self._require(name, ok(getattr(self, name)), expected)
        fp32_in_bf16 = self.precision == "fp32" and self.dtype == "bf16"
        self._require("dtype", not fp32_in_bf16, "precision='fp32' trains in float32: load the prior so")
        try:
            _token_entries(self.new_tokens)
        except LoraError as error:
            self._fail("new_tokens", str(error))
        self.new_tokens = [tuple(t) for t in self.new_tokens]  # JSON reads the pairs as lists
        known = {Path(f).resolve() for f in self.image_folders}
        for folder, count in self.repeats.items():
            self._require("repeats", Path(folder).resolve() in known, f"{folder!r} is none of the images")
            whole = values._is_whole(count) and count >= 0
            self._require("repeats", whole, f"{folder!r}: give a whole number ≥ 0 (0 = once per epoch)")

    def _check_pictures(self) -> None:
        from .data import bucket_sizes

        for rule, why in ((_TRAINING, ""), (_GENERATION, "validation pictures are made at this size: ")):
            if rule is _TRAINING or self.validation_prompts:
                expected = f"{why}use {rule.describe()} ({rule.hint})"
                self._require("resolution", rule.accepts(self.resolution), expected)
        ratios = _fractions(self.aspect_ratios)
        self._require("aspect_ratios", ratios, "give width/height ratios such as ['1/1', '2/3', '9/16']")
        buckets = bucket_sizes(self.resolution, self.aspect_ratios)[: len(ratios)]  # the reciprocals follow
        ratio, bucket = min(zip(self.aspect_ratios, buckets, strict=True), key=lambda pair: min(pair[1]))
        thin = f"{ratio!r} gives {bucket[1]}×{bucket[0]} px buckets at resolution {self.resolution}: a side under"
        thin += f" {_SMALLEST_BUCKET_SIDE} px is too thin for Stage C; use a ratio closer to 1"
        self._require("aspect_ratios", min(bucket) >= _SMALLEST_BUCKET_SIDE, thin)

    @property
    def image_folders(self) -> list[str]:
        return [self.images] if isinstance(self.images, str) else list(self.images)

    def save(self, path: str | Path) -> Path:
        """Write the settings as JSON (atomically), for ``--config`` and for the record."""
        return _write_json(path, dataclasses.asdict(self))

    @classmethod
    def from_settings(cls, settings: object, source: str = "the settings") -> LoraTrainingConfig:
        """The run of a dict of settings (a JSON file's contents), every setting named and checked.

        Args:
            settings: setting name → value, as :meth:`save` writes them.
            source: where they come from, for the messages (the file's path).

        Returns:
            The checked settings.

        Raises:
            TrainingError: not a dict, a setting that does not exist or is missing, or a refused value.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if not isinstance(settings, Mapping):
            raise TrainingError(
                f"{source}: the settings must be a JSON object (name: value), not a {type(settings).__name__}"
            )
        unknown = sorted(set(settings) - set(fields))
        if unknown:
            raise TrainingError(f"{source}: unknown setting(s) {unknown}; the settings are {sorted(fields)}")
        required = [n for n, f in fields.items() if f.default is f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in settings]
        if missing:
            raise TrainingError(f"{source}: the setting(s) {missing} are missing; every run needs {required}")
        return cls(**settings)

    @classmethod
    def load(cls, path: str | Path) -> LoraTrainingConfig:
        """Read settings saved by :meth:`save` (or by hand); ``TrainingError`` names a bad or missing file."""
        return cls.from_settings(_read_settings(path), str(path))


def _read_settings(path: str | Path) -> object:
    """Why: an unreadable file (exit 2, argparse's usage error) is told from refused settings (1)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise TrainingError(f"cannot read the training settings {path}: {error}") from error
