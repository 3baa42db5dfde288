"""How much our generation path costs on top of the diffusers models it drives (a benchmark, not a test).

For Stage C and Stage B separately, in one process and on the same inputs, it compares

- **ours**: ``generate_stage_c`` / ``generate_stage_b`` with the official settings (classifier-free
  guidance in one doubled batch, guidance rescale, DDPM steps, progress bar), and
- **bare**: the same diffusers ``StableCascadeUNet`` called directly in a plain loop: the doubled batch,
  ``torch.lerp`` guidance, the rescale and the DDPM update written inline, schedule precomputed.

For each it prints the best and the median time per step over ``--repeats`` runs (the two paths
alternate, back to back) and the peak memory of one run above its starting point. Our overhead is
given twice: **timed**, the median over the back-to-back pairs of ours/bare; and **from the sampler's
own work**, both loops timed around a model that does nothing (microseconds per step, free of the
model's timing noise) divided by the bare loop's time per step. The budget is 3 %.

On a GPU, time is wall-clock after ``torch.cuda.synchronize()`` and memory is
``torch.cuda.max_memory_allocated``. On a CPU torch runs on one thread (``--threads``) and the clock is
the process's CPU time, which other programs on the machine inflate less than wall-clock time; memory
is the process's resident set sampled every millisecond, in separate untimed runs during which glibc
gives every allocation of 64 kB or more its own mapping (otherwise freed tensors stay in its heap and
the resident set would not show them).

Models: the tiny test models (written and loaded through the real loader) and the lite Stage C and
Stage B at full size with random weights, built from the shipped configs (nothing is downloaded;
4.1 GB + 2.8 GB in float32: run the lite part with 10 GB of free RAM)::

    python benchmarks/text_to_image.py                       # tiny and lite, CUDA if present
    python benchmarks/text_to_image.py --models tiny --steps 20 --repeats 20
    python benchmarks/text_to_image.py --models lite --size 512 --steps 3 --repeats 3

The lite defaults (256², 2 steps) keep a CPU run to a few minutes; on a GPU use real sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import math
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import psutil
import torch

from cascade_helpers.checkpoints import config_dir
from cascade_helpers.conditioning import TextEmbeddings
from cascade_helpers.devices import pick_device, pick_dtype
from cascade_helpers.loading import Decoder, Prior, load_decoder, load_prior
from cascade_helpers.sampling import (
    OFFICIAL_DECODER,
    OFFICIAL_PRIOR,
    StageSettings,
    log_snr,
    noise_condition,
)
from cascade_helpers.sizes import stage_b_shape, stage_c_shape
from cascade_helpers.stages import generate_stage_b, generate_stage_c
from cascade_helpers.upstream import StableCascadeUNet


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocations, or this process's resident set on CPU
    (sampled every millisecond by a thread, so only used in runs that are not timed)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._process = psutil.Process()
            self._start = self._process.memory_info().rss
            self._high, self._running = self._start, True
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while self._running:
            self._high = max(self._high, self._process.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._start
        else:
            self._running = False
            self._thread.join()
            self.peak = max(self._high, self._process.memory_info().rss) - self._start


def _set_mmap_threshold(nbytes: int) -> bool:
    """glibc serves allocations below its mmap threshold from a heap it keeps after ``free``, so the
    resident set hides tensors freed and reallocated. A low threshold gives each tensor of 64 kB or
    more its own mapping, returned on free, for the memory runs; 32 MB (glibc's adaptive maximum,
    fixed so every timed run sees the same allocator) for the timed ones. False off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3
    done = libc.mallopt(m_mmap_threshold, nbytes) == 1
    libc.malloc_trim(0)
    return done


def seconds_per_step(run: Callable[[], torch.Tensor], steps: int, device: torch.device) -> float:
    """Wall-clock on a GPU (after synchronizing); on a CPU this process's CPU time, which other
    programs on the machine do not inflate."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars off-screen
        start = clock()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (clock() - start) / steps


def peak_bytes(run: Callable[[], torch.Tensor], device: torch.device) -> int | None:
    if device.type == "cpu" and not _set_mmap_threshold(64 * 1024):
        return None  # not glibc: the resident set would not show it
    with PeakMemory(device) as memory, contextlib.redirect_stderr(io.StringIO()):
        run()
    if device.type == "cpu":
        _set_mmap_threshold(32 * 1024 * 1024)
    return memory.peak


# --- the bare loop -----------------------------------------------------------------------------------


def bare_loop(
    unet: torch.nn.Module,
    dtype: torch.dtype,
    cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor],
    shape: tuple[int, ...],
    settings: StageSettings,
    seed: int,
    device: torch.device,
) -> torch.Tensor:
    """The official sampler written as one plain loop over the diffusers UNet (what a user would write
    without our helpers): the same model calls, the same maths, no abstraction."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {k: torch.cat([cond[k], uncond[k]]).to(device, dtype) for k in cond}
    levels = log_snr(torch.linspace(settings.t_start, 0.0, settings.steps + 1), settings.shift)
    conditions = [noise_condition(v).expand(2 * shape[0]).to(device, dtype) for v in levels]
    scales = [
        (math.sqrt(float(v.sigmoid())), math.sqrt(1 - float(v.sigmoid()))) for v in levels
    ]  # x = a·x0 + b·ε
    x = torch.randn(shape, generator=generator).to(device)
    x0 = x
    with torch.no_grad():
        for i in range(settings.steps):
            pred = unet(torch.cat([x, x]).to(dtype), conditions[i], return_dict=False, **inputs)[0].float()
            text, empty = pred.chunk(2)
            eps = torch.lerp(empty, text, settings.guidance)
            rho = settings.guidance_rescale
            eps = rho * eps * (text.std() / (eps.std() + 1e-9)) + (1 - rho) * eps
            (a, b), (a_next, b_next) = scales[i], scales[i + 1]
            x0 = (x - b * eps) / a
            sigma = math.sqrt(b_next**2 / b**2) * math.sqrt(1 - a**2 / a_next**2)
            noise = torch.randn(x.shape, generator=generator).to(device)
            x = a_next * x0 + math.sqrt(max(b_next**2 - sigma**2, 0.0)) * eps + sigma * noise  # rounding
    return x0


# --- the models --------------------------------------------------------------------------------------


def tiny_models(device: torch.device, dtype: torch.dtype) -> tuple[Prior, Decoder]:
    from cascade_helpers.tiny import write_tiny_models

    folder = write_tiny_models(tempfile.mkdtemp(prefix="bench_tiny_"))
    prior = load_prior(
        folder, "big", dtype=dtype, device=device, image_encoder=False, effnet=False, previewer=False
    )
    return prior, load_decoder(folder, "big", dtype=dtype, device=device)


def _random_unet(kind: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    unet = StableCascadeUNet.from_config(StableCascadeUNet.load_config(config_dir(kind, "lite")))
    return unet.to(device, dtype).eval().requires_grad_(False)


def lite_models(device: torch.device, dtype: torch.dtype) -> tuple[Prior, Decoder]:
    """Full-size lite Stage C (1.0 B) and Stage B (0.7 B) with random weights: the same shapes and
    the same compute as the released lite checkpoints, no download."""
    prior = Prior(_random_unet("stage_c", dtype, device), None, None, device, dtype, "lite")
    decoder = Decoder(_random_unet("stage_b", dtype, device), None, device, dtype, "lite")
    return prior, decoder


def _text(prior: Prior, batch: int, seed: int) -> TextEmbeddings:
    config = prior.unet.config
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, 77, config.clip_text_in_channels, generator=generator)
    pooled = torch.randn(batch, 1, config.clip_text_pooled_in_channels, generator=generator)
    return TextEmbeddings(hidden.to(prior.device), pooled.to(prior.device))


# --- one comparison ----------------------------------------------------------------------------------


def _device() -> torch.device:
    return pick_device(None) if torch.cuda.is_available() else torch.device("cpu")


@dataclass
class Stage:
    """One stage's two runners. ``ours(model)`` / ``bare(model)`` run the stage with ``model`` in
    place of its UNet, so the same code times the real model or a do-nothing stand-in."""

    name: str
    ours: Callable[[torch.nn.Module], torch.Tensor]
    bare: Callable[[torch.nn.Module], torch.Tensor]
    unet: torch.nn.Module
    steps: int


class _DoNothing(torch.nn.Module):
    """Stands in for a UNet: returns its input scaled, so only the sampler's own work is timed."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config

    def forward(self, x: torch.Tensor, r: torch.Tensor, return_dict: bool = False, **inputs) -> tuple:
        return (0.5 * x,)


def time_both(stage: Stage, model: torch.nn.Module, steps: int, repeats: int) -> dict[str, list[float]]:
    """Warm up, then alternate our path and the bare loop ``repeats`` times each: seconds per step."""
    device = _device()
    runners = {"ours": lambda: stage.ours(model), "bare": lambda: stage.bare(model)}
    for run in runners.values():  # warm-up: allocator, kernels, lazy imports
        run()
    runs: dict[str, list[float]] = {"ours": [], "bare": []}
    for _ in range(repeats):
        for name, run in runners.items():
            runs[name].append(seconds_per_step(run, steps, device))
    return runs


def compare(stage: Stage, repeats: int) -> None:
    """Print both paths' time per step and peak memory, the timed overhead, and the overhead our
    sampler's own per-step work implies (timed around a do-nothing model: a noise-free figure)."""
    runs = time_both(stage, stage.unet, stage.steps, repeats)
    alone = time_both(stage, _DoNothing(stage.unet.config), 50, 20)
    extra = min(alone["ours"]) - min(alone["bare"])
    device = _device()
    for name, times in runs.items():
        peak = peak_bytes(lambda n=name: getattr(stage, n)(stage.unet), device)
        memory = "n/a" if peak is None else f"{peak / 1e6:7.1f} MB"
        print(
            f"  {name}: {min(times) * 1e3:9.1f} ms/step (median {statistics.median(times) * 1e3:9.1f}), peak {memory}"
        )
    ratios = [ours / bare for ours, bare in zip(runs["ours"], runs["bare"], strict=True)]
    timed = 100 * (statistics.median(ratios) - 1)
    implied = 100 * extra / min(runs["bare"])
    print(
        f"  overhead, timed (median of back-to-back pairs): {timed:+.1f} %; from the sampler's own work "
        f"({extra * 1e6:+.0f} µs/step around a do-nothing model): {implied:+.2f} %"
    )


def stages(prior: Prior, decoder: Decoder, size: int, batch: int, steps: int) -> list[Stage]:
    """Stage C and Stage B with the official settings, on random text embeddings and Stage C latents."""
    text, negative = _text(prior, batch, 1), _text(prior, batch, 2)
    settings_c, settings_b = OFFICIAL_PRIOR.with_(steps=steps), OFFICIAL_DECODER.with_(steps=steps)
    shape_c, shape_b = stage_c_shape(size, size, batch), stage_b_shape(size, size, batch)
    zeros = torch.zeros(batch, 1, prior.unet.config.clip_image_in_channels, device=prior.device)
    cond_c = {"clip_text": text.hidden, "clip_text_pooled": text.pooled, "clip_img": zeros}
    uncond_c = {"clip_text": negative.hidden, "clip_text_pooled": negative.pooled, "clip_img": zeros}
    latents_c = torch.randn(shape_c, generator=torch.Generator().manual_seed(3)).to(decoder.device)
    cond_b = {"effnet": latents_c, "clip_text_pooled": text.pooled}
    uncond_b = {"effnet": torch.zeros_like(latents_c), "clip_text_pooled": negative.pooled}

    def seed() -> torch.Generator:
        return torch.Generator().manual_seed(0)

    def ours_c(unet: torch.nn.Module) -> torch.Tensor:
        with_unet = replace(prior, unet=unet)
        return generate_stage_c(with_unet, text, negative, shape_c, settings_c, generator=seed())

    def ours_b(unet: torch.nn.Module) -> torch.Tensor:
        with_unet = replace(decoder, unet=unet)
        return generate_stage_b(
            with_unet, latents_c, text.pooled, negative.pooled, (size, size), settings_b, generator=seed()
        )

    return [
        Stage(
            f"Stage C, {size}² ×{batch}, {steps} steps",
            ours_c,
            lambda unet: bare_loop(unet, prior.dtype, cond_c, uncond_c, shape_c, settings_c, 0, prior.device),
            prior.unet,
            steps,
        ),
        Stage(
            f"Stage B, {size}² ×{batch}, {steps} steps",
            ours_b,
            lambda unet: bare_loop(
                unet, decoder.dtype, cond_b, uncond_b, shape_b, settings_b, 0, decoder.device
            ),
            decoder.unet,
            steps,
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=["tiny", "lite"], default=["tiny", "lite"])
    parser.add_argument("--size", type=int, default=None, help="picture side (default: tiny 1024, lite 256)")
    parser.add_argument("--batch", type=int, default=1, help="pictures per call")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: tiny 10, lite 2)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs per path (default: tiny 10, lite 3)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (default: 1)")
    parser.add_argument("--dtype", default=None, help="bf16 or fp32 (default: bf16 on GPUs that have it)")
    args = parser.parse_args(argv)

    device = _device()
    dtype = pick_dtype(args.dtype, device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        _set_mmap_threshold(32 * 1024 * 1024)
    torch.set_flush_denormal(True)  # denormal floats can slow a CPU down many times; flush them (both paths)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"device: {where} ({'GPU' if device.type == 'cuda' else 'no GPU'}), {dtype}, torch {torch.__version__}"
    )
    clock = "wall-clock" if device.type == "cuda" else "CPU time"
    print(
        f"official settings (guided Stage C and B); {clock} per step, best and median; peak memory above the start"
    )
    defaults = {"tiny": (1024, 10, 10), "lite": (256, 2, 3)}
    for label in args.models:
        size, steps, repeats = defaults[label]
        size, steps, repeats = args.size or size, args.steps or steps, args.repeats or repeats
        prior, decoder = (tiny_models if label == "tiny" else lite_models)(device, dtype)
        for stage in stages(prior, decoder, size, args.batch, steps):
            print(f"{stage.name}, {label} models")
            compare(stage, repeats)
        del prior, decoder


if __name__ == "__main__":
    main()
