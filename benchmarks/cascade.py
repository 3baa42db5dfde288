"""The whole cascade, prompt → pixels, timed per stage as the official speed chart was measured (a
benchmark, not a test): how fast and how big is Stable Cascade on *this* machine?

The official README's chart: batch 4, Stage C 20 steps + Stage B 10 steps (6.08 s + 4.07 s on their
GPU); the chart states no resolution, and this script runs 1024×1024, the models' native size. This script runs that path with **full-size models of random weights** built from the
shipped configs (``cascade_helpers/configs``; nothing is downloaded — the cost of a forward pass does
not depend on the weights' values): Stage C and Stage B big or lite, Stage A, and the CLIP ViT-bigG/14
text tower with projection (:data:`BIG_G_TEXT`, 0.69 B parameters). A real-sized CLIP tokenizer needs
a download, so the prompt goes through the tiny test tokenizer (``cascade_helpers.tiny``); prompts
are padded to 77 tokens either way, so the text encoder does the real work.

For each variant, batch and memory mode (``gpu``, ``model_offload``, ``group_offload``, ``disk_offload``,
``sequential_offload``) it runs,
on fresh modules that share one copy of the weights:

- **ours, official settings**: ``generation.text_to_image`` on ``models.Prior`` / ``models.Decoder``
  bundles placed by ``devices._place``, with the official sampler (Stage B guidance 1.1 doubles Stage
  B's batch — the official code does the same);
- **ours, diffusers' settings**: the same with ``DIFFUSERS_PRIOR`` / ``DIFFUSERS_DECODER`` (Stage B
  unguided): the same sampling work as diffusers' pipeline, so the ratio of the Stage C and Stage B
  rows is our sampling overhead. Text encoding differs: we encode the prompt and the negative prompt
  in one call, its sub-pipelines each encode them, separately;
- **diffusers**: ``StableCascadeCombinedPipeline`` built from the same weights at diffusers' settings
  (its documented 20 + 10 steps, guidance 4 and 0), every model in the working dtype as its
  ``from_pretrained(torch_dtype=...)`` loads them, with one text encoder per sub-pipeline as it
  holds them, offloaded by its own ``enable_model_cpu_offload`` / ``enable_group_offload`` (leaf level,
  streams) / ``enable_sequential_cpu_offload``.

How a stage is timed: a forward pre-hook on each model (text encoder, Stage C, Stage B; Stage A's
``decode``), run before any offloading hook, marks the moment the path moves on to that model's
stage. At each move the GPU is synchronized (``torch.cuda.synchronize()``) and the wall-clock time
and the peak memory since the previous move go to the stage that was running: a stage includes its
sampler loop and, with offloading, the moving of models on and off the GPU. The total is their sum.
Peak memory is ``torch.cuda.max_memory_allocated`` (reset at each move): everything allocated on the
GPU, the weights there included. Every row is warmed up first by one untimed run with one step per
stage; the figures are those of the fastest of ``--repeats`` timed runs.

``--compile`` adds a row per path with the two UNets' ``forward`` compiled by ``torch.compile``
(``gpu`` mode; GPU only), timed after the warm-up run, which includes the compile and is printed.

Without a GPU the same code runs the lite models at 512², 2 + 2 steps, batch 1, in float32, and
says that its figures are CPU figures: the time is wall-clock, the memory the process's peak resident
set (``VmHWM``, reset through ``/proc/self/clear_refs``), all models' weights included, and the
memory modes place every model the same way (nothing to offload to). ``--tiny`` builds everything from
the tiny test configs instead: seconds on a CPU, what the test suite runs. Examples::

    python benchmarks/cascade.py                                   # GPU: big-big and small-small, batch 4 and 1
    python benchmarks/cascade.py --variant big-big --batch 4 --compile
    python benchmarks/cascade.py --variant small-small --modes gpu model_offload --repeats 3
    flock /tmp/bigmem.lock python benchmarks/cascade.py --threads 1   # no GPU: lite, 512², 2 + 2 steps, 12 GB RAM
    flock /tmp/bigmem.lock python benchmarks/cascade.py --ram          # peak RAM per mode, big Stage C, ~9 GB RAM
    python benchmarks/cascade.py --tiny                            # tiny models: a smoke run

Variants are the download script's words: Stage B size, then Stage C size (small = lite). The output
is a Markdown table per variant and batch, for the README's Hardware section.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import io
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from cascade_helpers.checkpoints import config_dir
from cascade_helpers.devices import _MEMORY_MODES, _group_offload, _place, pick_dtype
from cascade_helpers.files import _VARIANTS
from cascade_helpers.float8 import store_in_float8
from cascade_helpers.float16 import rescale_for_float16
from cascade_helpers.generation import text_to_image
from cascade_helpers.models import Decoder, Prior
from cascade_helpers.sampling import DIFFUSERS_DECODER, DIFFUSERS_PRIOR, OFFICIAL_DECODER, OFFICIAL_PRIOR

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

#: the CLIP ViT-bigG/14 text tower with projection that conditions Stage C and B (laion's, as in
#: ``stabilityai/stable-cascade-prior``'s ``text_encoder/config.json``; eos_token_id=2 pools at the
#: highest token id, as the real model does)
BIG_G_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
PROMPT = "an astronaut riding a horse"
STAGES = ("text encoding", "Stage C", "Stage B", "Stage A")
RUNS = {
    "ours-official": "ours, official settings",
    "ours-diffusers": "ours, diffusers' settings",
    "diffusers": "diffusers pipeline",
}
COMPILED = "gpu + compile"


# --- full-size random models, fast ------------------------------------------------------------------


@dataclass
class Part:
    """One model's architecture and a single CPU copy of its random weights, from which every run
    builds a fresh module (no hook of an earlier run's offloading survives; no weight is copied)."""

    build: Callable[[], nn.Module]
    state: dict[str, torch.Tensor]
    identity: tuple[str, str]  # (kind, architecture)

    def fresh(self, dtype: torch.dtype) -> nn.Module:
        """A new module on these weights (cast to ``dtype`` only where they are in another dtype)."""
        from accelerate import init_empty_weights

        with init_empty_weights():
            module = self.build()
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.state.items()}
        module.load_state_dict(state, strict=True, assign=True)
        return module.eval().requires_grad_(False)


def random_part(
    build: Callable[[], nn.Module],
    identity: tuple[str, str],
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
) -> Part:
    """Weights drawn from N(0, 0.02) on ``device`` (fast on a GPU) and kept on the CPU, without
    initializing the module first (``init_empty_weights``: a full-size init takes minutes on a CPU).
    Buffers (BatchNorm statistics, position ids) keep their constructed values."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        module = build()
    generator = torch.Generator(device).manual_seed(seed)
    state = {}
    for name, tensor in module.state_dict().items():
        if tensor.is_meta:
            drawn = torch.empty(tensor.shape, dtype=dtype, device=device).normal_(
                0, 0.02, generator=generator
            )
            state[name] = drawn.cpu()
        else:
            state[name] = tensor
    return Part(build, state, identity)


def unet_builder(kind: str, architecture: str) -> Callable[[], nn.Module]:
    """Stage C/B (``StableCascadeUNet``) or Stage A (``PaellaVQModel``) from the shipped config, the
    one the loader reads the official files into."""
    from cascade_helpers.upstream import PaellaVQModel, StableCascadeUNet

    cls = PaellaVQModel if kind == "stage_a" else StableCascadeUNet
    config = cls.load_config(config_dir(kind, architecture))
    return lambda: cls.from_config(config)


def text_builder(tiny: bool, vocab_size: int) -> Callable[[], nn.Module]:
    """The bigG text encoder (:data:`BIG_G_TEXT`), or the tiny test one for ``vocab_size`` tokens."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from cascade_helpers.tiny import _text_encoder_config

    config = _text_encoder_config(vocab_size) if tiny else CLIPTextConfig(**BIG_G_TEXT)
    return lambda: CLIPTextModelWithProjection(config)


def tiny_tokenizer() -> CLIPTokenizer:
    """The tiny test tokenizer (CLIP's BPE layout, a few hundred tokens): every id it gives is a valid
    id of bigG's 49408-token vocabulary, and it pads to 77 tokens like the real one."""
    from transformers import CLIPTokenizer

    from cascade_helpers.tiny import _write_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench_tokenizer_") as folder:
        return CLIPTokenizer.from_pretrained(_write_tokenizer(Path(folder)), local_files_only=True)


# --- per-stage time and peak memory -----------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):  # Linux ≥ 4.0: "5" resets the peak resident set
            Path("/proc/self/clear_refs").write_text("5")


def _peak(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        found = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


class StageClock:
    """Credits wall-clock time and peak memory to the stage whose model was called last. A stage
    begins when its model is first called after another stage's (a forward pre-hook, put before any
    offloading hook), so it includes the sampler around its model and, with offloading, the moves of
    models to and from the GPU; text encoding begins with the run."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.running = False
        self.current: str | None = None
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.peaks: dict[str, int | None] = dict.fromkeys(STAGES, 0)

    def watch(self, module: nn.Module, stage: str) -> None:
        module.register_forward_pre_hook(lambda _module, _args: self.enter(stage), prepend=True)

    def watch_decode(self, vqgan: nn.Module) -> None:
        """Stage A is entered through ``decode`` (both paths call it, not ``forward``)."""
        decode = vqgan.decode

        def timed_decode(*args, **kwargs):
            self.enter("Stage A")
            return decode(*args, **kwargs)

        vqgan.decode = timed_decode

    def enter(self, stage: str | None) -> None:
        if stage == self.current or not self.running:
            return
        _synchronize(self.device)
        now = time.perf_counter()
        if self.current is not None:
            self.seconds[self.current] += now - self.since
            peak, before = _peak(self.device), self.peaks[self.current]
            self.peaks[self.current] = None if peak is None or before is None else max(peak, before)
        _reset_peak(self.device)
        self.current, self.since = stage, now

    def measure(self, run: Callable[[], object]) -> Measurement:
        """Run once with the clock on: the seconds and peak bytes of every stage."""
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.peaks = dict.fromkeys(STAGES, 0)
        self.running, self.current = True, None
        self.enter("text encoding")
        try:
            run()
            self.enter(None)
        finally:
            self.running = False
        return Measurement(dict(self.seconds), dict(self.peaks))


@dataclass
class Measurement:
    seconds: dict[str, float]
    peaks: dict[str, int | None]

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


@dataclass
class Row:
    run: str
    mode: str
    result: Measurement
    warmup_seconds: float


# --- the runs ---------------------------------------------------------------------------------------


@dataclass
class Setup:
    """What every run of one table shares."""

    device: torch.device
    dtype: torch.dtype
    size: int
    batch: int
    prior_steps: int
    decoder_steps: int
    tokenizer: object
    architectures: dict[str, str]  # stage_c, stage_b
    repeats: int
    parts: dict[str, Part] = field(default_factory=dict)  # text, stage_c, stage_b, stage_a
    float8: bool = False  # ours: Stage C's and B's weights stored in float8, as load_prior(float8=True)


def _compile(*unets: nn.Module) -> None:
    """Compile the UNets' ``forward`` only: the hooks around it (offloading, the clock) stay eager.
    Static shapes: Stage C and B share ``StableCascadeUNet.forward``, and without ``dynamic=False``
    Stage B's other shapes would recompile it with dynamic dimensions."""
    for unet in unets:
        unet.forward = torch.compile(unet.forward, dynamic=False)


def ours(
    setup: Setup, mode: str, settings: str, compiled: bool, clock: StageClock
) -> Callable[[int, int], object]:
    """``text_to_image`` on bundles placed as ``load_prior``/``load_decoder`` place them."""
    s, dtype = setup, setup.dtype
    text_encoder, stage_c, stage_b = (s.parts[k].fresh(dtype) for k in ("text", "stage_c", "stage_b"))
    vqgan = s.parts["stage_a"].fresh(torch.float32)  # the loader keeps Stage A in float32
    if dtype == torch.float16:  # as load_prior(dtype="fp16") does: the last group rescaled (calibrated)
        rescale_for_float16(stage_c, device=s.device)
    if s.float8:
        store_in_float8(stage_c, dtype)
        store_in_float8(stage_b, dtype)
    if compiled:
        _compile(stage_c, stage_b)
    for module, stage in ((text_encoder, "text encoding"), (stage_c, "Stage C"), (stage_b, "Stage B")):
        clock.watch(module, stage)
    clock.watch_decode(vqgan)
    prior = Prior(
        _place(stage_c, s.device, mode),
        _place(text_encoder, s.device, mode),
        s.tokenizer,
        s.device,
        dtype,
        s.architectures["stage_c"],
    )
    decoder = Decoder(
        _place(stage_b, s.device, mode),
        _place(vqgan, s.device, "gpu"),
        s.device,
        dtype,
        s.architectures["stage_b"],
    )
    prior_settings, decoder_settings = (
        (OFFICIAL_PRIOR, OFFICIAL_DECODER) if settings == "official" else (DIFFUSERS_PRIOR, DIFFUSERS_DECODER)
    )

    def run(prior_steps: int, decoder_steps: int) -> object:
        return text_to_image(
            prior,
            decoder,
            PROMPT,
            num_images=s.batch,
            height=s.size,
            width=s.size,
            seed=0,
            prior_settings=prior_settings.with_(steps=prior_steps),
            decoder_settings=decoder_settings.with_(steps=decoder_steps),
        )

    return run


def diffusers_pipeline(
    setup: Setup, mode: str, compiled: bool, clock: StageClock
) -> Callable[[int, int], object]:
    """``StableCascadeCombinedPipeline`` on the same weights, placed by its own offloading methods
    (on a CPU, like ``devices._place``, it stays where it is)."""
    from cascade_helpers.upstream import DDPMWuerstchenScheduler, StableCascadeCombinedPipeline

    s, dtype = setup, setup.dtype
    prior_text, decoder_text, stage_c, stage_b, vqgan = (
        s.parts[k].fresh(dtype) for k in ("text", "text", "stage_c", "stage_b", "stage_a")
    )
    if compiled:
        _compile(stage_c, stage_b)
    for module, stage in ((prior_text, "text encoding"), (decoder_text, "text encoding")):
        clock.watch(module, stage)
    clock.watch(stage_c, "Stage C")
    clock.watch(stage_b, "Stage B")
    clock.watch_decode(vqgan)
    pipe = StableCascadeCombinedPipeline(
        tokenizer=s.tokenizer,
        text_encoder=decoder_text,
        decoder=stage_b,
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=vqgan,
        prior_prior=stage_c,
        prior_text_encoder=prior_text,
        prior_tokenizer=s.tokenizer,
        prior_scheduler=DDPMWuerstchenScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    if s.device.type == "cpu" or mode == "gpu":
        pipe.to(s.device)
    elif mode == "model_offload":
        pipe.enable_model_cpu_offload(device=s.device)
    elif mode in ("group_offload", "disk_offload"):  # diffusers' own: every model, leaf by leaf
        disk = (
            {"offload_to_disk_path": tempfile.mkdtemp(prefix="bench-offload-")}
            if mode == "disk_offload"
            else {}
        )
        pipe.enable_group_offload(s.device, offload_type="leaf_level", use_stream=True, **disk)
    else:
        pipe.enable_sequential_cpu_offload(device=s.device)

    def run(prior_steps: int, decoder_steps: int) -> object:
        return pipe(
            PROMPT,
            height=s.size,
            width=s.size,
            num_images_per_prompt=s.batch,
            prior_num_inference_steps=prior_steps,
            prior_guidance_scale=DIFFUSERS_PRIOR.guidance,
            num_inference_steps=decoder_steps,
            decoder_guidance_scale=DIFFUSERS_DECODER.guidance,
            generator=torch.Generator().manual_seed(0),
        ).images

    return run


def warm_up_and_time(
    run: Callable[[int, int], object], setup: Setup, clock: StageClock
) -> tuple[float, Measurement]:
    """One untimed run with one step per stage (kernels, allocator, compile), then ``repeats`` timed
    runs: the warm-up's seconds and the fastest timed run."""
    start = time.perf_counter()
    run(1, 1)
    _synchronize(setup.device)
    warmup = time.perf_counter() - start
    results = [
        clock.measure(lambda: run(setup.prior_steps, setup.decoder_steps)) for _ in range(setup.repeats)
    ]
    return warmup, min(results, key=lambda r: r.total)


def measure_row(setup: Setup, run_name: str, mode: str) -> Row:
    """Build the run on fresh modules, warm it up and time it; free its modules before the next row."""
    clock = StageClock(setup.device)
    compiled = mode == COMPILED
    placement = "gpu" if compiled else mode
    if compiled:
        torch.compiler.reset()  # each compiled row pays its own full compile
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars, diffusers' deprecation notices
        if run_name == "diffusers":
            run = diffusers_pipeline(setup, placement, compiled, clock)
        else:
            run = ours(setup, placement, run_name.removeprefix("ours-"), compiled, clock)
        warmup, result = warm_up_and_time(run, setup, clock)
    del run
    gc.collect()  # offloading hooks hold their modules in reference cycles
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
    return Row(RUNS[run_name], mode, result, warmup)


# --- the table --------------------------------------------------------------------------------------


def _gb(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 1e9:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"×{a / b:.2f}"


def table_header(memory_word: str) -> None:
    header = ["mode", "run", *(f"{s} s" for s in STAGES), "total s", *(f"{s} {memory_word}" for s in STAGES)]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))


def table_row(row: Row) -> None:
    """One run's figures, printed as soon as they are measured (a GPU run takes many minutes)."""
    r = row.result
    cells = [row.mode, row.run, *(f"{r.seconds[s]:.2f}" for s in STAGES), f"{r.total:.2f}"]
    print("| " + " | ".join(cells + [_gb(r.peaks[s]) for s in STAGES]) + " |", flush=True)


def table_ratios(rows: list[Row]) -> None:
    """Ours / diffusers, per mode: time per stage and total, then peak memory per stage."""
    by_key = {(row.mode, row.run): row.result for row in rows}
    for mode in dict.fromkeys(row.mode for row in rows):
        base = by_key.get((mode, RUNS["diffusers"]))
        for name in ("ours-diffusers", "ours-official"):
            mine = by_key.get((mode, RUNS[name]))
            if base is None or mine is None:
                continue
            times = [_ratio(mine.seconds[s], base.seconds[s]) for s in STAGES]
            peaks = [_ratio(mine.peaks[s], base.peaks[s]) for s in STAGES]
            cells = [mode, f"{RUNS[name]} / diffusers", *times, _ratio(mine.total, base.total), *peaks]
            print("| " + " | ".join(cells) + " |")
    for row in rows:
        if row.mode == COMPILED:
            print(
                f"torch.compile, {row.run}: first (warm-up) run {row.warmup_seconds:.1f} s, compile included "
                "(inductor's cache on disk shortens it on later invocations)"
            )


def build_parts(setup: Setup, tiny: bool, seed: int = 0) -> None:
    """The four models' random weights for this setup's architectures (reusing those already built)."""
    device, dtype = setup.device, setup.dtype
    wanted = {
        "text": ("text", "tiny" if tiny else "big"),
        "stage_a": ("stage_a", "tiny" if tiny else "big"),
        "stage_c": ("stage_c", setup.architectures["stage_c"]),
        "stage_b": ("stage_b", setup.architectures["stage_b"]),
    }
    for key, (kind, architecture) in wanted.items():
        if key in setup.parts and setup.parts[key].identity == (kind, architecture):
            continue
        setup.parts.pop(key, None)  # free the old weights first
        gc.collect()
        if kind == "text":
            vocab = len(setup.tokenizer) if tiny else BIG_G_TEXT["vocab_size"]
            build = text_builder(tiny, vocab)
        else:
            build = unet_builder(kind, architecture)
        part_dtype = torch.float32 if kind == "stage_a" else dtype  # runs cast Stage A as they need
        setup.parts[key] = random_part(build, (kind, architecture), part_dtype, device, seed)


# --- peak RAM per memory mode (full-size Stage C, CPU) ------------------------------------------------

RAM_MODES = {  # what stays in RAM, emulated on the CPU: with a GPU, "gpu" would move the weights away
    "model_offload": "every weight in RAM between calls (also what a CPU run holds)",
    "group_offload": "every weight in RAM, block by block to the device",
    "disk_offload": "the weights on disk, block by block to the device",
}


def _rss(field: str) -> int:
    found = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(found.group(1)) * 1024


def ram_child(mode: str) -> None:
    """One mode, in this process: random full-size big Stage C in bfloat16, placed as ``mode`` with the
    CPU as the device it computes on, then one Stage C call on an 8×8 latent (the weights, not the
    activations, are what is measured). Prints a JSON line."""
    import json

    part = random_part(
        unet_builder("stage_c", "big"), ("stage_c", "big"), torch.bfloat16, torch.device("cpu"), 0
    )
    unet = part.fresh(torch.bfloat16)
    del part  # the module holds the only copy of the weights
    built = _rss("VmRSS")
    if mode in ("group_offload", "disk_offload"):
        _group_offload(unet, torch.device("cpu"), to_disk=mode == "disk_offload")
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # give freed memory back to the system (glibc)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    placed = _rss("VmRSS")
    _reset_peak(torch.device("cpu"))
    config = unet.config
    inputs = {
        "sample": torch.randn(1, config.in_channels, 8, 8, dtype=torch.bfloat16),
        "timestep_ratio": torch.full((1,), 0.5, dtype=torch.bfloat16),
        "clip_text_pooled": torch.randn(1, 1, config.clip_text_pooled_in_channels, dtype=torch.bfloat16),
        "clip_text": torch.randn(1, 77, config.clip_text_in_channels, dtype=torch.bfloat16),
        "clip_img": torch.zeros(1, 1, config.clip_image_in_channels, dtype=torch.bfloat16),
    }
    start = time.perf_counter()
    with torch.no_grad():
        unet(**inputs)
    seconds = time.perf_counter() - start
    print(json.dumps({"built": built, "placed": placed, "peak": _rss("VmHWM"), "seconds": seconds}))


def ram_per_mode(modes: list[str], threads: int) -> None:
    """The table of :func:`ram_child` for each mode, each in a fresh process (a peak is per process)."""
    import json
    import subprocess
    import sys

    print(
        "Peak RAM per memory mode: full-size big Stage C (3.6 B parameters, bfloat16, random weights), "
        f"one Stage C call on an 8×8 latent on the CPU ({threads} torch thread(s)); GB = 1e9 bytes\n"
    )
    print(
        "| mode | what stays in RAM | RSS after loading | RSS after placing | peak RSS during a call | call s |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for mode in [m for m in modes if m in RAM_MODES]:
        command = [sys.executable, __file__, "--ram-child", mode, "--threads", str(threads)]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        cells = [
            mode,
            RAM_MODES[mode],
            *(_gb(r[k]) for k in ("built", "placed", "peak")),
            f"{r['seconds']:.1f}",
        ]
        print("| " + " | ".join(cells) + " |", flush=True)


# --- the command line -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    gpu = torch.cuda.is_available()
    parser.add_argument(
        "--variant",
        nargs="+",
        choices=tuple(_VARIANTS),
        help="Stage B size-Stage C size, as download_models.sh (default: big-big small-small on a GPU, "
        "small-small on a CPU or with --tiny)",
    )
    parser.add_argument(
        "--batch", nargs="+", type=int, default=[4, 1] if gpu else [1], help="pictures per run"
    )
    parser.add_argument("--size", type=int, default=1024 if gpu else 512, help="picture side in pixels")
    parser.add_argument("--prior-steps", type=int, default=20 if gpu else 2, help="Stage C steps")
    parser.add_argument("--decoder-steps", type=int, default=10 if gpu else 2, help="Stage B steps")
    modes = [m for m in _MEMORY_MODES if m != "auto"]
    parser.add_argument("--modes", nargs="+", choices=modes, default=modes)
    parser.add_argument(
        "--ram",
        action="store_true",
        help="instead: peak RAM per memory mode of the full-size big Stage C (bf16) computing one step on "
        "the CPU, each mode in its own process (what a machine such as Colab's VM must hold)",
    )
    parser.add_argument("--ram-child", help=argparse.SUPPRESS)
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument(
        "--compile", action="store_true", help="also time the UNets under torch.compile (GPU)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per row (the fastest is shown)")
    parser.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        help="default: bf16 on GPUs that have it natively, fp16 on other GPUs, else fp32 (fp16: ours rescales "
        "Stage C as load_prior does; diffusers' pipeline runs it as it is)",
    )
    parser.add_argument(
        "--float8",
        action="store_true",
        help="ours: Stage C's and B's weights stored in float8 (load_prior(float8=True))",
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny test models (a smoke run)")
    parser.add_argument(
        "--threads", type=int, help="torch threads on a CPU (default: torch's; 1 on a CPU shared with others)"
    )
    args = parser.parse_args(argv)
    if args.ram_child:
        torch.set_num_threads(args.threads or 1)
        return ram_child(args.ram_child)
    if args.ram:
        return ram_per_mode(args.modes, args.threads or 1)

    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    if args.threads and not gpu:
        torch.set_num_threads(args.threads)
    dtype = pick_dtype(args.dtype, device)
    import diffusers

    where = torch.cuda.get_device_name(device) if gpu else f"CPU (torch threads: {torch.get_num_threads()})"
    print(
        f"Stable Cascade, prompt → pixels, on {where}: torch {torch.__version__}, diffusers {diffusers.__version__}, {dtype}{', float8 weights (ours)' if args.float8 else ''}"
    )
    if not gpu:
        print(
            "CPU FIGURES: no GPU here. Time is wall-clock on this CPU; memory is the process's peak resident set "
            "(all models' weights included); the memory modes place every model the same way on a CPU."
        )
    models = "TINY test models (figures say nothing about the real ones)" if args.tiny else "full size"
    print(
        f"models: {models}, random weights from the shipped configs (nothing downloaded); text encoder: "
        f"{'the tiny CLIP text model' if args.tiny else 'CLIP ViT-bigG/14 text tower with projection'}; tokenizer: "
        "the tiny test tokenizer (a real-sized CLIP tokenizer needs a download; prompts are padded to 77 tokens either way)"
    )
    print(
        f"per stage: wall-clock seconds{' after torch.cuda.synchronize()' if gpu else ''} and peak memory "
        f"({'torch.cuda.max_memory_allocated' if gpu else 'resident set'}, GB = 1e9 bytes), reset at each stage; "
        f"fastest of {args.repeats} timed run(s) after one warm-up run"
    )
    modes = list(args.modes)
    if args.compile and gpu:
        modes.append(COMPILED)
    elif args.compile:
        print("--compile skipped: GPU only (a CPU run exercises the code; its figures are not GPU figures)")
    tokenizer = tiny_tokenizer()
    setup = None
    for variant in args.variant or (["big-big", "small-small"] if gpu and not args.tiny else ["small-small"]):
        stage_b, stage_c = _VARIANTS[variant]
        architectures = {
            "stage_c": "tiny" if args.tiny else stage_c,
            "stage_b": "tiny" if args.tiny else stage_b,
        }
        for batch in args.batch:
            parts = setup.parts if setup else {}
            setup = Setup(
                device,
                dtype,
                args.size,
                batch,
                args.prior_steps,
                args.decoder_steps,
                tokenizer,
                architectures,
                args.repeats,
                parts,
                args.float8,
            )
            build_parts(setup, args.tiny)
            print(
                f"\n### {variant}{' (tiny)' if args.tiny else ''}: Stage C {architectures['stage_c']}, Stage B "
                f"{architectures['stage_b']}, {args.size}², batch {batch}, Stage C {args.prior_steps} steps + "
                f"Stage B {args.decoder_steps} steps{' (CPU figures)' if not gpu else ''}\n"
            )
            table_header("GB" if gpu else "RSS GB")
            rows = []
            for mode in modes:
                for run in args.runs:
                    rows.append(measure_row(setup, run, mode))
                    table_row(rows[-1])
            table_ratios(rows)


if __name__ == "__main__":
    torch.set_flush_denormal(True)  # denormal floats slow a CPU down many times; flush them (both paths)
    main()
