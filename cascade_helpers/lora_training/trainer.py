"""The training loop: :class:`LoraTrainer` repeats the official step on accelerate's and diffusers' parts
(``Accelerator.accumulate``, ``get_scheduler``, ``EMAModel``) around what is ours: caches, buckets, a batch
stream that resumes exactly, Ctrl-C that saves, a stop at the first non-finite loss, one run per folder."""

from __future__ import annotations

import contextlib
import itertools
import math
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch
from tqdm.auto import tqdm

from ..float8 import _stored_in_float8
from ..lora.adapters import _lora_factors, _refuse_unadaptable, inject_lora
from ..lora.formats import _COMFYUI_PREFIX, _save_comfyui, _save_lora
from ..lora.load import _all_or_nothing
from ..lora.tokens import _check_new_tokens, _install_trainable_tokens
from ..models import Decoder, Prior
from ..sampling import training_times
from .cache import CachedImage, CacheReport, _cache_images, _cache_texts
from .checkpointing import _CheckpointFolder
from .config import _LORA_FILE, LoraTrainingConfig, TrainingError
from .data import TrainingImage, _batch_schedule, find_training_images
from .objective import _StageCObjective
from .validation import _validation_pictures

_OWN_FOLDERS = ("", "checkpoints", "validation")  # what only the run holding the lock writes


@contextlib.contextmanager
def _stop_on_interrupt() -> Iterator[dict]:
    """Why: Ctrl-C stops after the current step (a consistent checkpoint); a second aborts at once."""
    state = {"requested": False}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def request(signum, frame):
        if state["requested"]:
            raise KeyboardInterrupt
        state["requested"] = True
        tqdm.write("stopping after this step, saving a checkpoint (interrupt again to abort, not saving)")

    previous = signal.signal(signal.SIGINT, request)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous)


def _make_accelerator(config: LoraTrainingConfig, cpu: bool = False):
    """Why: accumulation from the config; DDP accepts new tokens' rows without a gradient."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    handlers = [DistributedDataParallelKwargs(find_unused_parameters=bool(config.new_tokens))]
    return Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation, cpu=cpu, kwargs_handlers=handlers
    )


def _check_placement(prior: Prior, precision: str, accelerator) -> None:
    """Why: a prior elsewhere than accelerate's device, or of another dtype, is refused up front."""
    parts = {
        f"the prior's {p}": next(getattr(prior, p).parameters()).device for p in ("unet", "text_encoder")
    }
    for what, device in (parts | {"accelerate's device": accelerator.device}).items():
        device, expected = torch.device(device), prior.device  # "cuda" is "cuda:0", "cpu" "cpu:0"
        if (device.type, device.index or 0) != (expected.type, expected.index or 0):
            raise TrainingError(
                f"{what} is {device}, the prior's {prior.device}: load the prior with memory='gpu' on the device "
                "accelerate trains on (accelerator=accelerate.Accelerator(cpu=True) for the CPU)"
            )
    if _stored_in_float8(prior.unet):  # backward would see the float8 weights swapped back in
        raise TrainingError("a prior loaded with float8=True cannot train: load the prior without float8")
    dtype = next(prior.unet.parameters()).dtype
    if precision == "fp32" and dtype != torch.float32:
        raise TrainingError(
            f"precision='fp32' trains in float32, but the prior was loaded in {dtype}: load it in 'fp32'"
        )
    if accelerator.mixed_precision not in ("no", precision):
        raise TrainingError(
            f"accelerate is set to mixed precision {accelerator.mixed_precision!r}, the run to precision={precision!r}: "
            "launch without --mixed_precision (the run autocasts itself)"
        )


@dataclass
class TrainingResult:
    """What :meth:`LoraTrainer.train` ends with: ``step``, the updates done (``config.steps`` when complete);
    ``losses``, (step, loss) of every update, resumed runs' included; ``interrupted``, whether Ctrl-C (on
    any process) stopped it; ``checkpoint``, the last one this call saved; ``lora``, the file once complete."""

    step: int
    losses: list[tuple[int, float]]
    interrupted: bool
    checkpoint: Path | None
    lora: Path | None


class LoraTrainer:
    """Trains a LoRA (and new tokens) on ``prior`` in place: :meth:`prepare` (caches; optional), then
    :meth:`train` (resumes from the latest checkpoint).

    Args:
        prior: the Stage C to train, loaded with ``memory="gpu"``.
        config: the run's settings.
        decoder: Stage B/A for validation pictures (optional).
        accelerator: an ``accelerate.Accelerator`` (default: one on the prior's device).

    Raises:
        TrainingError: a prior the run cannot train (device, dtype, a LoRA or the new tokens it has, a
            missing part), before anything is encoded.
    """

    def __init__(
        self, prior: Prior, config: LoraTrainingConfig, decoder: Decoder | None = None, accelerator=None
    ) -> None:
        self.prior, self.config, self.decoder = prior, config, decoder
        self.accelerator = accelerator or _make_accelerator(config, cpu=prior.device.type == "cpu")
        self.output_dir = Path(config.output_dir)
        self.cache_dir = Path(config.cache_dir) if config.cache_dir else self.output_dir / "cache"
        self.images: list[TrainingImage] = []
        self.items: list[CachedImage] = []
        self.report: CacheReport | None = None
        self.tokens = self.ema = None  # the new tokens' trainable rows and the EMA, once prepared
        self.losses: list[tuple[int, float]] = []
        self.step = 0
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + self.accelerator.process_index)
        self.checkpoint_folder = _CheckpointFolder(self)
        self._check_prior()

    def _check_prior(self) -> None:
        """What would otherwise fail (or silently differ) after minutes of encoding."""
        prior, config, accelerator = self.prior, self.config, self.accelerator
        _check_placement(prior, config.precision, accelerator)
        try:
            for model in (prior.unet, prior.text_encoder):
                _refuse_unadaptable(model)
            _check_new_tokens(prior.text_encoder, prior.tokenizer, [t for t, _ in config.new_tokens], False)
            prior.require("effnet", "LoRA training (the pictures' latents)")
            if config.image_embed_probability > 0:
                prior.require("image_encoder", f"image_embed_probability={config.image_embed_probability}")
            if config.validation_prompts and self.decoder is None and accelerator.is_main_process:
                prior.require("previewer", "validation without a decoder (or pass decoder=)")
        except ValueError as error:
            raise TrainingError(f"cannot train on this prior: {error}") from error

    def prepare(self) -> CacheReport:
        """Find the pictures, cache their features, add the LoRA and new tokens, hand the optimizer to
        accelerate. Idempotent.

        Returns:
            What was computed and what came from the caches.

        Raises:
            TrainingError: the pictures or the captions do not fit the run (named).
        """
        if self.report is not None:
            return self.report
        from diffusers.training_utils import EMAModel

        config, prior, self.report = self.config, self.prior, CacheReport()
        self.images = find_training_images(config.image_folders, config.repeats, config.min_image_size)
        self._cache()
        # peft draws lora_A from the global generator: seed it; a failure takes the LoRA off again
        with torch.random.fork_rng(devices=[]), _all_or_nothing(prior.unet, prior.text_encoder):
            torch.manual_seed(config.seed)
            inject_lora(prior.unet, config.rank, config.alpha, config.targets)
            self.tokens = _install_trainable_tokens(prior, config.new_tokens)
        if config.gradient_checkpointing:
            prior.unet.enable_gradient_checkpointing()
        self.objective = _StageCObjective(prior, self.texts)
        self.trainable = [p for p in self.objective.parameters() if p.requires_grad]
        if config.ema_decay:
            self.ema = EMAModel(self.trainable, decay=config.ema_decay, foreach=True)
        optimizer = torch.optim.AdamW(self.trainable, lr=config.learning_rate)
        self.model, self.optimizer = self.accelerator.prepare(self.objective, optimizer)
        return self.report

    def _cache(self) -> None:
        """Features from the caches (the main process computes); learned-token captions each step."""
        tokens, captions = [token for token, _ in self.config.new_tokens], {i.caption for i in self.images}
        missing = [token for token in tokens if not any(token in caption for caption in captions)]
        if missing:
            raise TrainingError(
                f"no caption mentions {missing[0]}: it would never be learned. Put it in captions"
            )
        learned = {caption for caption in captions if any(token in caption for token in tokens)}
        with self.accelerator.main_process_first():
            self.items = _cache_images(self.prior, self.images, self.config, self.cache_dir, self.report)
            self.texts = _cache_texts(self.prior, [*(captions - learned), ""], self.cache_dir, self.report)
        self.report.text_encoded_each_step = sorted(learned)

    def batch_loss(self, indices: list[int]) -> torch.Tensor:
        """The official loss of the pictures ``indices``, with the official mix of 5% empty captions
        and 10% image embeddings, drawing from the run's generator."""
        config, device, items = self.config, self.prior.device, [self.items[i] for i in indices]
        count = len(indices)
        dropped = (torch.rand(count, generator=self.generator) < config.caption_dropout).tolist()
        with_image = (torch.rand(count, generator=self.generator) < config.image_embed_probability).tolist()
        captions = [item.caption * (not drop) for item, drop in zip(items, dropped, strict=True)]
        none = torch.zeros(1, self.prior.unet.config.clip_image_in_channels)
        images = torch.stack([i.image_embeds if u else none for i, u in zip(items, with_image, strict=True)])
        latents = torch.stack([item.latents for item in items]).to(device)
        times = training_times(count, self.generator).to(device)
        noise = torch.randn(latents.shape, generator=self.generator).to(device)
        return self.model(latents, noise, times, images.to(device), captions, config.precision == "bf16")

    def _update(self, batches: Iterator[list[int]]) -> float:
        """One update of accumulated batches; a non-finite loss stops before the weights change."""
        accelerator, losses = self.accelerator, []
        for _ in range(self.config.gradient_accumulation):
            with accelerator.accumulate(self.model):
                loss = self.batch_loss(next(batches))
                accelerator.backward(loss)
                losses.append(loss.detach())
        if not accelerator.sync_gradients:
            raise RuntimeError("accelerate did not complete the update: its accumulation count is off")
        norm = float(accelerator.clip_grad_norm_(self.trainable, self.config.max_grad_norm))
        loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise self._diverged(loss, norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.trainable)
        return loss

    def _diverged(self, loss: float, norm: float) -> TrainingError:
        last = self.checkpoints()[-1:]
        kept = f"the last good checkpoint, {last[0]}, is kept" if last else "no checkpoint was saved yet"
        return TrainingError(
            f"the loss diverged at update {self.step + 1} (loss {loss}, gradient norm {norm}): training stopped "
            f"before that update changed the weights, saving no LoRA; {kept}. Lower learning_rate (now "
            f"{self.config.learning_rate}) and run again: it continues from the last checkpoint"
        )

    def _batches(self) -> Iterator[list[int]]:
        """This process's share of the batch stream, from where the run stands."""
        buckets: dict[tuple[int, int], list[int]] = {}
        for i, (item, image) in enumerate(zip(self.items, self.images, strict=True)):
            buckets.setdefault(item.bucket, []).extend([i] * (1 + image.repeats))
        stream = _batch_schedule(buckets, self.config.batch_size, self.config.seed)
        processes, index = self.accelerator.num_processes, self.accelerator.process_index
        done = self.step * self.config.gradient_accumulation * processes
        return itertools.islice(stream, done + index, None, processes)

    def _schedule(self):
        """The schedule from the config at this step: a resume honours a changed one."""
        from diffusers.optimization import get_scheduler

        config, optimizer = self.config, self.optimizer.optimizer  # the optimizer accelerate wraps
        for group in optimizer.param_groups:
            group["initial_lr"] = config.learning_rate
        return get_scheduler(
            config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.steps,
            num_cycles=config.lr_num_cycles, power=config.lr_power, last_epoch=self.step - 1,
        )  # fmt: skip

    def train(
        self,
        on_step: Callable[[int, float], None] | None = None,
        on_validation: Callable[[int, list[PIL.Image.Image], list[str]], None] | None = None,
    ) -> TrainingResult:
        """Train up to ``config.steps`` updates from the latest checkpoint, holding a lock on ``output_dir``.
        Ctrl-C saves a checkpoint and returns (``interrupted``); a non-finite loss stops the run.

        Args:
            on_step: ``on_step(step, loss)`` after each update, on the main process (e.g. ``LiveLossPlot``).
            on_validation: ``on_validation(step, pictures, prompts)`` after each validation, on the main process.

        Returns:
            A :class:`TrainingResult`; when complete, the LoRA is saved (:meth:`save`).

        Raises:
            TrainingError: pictures or a checkpoint that do not fit, another run there, divergence.
        """
        config, accelerator, main = self.config, self.accelerator, self.accelerator.is_main_process
        with self._holding_output_dir():
            self.resume()
            # accelerate's accumulation settings are shared by every Accelerator in a process: set ours
            accelerator.gradient_accumulation_steps, accelerator.step = config.gradient_accumulation, 0
            self.scheduler, batches = self._schedule(), self._batches()
            interrupted, checkpoint = False, None
            bar = tqdm(total=config.steps, initial=self.step, desc="training", disable=not main)
            with _stop_on_interrupt() as interrupt, bar:
                while self.step < config.steps and not interrupted:
                    loss = self._update(batches)
                    self.step += 1
                    self.losses.append((self.step, loss))
                    bar.update()
                    bar.set_postfix(loss=f"{loss:.4f}")
                    if on_step and main:
                        on_step(self.step, loss)
                    if interrupt["requested"]:
                        accelerator.set_trigger()
                    interrupted = accelerator.check_trigger()  # a stop on any process stops them all
                    checkpoint = self._after_update(interrupted, on_validation) or checkpoint
            if interrupted:
                tqdm.write(f"stopped at step {self.step}, checkpoint {checkpoint}: run train() to continue")
            lora = self.save() if self.step >= config.steps else None
        return TrainingResult(self.step, list(self.losses), interrupted, checkpoint, lora)

    def _after_update(self, interrupted: bool, on_validation) -> Path | None:
        """Why: after an update, the checkpoint and validation pictures that are due (both at the end)."""
        config, last = self.config, self.step == self.config.steps
        checkpoint = None
        if interrupted or last or self.step % config.checkpoint_every == 0:
            checkpoint = self.checkpoint_folder.save()
        due = last or (config.validate_every and self.step % config.validate_every == 0)
        if config.validation_prompts and due:
            self.validate(on_validation)
        return checkpoint

    @contextlib.contextmanager
    def _holding_output_dir(self) -> Iterator[None]:
        """One run per folder (an OS lock); the holder clears what a killed run left."""
        if not self.accelerator.is_main_process:
            yield
            return
        from filelock import FileLock, Timeout

        self.output_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.output_dir / ".lock")
        try:
            held = lock.acquire(timeout=0)
        except Timeout:
            raise TrainingError(
                f"another training run is writing into {self.output_dir} (it holds {lock.lock_file}): wait until "
                "it ends, or give this run another output_dir"
            ) from None
        with held:  # what a killed run left: atomic._atomic_path's hidden temporaries (a kill -9 mid-save)
            for stale in (s for folder in _OWN_FOLDERS for s in (self.output_dir / folder).glob(".*.tmp")):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
            yield

    @contextlib.contextmanager
    def _trained_weights(self) -> Iterator[None]:
        """The weights that get saved: the EMA ones when EMA is on (swapped in for the duration)."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.trainable)
        self.ema.copy_to(self.trainable)
        try:
            yield
        finally:
            self.ema.restore(self.trainable)

    def _learned(self):
        """The trained LoRA factors and new-token embedding rows (EMA weights when EMA is on)."""
        with self._trained_weights():
            factors = _lora_factors(self.prior.unet)
            rows = self.tokens.rows.detach().clone() if self.tokens else []
        return factors, {token: row for (token, _), row in zip(self.config.new_tokens, rows, strict=True)}

    def save(self, path: str | Path | None = None) -> Path:
        """Write the LoRA and the learned tokens in our format (default ``<output_dir>/lora.safetensors``),
        atomically: a save killed halfway leaves the previous file, never half of this one."""
        factors, tokens = self._learned()
        path = Path(path) if path else self.output_dir / _LORA_FILE
        if self.accelerator.is_main_process:
            _save_lora(path, factors, tokens)
        return path

    def export_comfyui(self, path: str | Path, prefix: str = _COMFYUI_PREFIX) -> list[Path]:
        """Write the LoRA in ComfyUI/kohya keys, each learned token as a ComfyUI embedding
        ``<stem>_embeddings/<name>.safetensors`` for ``[name]`` (prompt ``embedding:<name>``; ComfyUI pools
        the prompt at the end token, the official model at the new token).

        Args:
            path: the LoRA's ``.safetensors`` file.
            prefix: ``lora_prior_unet_`` (ComfyUI, OneTrainer; default) or ``lora_unet_`` (kohya).

        Returns:
            The files written: the LoRA first, then one embedding per token.
        """
        factors, tokens = self._learned()
        return _save_comfyui(Path(path), factors, tokens, prefix)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return self.checkpoint_folder.list()

    def resume(self) -> int:
        """Load the latest intact checkpoint (a damaged one is named, the one before used); its step, or 0."""
        self.prepare()
        folder = None if self.step else self.checkpoint_folder.load_latest()
        if folder is not None and self.accelerator.is_main_process:
            tqdm.write(f"resuming from {folder} (step {self.step})")
        return self.step

    @torch.no_grad()
    def validate(
        self, on_validation: Callable[[int, list[PIL.Image.Image], list[str]], None] | None = None
    ) -> list[PIL.Image.Image]:
        """Pictures of the validation prompts with the trained weights (EMA ones if on), through the decoder
        if given, else the previewer; saved as ``validation/step-NNNNNN[-<name>].png``."""
        self.accelerator.wait_for_everyone()
        pictures: list[PIL.Image.Image] = []
        if self.accelerator.is_main_process:
            with self._trained_weights():
                pictures, prompts = _validation_pictures(self.prior, self.decoder, self.config, self.step)
            if on_validation:
                on_validation(self.step, pictures, prompts)
        self.accelerator.wait_for_everyone()
        return pictures
