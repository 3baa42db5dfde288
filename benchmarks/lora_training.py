"""Speed and peak memory of one Stage C LoRA training step (a benchmark, not a test).

One step is what ``LoraTrainer`` does per picture: the official loss (``stage_c_loss``: noise at a
random time, predict the noise, P2-weighted MSE) through a full-size Stage C with the default LoRA
(rank 4 on attention q/k/v/out, float32 LoRA weights), the backward pass, and an AdamW update of the
LoRA weights; batch 1, conditioning of the real shapes (77×1280 text, pooled 1280, image 768; the text
encoder itself is not run: with a learned token it adds a bigG text-encoder pass per caption).

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
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


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
    from cascade_helpers.lora import inject_lora
    from cascade_helpers.lora_training import stage_c_loss
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
    args = parser.parse_args()
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
