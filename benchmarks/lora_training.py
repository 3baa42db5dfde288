"""Speed and peak memory of one Stage C LoRA training step (a benchmark, not a test).

One step here is one picture's forward and backward pass followed by an AdamW update of the LoRA
weights: the official loss (``stage_c_loss``: noise at a random time, predict the noise, P2-weighted
MSE) through a full-size Stage C with the default LoRA (rank 4 on attention q/k/v/out, float32 LoRA
weights); batch 1, conditioning of the real shapes (77×1280 text, pooled 1280, image 768; the text
encoder itself is not run: with a learned token it adds a bigG text-encoder pass per caption).
``LoraTrainer`` runs the same forward and backward pass for each picture but updates the weights once
per ``batch_size × gradient_accumulation`` pictures (4 by default), so one of its updates is not one
of these steps.

It runs gradient checkpointing **off** (the baseline) and **on**, each in its own subprocess so each
peak is its own, and prints steps per second, seconds per step, peak memory and the ratios
checkpointing / baseline. Peak memory: on a GPU ``torch.cuda.max_memory_allocated`` (everything on
the device: weights, activations, LoRA, optimizer state); on a CPU the subprocess's peak resident
memory (``ru_maxrss``), and above it the memory after building the model (the weights).

The weights are random (built from the shipped configs, nothing is downloaded), which does not change
the cost. The target for the big Stage C: under 24 GB of GPU memory at batch 1, 1024², bfloat16, with
gradient checkpointing. The lite Stage C in float32 needs ~4 GB of RAM for its weights alone::

    flock /tmp/bigmem.lock python benchmarks/lora_training.py --model lite --device cpu --size 1024 --steps 2
    python benchmarks/lora_training.py --model big --device cuda --size 1024 --steps 10

``--dtype`` compares float32 training (``precision="fp32"``, the prior in float32) with bfloat16
weights under bf16 autocast: run it once with each.

``--trainer`` instead compares ``LoraTrainer`` (accelerate's ``accumulate``/``backward``/
``clip_grad_norm_``, diffusers' schedule and ``EMAModel``) with the hand-rolled update it replaced — the
old accumulation, clipping, schedule and EMA are kept here as the baseline, around the trainer's own
loss — on the same tiny models (written to a temporary folder), the same cached pictures and the same
LoRA, one update of each in turn, and prints seconds per update and the ratio trainer / hand-rolled
loop::

    python benchmarks/lora_training.py --trainer --size 256 --steps 100
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from tqdm.auto import tqdm


def build_stage_c(model: str, device: torch.device, dtype: torch.dtype):
    """A full-size Stage C with random weights (normal, std 0.02), built without a slow init."""
    from accelerate import init_empty_weights

    from cascade_helpers.checkpoints import config_dir
    from cascade_helpers.upstream import StableCascadeUNet

    with init_empty_weights():
        unet = StableCascadeUNet.from_config(StableCascadeUNet.load_config(config_dir("stage_c", model)))
    unet = unet.to(dtype).to_empty(device=device)  # allocated once, in the final dtype
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.normal_(0, 0.02, generator=generator)
    return unet.eval().requires_grad_(False)


def one_configuration(args) -> dict:
    """Time ``args.steps`` training steps after one warm-up step; report speed and peak memory."""
    from cascade_helpers.lora.adapters import inject_lora
    from cascade_helpers.lora_training.objective import stage_c_loss
    from cascade_helpers.sampling import training_times

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    unet = build_stage_c(args.model, device, dtype)
    weights_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    inject_lora(unet)
    if args.checkpointing == "on":
        unet.enable_gradient_checkpointing()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    side = args.size * 24 // 1024  # Stage C latents: 24 per 1024 px
    generator = torch.Generator().manual_seed(0)
    config = unet.config
    conditions = {
        "clip_text": torch.randn(1, 77, config.clip_text_in_channels, generator=generator).to(device),
        "clip_text_pooled": torch.randn(1, 1, config.clip_text_pooled_in_channels, generator=generator).to(
            device
        ),
        "clip_img": torch.zeros(1, 1, config.clip_image_in_channels, device=device),
    }

    def step() -> None:
        latents = torch.randn(1, 16, side, side, generator=generator).to(device)
        noise = torch.randn(1, 16, side, side, generator=generator).to(device)
        times = training_times(1, generator).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = stage_c_loss(unet, latents, conditions, times, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, kernels, optimizer state
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    peak = (
        torch.cuda.max_memory_allocated()
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "seconds_per_step": seconds,
        "peak_bytes": peak,
        "weights_rss": weights_rss if device.type == "cpu" else None,
    }


def old_update(trainer, optimizer, schedule, ema, batches, bar) -> float:
    """One update of the hand-rolled loop the trainer had before it was rebuilt on accelerate: manual
    gradient accumulation, clipping, a plain optimizer and schedule, a hand-written EMA and the progress
    bar, on one process. The loss of each batch is the trainer's own (``batch_loss``), so what is compared
    is the machinery around it, which is what the rebuild changed."""
    config = trainer.config
    losses = []
    for _ in range(config.gradient_accumulation):
        loss = trainer.batch_loss(next(batches))
        (loss / config.gradient_accumulation).backward()
        losses.append(loss.item())
    torch.nn.utils.clip_grad_norm_(trainer.trainable, config.max_grad_norm)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for average, p in zip(ema, trainer.trainable, strict=True):
            average.lerp_(p.detach().float(), 1 - config.ema_decay)
    loss = sum(losses) / len(losses)
    bar.update()
    bar.set_postfix(loss=f"{loss:.4f}")
    return loss


def compare_with_the_old_loop(args) -> None:
    """Seconds per update of ``LoraTrainer.train`` and of :func:`old_update`, interleaved: after each
    of the trainer's updates (its ``on_step``) one update of the old loop runs, so both see the same
    machine load; the trainer's time is from the end of one old update to the end of its next update.
    On the CPU the time is the process's CPU time on one thread (``time.process_time``), which other
    programs on a shared machine do not inflate; on a GPU it is wall time after a synchronize."""
    import statistics
    import tempfile
    from pathlib import Path

    from cascade_helpers.loading import load_prior
    from cascade_helpers.lora_training.config import LoraTrainingConfig
    from cascade_helpers.lora_training.data import write_example_images
    from cascade_helpers.lora_training.trainer import LoraTrainer
    from cascade_helpers.tiny import write_tiny_models

    if args.device == "cpu":
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="lora-benchmark-") as temporary:
        folder = Path(temporary)
        models = write_tiny_models(folder / "models")
        pictures = write_example_images(folder / "pictures")
        prior = load_prior(models, "big", dtype="fp32", device=args.device, image_encoder=False)
        config = LoraTrainingConfig(
            images=str(pictures), output_dir=str(folder / "run"), new_tokens=[("[chelsea]", "^cat</w>")],
            resolution=args.size, batch_size=1, gradient_accumulation=4, precision="fp32", ema_decay=0.999,
            gradient_checkpointing=False, image_embed_probability=0.0, steps=args.steps + 1, checkpoint_every=10**6,
        )  # fmt: skip
        trainer = LoraTrainer(prior, config)
        trainer.prepare()
        optimizer = torch.optim.AdamW(trainer.trainable, lr=config.learning_rate)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)  # the old constant rate
        ema = [p.detach().float().clone() for p in trainer.trainable]
        batches = trainer._batches()  # the trainer's own stream, from step 0: the same batches
        new, old, end_of_old = [], [], [None]
        bar = tqdm(desc="the old loop", total=config.steps)

        def clock() -> float:
            if prior.device.type == "cuda":
                torch.cuda.synchronize()
                return time.perf_counter()
            return time.process_time()

        def after_each_update(step: int, loss: float) -> None:
            now = clock()
            if end_of_old[0] is not None:  # the first update warms up: not counted
                new.append(now - end_of_old[0])
            old_update(trainer, optimizer, schedule, ema, batches, bar)
            end_of_old[0] = clock()
            if step > 1:
                old.append(end_of_old[0] - now)

        trainer.train(on_step=after_each_update)
    print(
        f"tiny Stage C, {args.size}² px ({len(trainer.items)} pictures), batch 1 × 4 accumulated, EMA on, float32, "
        f"on {args.device} ({torch.get_num_threads()} thread(s), {'CPU' if args.device == 'cpu' else 'wall'} time): {len(new)} updates of each, interleaved"
    )
    for name, times in (("LoraTrainer (accelerate + diffusers)", new), ("hand-rolled loop (before)", old)):
        print(
            f"  {name:38s} median {statistics.median(times):.3f} s/update, mean {statistics.mean(times):.3f}"
        )
    print(
        f"  trainer / hand-rolled loop: median × {statistics.median(new) / statistics.median(old):.3f}, "
        f"mean × {statistics.mean(new) / statistics.mean(old):.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("big", "lite", "tiny"), default="lite")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument("--size", type=int, default=1024, help="picture side (1024 → 24×24 Stage C latents)")
    parser.add_argument(
        "--steps", type=int, default=3, help="timed steps per configuration (after one warm-up)"
    )
    parser.add_argument(
        "--checkpointing", choices=("on", "off"), help=argparse.SUPPRESS
    )  # one subprocess's job
    parser.add_argument(
        "--trainer",
        action="store_true",
        help="compare LoraTrainer with the old hand-rolled loop (tiny models)",
    )
    args = parser.parse_args()
    if args.trainer:
        args.device = args.device if args.device != "cuda" or torch.cuda.is_available() else "cpu"
        compare_with_the_old_loop(args)
        return
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.checkpointing:
        print(json.dumps(one_configuration(args)))
        return

    device_name = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(
        f"Stage C {args.model}, {args.dtype}, batch 1, {args.size}² px, LoRA rank 4 on attention, on {device_name}"
    )
    results = {}
    for checkpointing in ("off", "on"):
        command = [sys.executable, __file__, *sys.argv[1:], "--checkpointing", checkpointing]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[checkpointing] = json.loads(output.strip().splitlines()[-1])
        r = results[checkpointing]
        weights = f", after building the model {r['weights_rss'] / 1e9:.2f} GB" if r["weights_rss"] else ""
        print(
            f"  checkpointing {checkpointing:3s}: {1 / r['seconds_per_step']:.3f} steps/s ({r['seconds_per_step']:.2f} s/step), "
            f"peak {'GPU' if args.device.startswith('cuda') else 'RSS'} {r['peak_bytes'] / 1e9:.2f} GB{weights}"
        )
    off, on = results["off"], results["on"]
    print(
        f"  checkpointing / baseline: time × {on['seconds_per_step'] / off['seconds_per_step']:.2f}, "
        f"peak memory × {on['peak_bytes'] / off['peak_bytes']:.2f}"
    )
    if args.device.startswith("cuda") and args.model == "big" and args.size == 1024:
        verdict = "meets" if on["peak_bytes"] < 24e9 else "MISSES"
        print(f"  target: under 24 GB with checkpointing: {verdict} ({on['peak_bytes'] / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
