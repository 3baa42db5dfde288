"""The training loop: :class:`LoraTrainer` adds the LoRA and new tokens to a prior, repeats the
official step (:func:`.objective.stage_c_loss`) with the practicalities around it — caches, buckets,
gradient accumulation, EMA, checkpoints that resume exactly, Ctrl-C, validation pictures — and saves
the result."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import re
import shutil
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..conditioning import encode_text, text_conditioning
from ..generation import generate_stage_c, preview_stage_c, text_to_image
from ..images import image_grid, to_pil
from ..lora import (
    COMFYUI_PREFIX,
    LoraFactors,
    NewTokenEmbedding,
    inject_lora,
    install_new_tokens,
    lora_factors,
    save_comfyui,
    save_lora,
)
from ..models import Decoder, Prior
from ..sampling import OFFICIAL_DECODER, OFFICIAL_PRIOR, training_times
from ..sizes import stage_c_shape
from .cache import CachedImage, CacheReport, cache_images, cache_texts
from .config import LORA_FILE, LoraTrainingConfig, TrainingError
from .data import TrainingImage, batch_schedule, bucket_sizes, find_training_images
from .objective import stage_c_loss


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
