"""``benchmarks/cascade.py`` runs end to end and prints every figure; its models are the real sizes.

The smoke run uses the tiny models on the CPU and asserts only that every figure is printed: speed
and memory figures are the benchmark's business, never a test's.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cascade_helpers import files
from cascade_helpers.devices import _MEMORY_MODES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cascade_benchmark():
    spec = importlib.util.spec_from_file_location("cascade_benchmark", ROOT / "benchmarks" / "cascade.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


NUMBER = r"(?:\d+\.\d\d|n/a)"
RATIO = r"(?:×\d+\.\d\d|n/a)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run; on a GPU run the benchmark itself")
def test_the_tiny_smoke_run_prints_every_stage_total_and_mode(cascade_benchmark, capsys, no_network):
    threads = torch.get_num_threads()
    try:  # one thread: two threads on 2 busy cores run many times slower
        cascade_benchmark.main(["--tiny", "--compile", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "CPU FIGURES" in out
    assert "--compile skipped: GPU only" in out
    assert "tokenizer: the tiny test tokenizer" in out
    stages = ("text encoding", "Stage C", "Stage B", "Stage A")
    header = "| mode | run | " + " | ".join(f"{s} s" for s in stages) + " | total s | "
    assert header + " | ".join(f"{s} RSS GB" for s in stages) + " |" in out
    for mode in (m for m in _MEMORY_MODES if m != "auto"):
        for run in ("ours, official settings", "ours, diffusers' settings", "diffusers pipeline"):
            # 4 stages + total in seconds, then 4 peaks
            row = rf"^\| {mode} \| {re.escape(run)} \|( {NUMBER} \|){{9}}$"
            assert re.search(row, out, re.MULTILINE), f"no figures for {mode}, {run}:\n{out}"
        for run in ("ours, diffusers' settings", "ours, official settings"):
            ratio = rf"^\| {mode} \| {re.escape(run)} / diffusers \|( {RATIO} \|){{9}}$"
            assert re.search(ratio, out, re.MULTILINE), f"no ratios for {mode}, {run}:\n{out}"


def _bytes_on_meta(build, dtype_bytes: int) -> int:
    from accelerate import init_empty_weights

    with init_empty_weights():
        module: nn.Module = build()
    return sum(p.numel() for p in module.parameters()) * dtype_bytes


def test_the_float16_and_float8_smoke_run_rescales_and_stores_as_the_loaders_do(
    cascade_benchmark, capsys, monkeypatch
):
    """fp16: ours rescales Stage C (calibrated, as load_prior does); --float8: Stage C's and B's weights."""
    calls = []
    for name in ("rescale_for_float16", "store_in_float8"):
        real = getattr(cascade_benchmark, name)
        monkeypatch.setattr(
            cascade_benchmark, name, lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k)
        )
    threads = torch.get_num_threads()
    try:
        cascade_benchmark.main(
            [
                "--tiny",
                "--dtype",
                "fp16",
                "--float8",
                "--threads",
                "1",
                "--modes",
                "gpu",
                "--runs",
                "ours-official",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "torch.float16, float8 weights (ours)" in out
    assert re.search(rf"^\| gpu \| ours, official settings \|( {NUMBER} \|){{9}}$", out, re.MULTILINE), out
    assert calls[:3] == ["rescale_for_float16", "store_in_float8", "store_in_float8"]


@pytest.mark.parametrize(
    "kind,architecture,published",
    [
        ("stage_c", "big", files.STAGE_C["big"]["bf16"]),
        ("stage_c", "lite", files.STAGE_C["lite"]["bf16"]),
        ("stage_b", "big", files.STAGE_B["big"]["bf16"]),
        ("stage_b", "lite", files.STAGE_B["lite"]["bf16"]),
        ("text", "big", files._WEIGHTS["text_encoder"]["bf16"]),
    ],
)
def test_the_random_models_are_as_big_as_the_published_files(
    cascade_benchmark, kind, architecture, published
):
    """Full size means it: bf16 parameters within 2 % of the published bf16 file (headers, rounding)."""
    if kind == "text":
        build = cascade_benchmark.text_builder(tiny=False, vocab_size=49408)
    else:
        build = cascade_benchmark.unet_builder(kind, architecture)
    assert _bytes_on_meta(build, 2) == pytest.approx(published.size, rel=0.02)


def test_stage_a_is_as_big_as_the_published_file(cascade_benchmark):
    assert _bytes_on_meta(cascade_benchmark.unet_builder("stage_a", "big"), 4) == pytest.approx(
        files._FILES["stage_a"].size, rel=0.02
    )


def test_each_stage_gets_the_time_until_another_stage_begins(cascade_benchmark, monkeypatch):
    """Repeated calls of one model stay in its stage; Stage A is entered through ``decode``."""
    now = [0.0]
    monkeypatch.setattr(cascade_benchmark.time, "perf_counter", lambda: now[0])
    clock = cascade_benchmark.StageClock(torch.device("cpu"))
    text, stage_c, stage_b = nn.Identity(), nn.Identity(), nn.Identity()
    vqgan = nn.Module()
    vqgan.decode = lambda x: x
    for module, stage in ((text, "text encoding"), (stage_c, "Stage C"), (stage_b, "Stage B")):
        clock.watch(module, stage)
    clock.watch_decode(vqgan)
    x = torch.zeros(1)

    def run():
        now[0] += 1  # before the text encoder: tokenizing
        text(x)
        now[0] += 2
        for _ in range(3):  # three steps, with the sampler's work between the calls
            stage_c(x)
            now[0] += 10
        stage_b(x)
        now[0] += 100
        vqgan.decode(x)
        now[0] += 1000  # pictures to PIL

    result = clock.measure(run)
    assert result.seconds == {"text encoding": 3, "Stage C": 30, "Stage B": 100, "Stage A": 1000}
    assert result.total == 1133
    stage_c(x)  # outside a measurement the hooks do nothing
    assert clock.measure(lambda: None).seconds == dict.fromkeys(result.seconds, 0)
