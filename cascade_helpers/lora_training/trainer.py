"""The training loop: :class:`LoraTrainer` adds the LoRA and new tokens to a prior and repeats the
official step (:class:`.objective.StageCObjective`) on accelerate's and diffusers' parts —
``Accelerator.prepare`` / ``accumulate`` / ``backward`` / ``clip_grad_norm_``, ``save_state`` /
``load_state`` with ``register_for_checkpointing``, ``diffusers.optimization.get_scheduler`` and
``diffusers.training_utils.EMAModel`` — keeping what is ours: feature caches, aspect buckets with
repeats, a batch stream that resumes exactly, Ctrl-C that saves and stops, checkpoints that are
never half-written (:mod:`.checkpointing`), validation pictures (:mod:`.validation`)."""

from __future__ import annotations

import contextlib
import itertools
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..atomic import save_safetensors
from ..float8 import _stored_in_float8
from ..lora import (
    COMFYUI_PREFIX,
    LoraError,
    LoraFactors,
    NewTokenEmbedding,
    all_or_nothing,
    check_new_tokens,
    inject_lora,
    install_new_tokens,
    lora_factors,
    refuse_second_lora,
    save_comfyui,
    save_lora,
)
from ..models import Decoder, Prior
from ..sampling import training_times
from .cache import CachedImage, CacheReport, cache_images, cache_texts
from .checkpointing import TRAINABLE, CheckpointFolder, Registered
from .config import LORA_FILE, LoraTrainingConfig, TrainingError
from .data import TrainingImage, batch_schedule, bucket_sizes, find_training_images
from .objective import StageCObjective
from .validation import save_validation, validation_picture


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


def make_accelerator(config: LoraTrainingConfig, cpu: bool = False):
    """The ``Accelerator`` a run uses: accumulating ``config.gradient_accumulation`` batches per
    update; with new tokens, on several GPUs, its DDP tolerates a batch in which the tokens' rows get
    no gradient (no caption with the token, or all dropped). Mixed precision stays off here: the run
    autocasts itself as ``config.precision`` says.

    Args:
        config: the run's settings.
        cpu: train on the CPU even where CUDA is available.

    Returns:
        The ``accelerate.Accelerator``.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    return Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation,
        cpu=cpu,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=bool(config.new_tokens))],
    )


@dataclass
class TrainingResult:
    """What :meth:`LoraTrainer.train` ends with.

    Attributes:
        step: the updates done so far (``config.steps`` when complete).
        losses: (step, loss) of every update, resumed runs' included.
        interrupted: True if Ctrl-C (on any process) stopped the run early.
        checkpoint: the last checkpoint saved in this call, or None.
        lora: the saved LoRA file when the run is complete, else None.
    """

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
    (caches; optional), :meth:`train` (resumes from the latest checkpoint), then :meth:`save`.

    Args:
        prior: the Stage C to train, loaded with ``memory="gpu"``.
        config: the run's settings.
        decoder: Stage B/A for validation pictures (optional).
        accelerator: an ``accelerate.Accelerator`` (:func:`make_accelerator` makes one by default).
    """

    def __init__(
        self, prior: Prior, config: LoraTrainingConfig, decoder: Decoder | None = None, accelerator=None
    ) -> None:
        self.prior, self.config, self.decoder = prior, config, decoder
        self.accelerator = accelerator or make_accelerator(config, cpu=prior.device.type == "cpu")
        self.output_dir = Path(config.output_dir)
        self.images: list[TrainingImage] = []
        self.items: list[CachedImage] = []
        self.texts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.report: CacheReport | None = None
        self.tokens: NewTokenEmbedding | None = None
        self.ema = None
        self.losses: list[tuple[int, float]] = []
        self.step = 0
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + self.accelerator.process_index)
        self.checkpoint_folder = CheckpointFolder(self.output_dir / "checkpoints", self.accelerator, config)
        self._check_placement()

    # -- set-up ---------------------------------------------------------------------------------------

    def _check_placement(self) -> None:
        def same(a: torch.device, b: torch.device) -> bool:  # "cuda" is "cuda:0", "cpu" is "cpu:0"
            a, b = torch.device(a), torch.device(b)
            return (a.type, a.index or 0) == (b.type, b.index or 0)

        for name in ("unet", "text_encoder"):
            device = next(getattr(self.prior, name).parameters()).device
            if not same(device, self.prior.device):
                raise TrainingError(
                    f"the prior's {name} is on {device}, not {self.prior.device}: load it with memory='gpu' to train"
                )
        if not same(self.prior.device, self.accelerator.device):
            here, there = self.prior.device, self.accelerator.device
            raise TrainingError(
                f"the prior is on {here} but accelerate trains on {there}: load the prior on {there}, or "
                f"pass an accelerator made for {here} (make_accelerator(config, cpu=True) for the CPU)"
            )
        if _stored_in_float8(self.prior.unet):  # backward would see the float8 weights swapped back in
            raise TrainingError("a prior loaded with float8=True cannot train: load the prior without float8")
        dtype = next(self.prior.unet.parameters()).dtype
        if self.config.precision == "fp32" and dtype != torch.float32:
            raise TrainingError(
                f"precision='fp32' trains in float32, but the prior was loaded in {dtype}: load it with "
                "dtype='fp32', or train with precision='bf16'"
            )
        mixed = self.accelerator.mixed_precision
        if mixed not in ("no", self.config.precision):
            raise TrainingError(
                f"accelerate is set to mixed precision {mixed!r}, the run to precision={self.config.precision!r}: "
                "launch without --mixed_precision (the run autocasts as its precision says)"
            )

    @property
    def cache_dir(self) -> Path:
        return Path(self.config.cache_dir) if self.config.cache_dir else self.output_dir / "cache"

    def prepare(self) -> CacheReport:
        """Check that the prior can take the run (no LoRA yet, new tokens it does not know, the parts
        the settings use), cache the features (main process first, the others then read the cache),
        add the LoRA and the new tokens (both or neither), set up the optimizer, schedule and EMA, and
        hand them to accelerate. Idempotent.

        Returns:
            What was computed and what came from the caches.

        Raises:
            TrainingError: the prior, the pictures or the captions do not fit the run (named), before
                anything is encoded or changed.
        """
        if self.report is not None:
            return self.report
        config, prior, accelerator = self.config, self.prior, self.accelerator
        self._check_prior()
        self.images = find_training_images(config.image_folders, config.repeats, config.min_image_size)
        self._check_tokens_in_captions(self.images)
        report = CacheReport()
        with_image_embeds = config.image_embed_probability > 0
        with accelerator.main_process_first():
            sizes = bucket_sizes(config.resolution, config.aspect_ratios)
            self.items = cache_images(
                prior, self.images, sizes, self.cache_dir, with_image_embeds, report,
                crop=config.crop, seed=config.seed, max_image_size=config.max_image_size,
            )  # fmt: skip
            plain = [c for c in {i.caption for i in self.images} if not self._has_new_token(c)] + [""]
            self.texts = cache_texts(prior, plain, self.cache_dir, report)
        report.text_encoded_each_step = sorted(
            {i.caption for i in self.images if self._has_new_token(i.caption)}
        )
        # peft draws lora_A from the global generator: seed it; a failure takes the LoRA off again
        with torch.random.fork_rng(devices=[]), all_or_nothing(prior.unet, prior.text_encoder):
            torch.manual_seed(config.seed)
            inject_lora(prior.unet, config.rank, config.alpha, config.targets)
            self.tokens = install_new_tokens(prior, config.new_tokens)
        if config.gradient_checkpointing:
            prior.unet.enable_gradient_checkpointing()
        self.objective = StageCObjective(prior)
        self.trainable = [p for p in self.objective.parameters() if p.requires_grad]
        self._set_up_optimization()
        self.report = report
        return report

    def _set_up_optimization(self) -> None:
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        config, accelerator = self.config, self.accelerator
        optimizer = torch.optim.AdamW(self.trainable, lr=config.learning_rate)
        # accelerate steps a prepared schedule once per process at each update: count in those steps
        processes = accelerator.num_processes
        schedule = get_scheduler(
            config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps * processes,
            num_training_steps=config.steps * processes, num_cycles=config.lr_num_cycles, power=config.lr_power,
        )  # fmt: skip
        if config.ema_decay:
            self.ema = EMAModel(self.trainable, decay=config.ema_decay, foreach=True)
        self.model, self.optimizer, self.scheduler = accelerator.prepare(self.objective, optimizer, schedule)
        accelerator.register_save_state_pre_hook(self._save_trainable)
        accelerator.register_load_state_pre_hook(self._load_trainable)
        progress = Registered(lambda: {"step": self.step, "losses": list(self.losses)}, self._load_progress)
        accelerator.register_for_checkpointing(
            progress, Registered(self._generator_states, self._load_generator_states)
        )
        if self.ema is not None:
            accelerator.register_for_checkpointing(self.ema)

    def _check_prior(self) -> None:
        """What would otherwise fail (or silently differ) after minutes of encoding: a prior that
        carries a LoRA already, new tokens its tokenizer refuses, optional parts the run uses."""
        config, prior = self.config, self.prior
        try:
            for model in (prior.unet, prior.text_encoder):
                refuse_second_lora(model)
            check_new_tokens(prior.tokenizer, [token for token, _ in config.new_tokens])
        except LoraError as error:
            raise TrainingError(f"cannot train on this prior: {error}") from error
        needs = {"effnet": "LoRA training (the pictures' latents)"}
        if config.image_embed_probability > 0:
            needs["image_encoder"] = f"image_embed_probability={config.image_embed_probability} (0: none)"
        if config.validation_prompts and self.decoder is None and self.accelerator.is_main_process:
            needs["previewer"] = "validation without a decoder (or pass decoder=)"
        for part, needed_for in needs.items():
            try:
                prior.require(part, needed_for)
            except ValueError as error:
                raise TrainingError(str(error)) from error

    def _has_new_token(self, caption: str) -> bool:
        return any(token in caption for token, _ in self.config.new_tokens)

    def _check_tokens_in_captions(self, images: Sequence[TrainingImage]) -> None:
        for token, _ in self.config.new_tokens:
            if not any(token in i.caption for i in images):
                raise TrainingError(
                    f"no caption mentions {token}: it would never be learned. Put it in the captions (sidecar .txt or file names)"
                )

    # -- one step -------------------------------------------------------------------------------------

    def batch_loss(self, indices: list[int]) -> torch.Tensor:
        """The official loss of the pictures ``indices``, with the official mix of 5% empty captions
        and 10% image embeddings, drawing from the run's generator."""
        config, device = self.config, self.prior.device
        count = len(indices)
        dropped = (torch.rand(count, generator=self.generator) < config.caption_dropout).tolist()
        with_image = (torch.rand(count, generator=self.generator) < config.image_embed_probability).tolist()
        captions = ["" if drop else self.items[i].caption for i, drop in zip(indices, dropped, strict=True)]
        cached = [tuple(t.to(device) for t in self.texts[c]) if c in self.texts else None for c in captions]
        width = self.prior.unet.config.clip_image_in_channels
        images = [
            self.items[i].image_embeds
            if use and self.items[i].image_embeds is not None
            else torch.zeros(1, width)
            for i, use in zip(indices, with_image, strict=True)
        ]
        latents = torch.stack([self.items[i].latents for i in indices]).to(device)
        times = training_times(count, self.generator).to(device)
        noise = torch.randn(latents.shape, generator=self.generator).to(device)
        clip_img = torch.stack(images).to(device)
        return self.model(latents, noise, times, clip_img, captions, cached, config.precision == "bf16")

    def _optimizer_step(self, batches: Iterator[list[int]]) -> float:
        """One update: ``gradient_accumulation`` batches through ``accelerator.accumulate`` (their
        gradients averaged, across processes too), clipped, one optimizer and schedule step, EMA."""
        accelerator, losses = self.accelerator, []
        for _ in range(self.config.gradient_accumulation):
            with accelerator.accumulate(self.model):
                loss = self.batch_loss(next(batches))
                accelerator.backward(loss)
                # the prepared optimizer and schedule skip steps between syncs themselves, but each
                # call still costs a few checks: only call them when the update completes
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        if not accelerator.sync_gradients:
            raise RuntimeError(
                "accelerate did not complete the update: its accumulation counter is out of step"
            )
        if self.ema is not None:
            self.ema.step(self.trainable)
        return accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()

    def _batches(self) -> Iterator[list[int]]:
        """This process's share of the batch stream, from where the run stands."""
        buckets: dict[tuple[int, int], list[int]] = {}
        for i, (item, image) in enumerate(zip(self.items, self.images, strict=True)):
            buckets.setdefault(item.bucket, []).extend([i] * (1 + image.repeats))
        stream = batch_schedule(buckets, self.config.batch_size, self.config.seed)
        processes, index = self.accelerator.num_processes, self.accelerator.process_index
        done = self.step * self.config.gradient_accumulation * processes
        return itertools.islice(stream, done + index, None, processes)

    # -- the loop -------------------------------------------------------------------------------------

    def train(
        self, on_step: LossCallback | None = None, on_validation: ValidationCallback | None = None
    ) -> TrainingResult:
        """Train up to ``config.steps`` updates, continuing from the latest checkpoint. Ctrl-C saves a
        checkpoint and returns (``interrupted``).

        Args:
            on_step: ``on_step(step, loss)`` after each update, on the main process (a live loss
                curve: :class:`cascade_helpers.display.LiveLossPlot`).
            on_validation: ``on_validation(step, pictures, prompts)`` after each validation, on the
                main process.

        Returns:
            A :class:`TrainingResult`; when complete, the LoRA is saved (:meth:`save`).

        Raises:
            TrainingError: the pictures, captions or a checkpoint do not fit the run (named).
        """
        self.prepare()
        self.resume()
        config, accelerator, main = self.config, self.accelerator, self.accelerator.is_main_process
        # accelerate's accumulation settings are shared by every Accelerator in a process: set ours
        accelerator.gradient_accumulation_steps = config.gradient_accumulation
        accelerator.step = 0
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
                if interrupt["requested"]:
                    accelerator.set_trigger()
                interrupted = accelerator.check_trigger()  # a stop on any process stops them all
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

    # -- EMA, saving ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def trained_weights(self) -> Iterator[None]:
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

    def learned(self) -> tuple[dict[str, LoraFactors], dict[str, torch.Tensor]]:
        """The trained LoRA factors and new-token embedding rows (EMA weights when EMA is on)."""
        with self.trained_weights():
            factors = lora_factors(self.prior.unet)
            rows = self.tokens.rows.detach().clone() if self.tokens else []
        return factors, {token: row for (token, _), row in zip(self.config.new_tokens, rows, strict=True)}

    def save(self, path: str | Path | None = None) -> Path:
        """Write the LoRA and the learned tokens in our format (default ``<output_dir>/lora.safetensors``),
        atomically: a save killed halfway leaves the previous file, never half of this one."""
        factors, tokens = self.learned()
        path = Path(path) if path else self.output_dir / LORA_FILE
        if self.accelerator.is_main_process:
            save_lora(path, factors, tokens)
        return path

    def export_comfyui(self, path: str | Path, prefix: str = COMFYUI_PREFIX) -> list[Path]:
        """Write the LoRA in ComfyUI/kohya keys (and the tokens as ComfyUI embeddings).

        Args:
            path: the LoRA's ``.safetensors`` file.
            prefix: ``lora_prior_unet_`` (ComfyUI; default) or ``lora_unet_`` (kohya).

        Returns:
            The files written (:func:`cascade_helpers.lora.save_comfyui`).
        """
        factors, tokens = self.learned()
        return save_comfyui(path, factors, tokens, prefix)

    # -- checkpoints ----------------------------------------------------------------------------------

    def _trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.objective.named_parameters() if p.requires_grad}

    def _is_ours(self, model) -> bool:
        return self.accelerator.unwrap_model(model) is self.objective

    def _save_trainable(self, models: list, weights: list, folder: str) -> None:
        """accelerate's save hook: the trained weights only, not a copy of the whole Stage C."""
        for i in reversed(range(len(models))):
            if self._is_ours(models[i]):
                weights.pop(i)
                if self.accelerator.is_main_process:
                    state = {n: p.detach().float() for n, p in self._trainable_parameters().items()}
                    save_safetensors(Path(folder) / TRAINABLE, state)

    def _load_trainable(self, models: list, folder: str) -> None:
        """accelerate's load hook: the trained weights back into the model, by name."""
        ours = [m for m in models if self._is_ours(m)]
        for model in ours:
            models.remove(model)
        if not ours:
            return
        saved = load_file(str(Path(folder) / TRAINABLE))
        parameters = self._trainable_parameters()
        if set(saved) != set(parameters):
            raise TrainingError(f"{folder} holds other trained weights than this run trains")
        with torch.no_grad():
            for name, value in saved.items():
                parameters[name].copy_(value)

    def _load_progress(self, state: dict) -> None:
        self.step = int(state["step"])
        self.losses = [tuple(x) for x in state["losses"]]

    def _generator_states(self) -> dict:
        """Every process's batch generator (accelerate writes registered state from the main process
        only, so the states are gathered there first)."""
        state = self.generator.get_state()[None]
        if self.accelerator.num_processes > 1:
            state = self.accelerator.gather(state.to(self.accelerator.device)).cpu()
        return {"generators": state}

    def _load_generator_states(self, state: dict) -> None:
        saved, index = state["generators"], self.accelerator.process_index
        if index < len(saved):  # a run resumed on more processes starts the extra ones afresh
            self.generator.set_state(saved[index].clone())

    def save_checkpoint(self) -> Path:
        """Everything needed to continue exactly (trained weights, EMA, optimizer, schedule, step,
        every random generator, the loss history) via ``accelerator.save_state``, into a temporary
        folder renamed when complete (:meth:`.checkpointing.CheckpointFolder.save`)."""
        return self.checkpoint_folder.save(self.step)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return self.checkpoint_folder.list()

    def resume(self) -> int:
        """Load the latest intact checkpoint, if any, into the trainer (a damaged one is named and
        the one before it used); returns its step (0 for none)."""
        self.prepare()
        if self.step:
            return self.step
        folder = self.checkpoint_folder.load_latest()
        if folder is None:
            return 0
        if self.ema is not None:  # accelerate reads registered state onto the CPU
            self.ema.to(device=self.prior.device)
        if self.accelerator.is_main_process:
            tqdm.write(f"resuming from {folder} (step {self.step})")
        return self.step

    # -- validation -----------------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self, on_validation: ValidationCallback | None = None) -> list[PIL.Image.Image]:
        """Pictures of the validation prompts with the weights being trained (EMA ones if on), saved
        as ``validation/step-NNNNNN.png`` (and ``step-NNNNNN-<name>.png`` per named prompt); through
        the decoder when there is one, else the previewer."""
        self.accelerator.wait_for_everyone()
        pictures: list[PIL.Image.Image] = []
        if self.accelerator.is_main_process:
            library = self.config.named_validation_prompts
            with self.trained_weights():
                pictures = [
                    validation_picture(self.prior, self.decoder, self.config, p) for p in library.values()
                ]
            named = isinstance(self.config.validation_prompts, dict)
            save_validation(self.output_dir / "validation", self.step, pictures, list(library), named)
            if on_validation:
                on_validation(self.step, pictures, list(library.values()))
        self.accelerator.wait_for_everyone()
        return pictures
