"""Benchmark (not a test): Stage C in float16 through the rescale, and float8 weight storage, on
full-size random weights built offline from the package's configs (``--tiny``: the tiny ones).

One UNet call each, batch 1, at Stage C's 24×24 latent of a 1024² picture (Stage B: ``--stage-b-size``),
every variant on the same weights and inputs (rounded to bfloat16 first, as the published bf16 files
are), the noise level's sinusoidal embedding computed in float32 (diffusers computes ``r × 10000`` in
the model's dtype, which in bfloat16 moves it by up to 16 and scrambles the fast frequencies; the
official code computes it in float32 under autocast):

- float32, the rescaled UNet (``--scale``, a power of two) against the original: max relative error
  (the goal: ≤ 1e-5; a power of two should give 0);
- bfloat16 (the baseline), float16 without the rescale, float16 rescaled, float8 storage computing in
  bfloat16: each call's relative error against float32 (‖a − b‖ / ‖b‖ and max |a − b| / max |b|), and
  that error as a multiple of bfloat16's;
- the weights' bytes (what sits on the GPU), as a ratio of bfloat16's.

The random weights start where official training starts (its initialization, seeded): they do not
overflow float16, so the calibration picks scale 1 for them (``--calibrate`` runs it and says so);
``--scale`` forces a scale to measure what the rescale costs in float16 (weights divided by it fall
towards float16's subnormals). Random weights bound the arithmetic, not the pictures' quality.

Memory: one model at a time (four Stage C builds from the same seed); the float32 Stage C big takes
14.4 GB (run it under ``flock /work/brief/bigmem.lock``). float16 matmuls are slow on CPUs without
native float16: minutes per call.

    python benchmarks/precision.py --tiny                         # seconds, any machine
    python benchmarks/precision.py --no-float16                   # without the slow CPU float16 calls
    flock /work/brief/bigmem.lock python benchmarks/precision.py  # Stage C big + Stage B big
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from torch import nn

from cascade_helpers.checkpoints import config_dir
from cascade_helpers.devices import UnsupportedPrecisionError
from cascade_helpers.float8 import store_in_float8
from cascade_helpers.float16 import rescale_for_float16


def build(kind: str, architecture: str, dtype: torch.dtype) -> nn.Module:
    """A random UNet at full size, initialized as official training starts (:func:`official_init`) in
    bfloat16 (as the published bf16 files), then cast to ``dtype`` tensor by tensor: never two copies."""
    from accelerate import init_empty_weights

    from cascade_helpers.upstream import StableCascadeUNet

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with init_empty_weights():
            unet = StableCascadeUNet.from_config(
                StableCascadeUNet.load_config(config_dir(kind, architecture))
            )
        unet = unet.to_empty(device="cpu")
    finally:
        torch.set_default_dtype(default)
    official_init(unet)
    for p in unet.parameters():
        p.data = p.data.to(dtype)
    embed = unet.get_timestep_ratio_embedding  # in float32, as the official code does under autocast:
    unet.get_timestep_ratio_embedding = lambda r, max_positions=10000: embed(r.float(), max_positions).to(
        r.dtype
    )
    return unet.eval().requires_grad_(False)


@torch.no_grad()
def official_init(unet: nn.Module) -> None:
    """The official ``_init_weights`` (StageC, StageB), seeded, except the output layer's zeros (which
    would make every output 0): Xavier weights and zero biases, small conditioning mappers, each
    ResBlock's last linear × √(1 / ResBlocks per path), TimestepBlock mappers at zero. torch's default
    initialization instead lets 56 random gains 1 + a compound until the first up group alone
    overflows float16 (measured: 1e5), which trained weights do not do."""
    from cascade_helpers.upstream import _SDCascadeResBlock, _SDCascadeTimestepBlock

    torch.manual_seed(0)
    for module in unet.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "weight" and p.dim() >= 2:
                nn.init.xavier_uniform_(p)
            else:  # biases, GlobalResponseNorm's gamma and beta
                nn.init.zeros_(p)
    for name in ("clip_txt_pooled_mapper", "clip_txt_mapper", "clip_img_mapper"):
        if hasattr(unet, name):
            nn.init.normal_(getattr(unet, name).weight, std=0.02)
    nn.init.xavier_uniform_(unet.embedding[1].weight, 0.02)
    depth = sum(unet.config.down_num_layers_per_block)
    for block in (b for level in [*unet.down_blocks, *unet.up_blocks] for b in level):
        if isinstance(block, _SDCascadeResBlock):
            block.channelwise[-1].weight *= (1 / depth) ** 0.5
        elif isinstance(block, _SDCascadeTimestepBlock):
            nn.init.zeros_(block.mapper.weight)


def inputs(unet: nn.Module, size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One picture's inputs: noise, a noise level, random text embeddings (Stage C: no image; Stage B:
    random Stage C latents)."""
    generator = torch.Generator().manual_seed(1)
    config = unet.config
    found = {
        "sample": torch.randn(1, config.in_channels, size, size, generator=generator),
        "timestep_ratio": torch.tensor([0.625]),  # exact in every dtype
        "clip_text_pooled": torch.randn(1, 1, config.clip_text_pooled_in_channels, generator=generator),
    }
    if config.clip_text_in_channels:
        found["clip_text"] = torch.randn(1, 77, config.clip_text_in_channels, generator=generator)
        found["clip_img"] = torch.zeros(1, 1, config.clip_image_in_channels)
    else:
        found["effnet"] = torch.randn(1, config.effnet_in_channels, size // 4, size // 4, generator=generator)
    return {k: v.to(torch.bfloat16).to(dtype) for k, v in found.items()}  # the same numbers in every dtype


def call(unet: nn.Module, size: int, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """One UNet call in ``dtype``: the output in float32, and seconds."""
    start = time.perf_counter()
    with torch.no_grad():
        output = unet(**inputs(unet, size, dtype), return_dict=False)[0].float()
    return output, time.perf_counter() - start


def weight_bytes(unet: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*unet.parameters(), *unet.buffers()])


def errors(output: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(‖a − b‖ / ‖b‖, max |a − b| / max |b|); NaN when ``output`` is not finite."""
    if not torch.isfinite(output).all():
        return float("nan"), float("nan")
    difference = output - reference
    return (difference.norm() / reference.norm()).item(), (
        difference.abs().max() / reference.abs().max()
    ).item()


def measure(name: str, unet: nn.Module, dtype: torch.dtype, size: int, reference: dict | None) -> dict:
    """One call of ``unet`` in ``dtype``, its errors against ``reference`` (printed at once: a long
    run that fails later keeps what it measured)."""
    output, seconds = call(unet, size, dtype)
    row = {"variant": name, "bytes": weight_bytes(unet), "seconds": seconds, "output": output}
    row["errors"] = errors(output, reference["output"]) if reference is not None else (0.0, 0.0)
    print(f"  measured {name}: errors {row['errors']}, {seconds:.1f} s", flush=True)
    return row


def float8_row(kind: str, architecture: str, size: int, reference: dict) -> dict:
    """float8 storage with bfloat16 compute, on a build of its own (freed after)."""
    unet = build(kind, architecture, torch.bfloat16)
    store_in_float8(unet, torch.bfloat16)
    row = measure("float8 storage, bfloat16 compute", unet, torch.bfloat16, size, reference)
    del unet
    gc.collect()
    return row


def stage_c_rows(architecture: str, scale: int, size: int, calibrate: bool, float16: bool) -> list[dict]:
    """float32 and rescaled; bfloat16, float16 and rescaled float16 (unless not ``float16``) on one
    model; the calibration; float8: four builds, each freed before the next."""
    unet = build("stage_c", architecture, torch.float32)
    reference = measure("float32", unet, torch.float32, size, None)
    rescale_for_float16(unet, scale)
    rows = [reference, measure(f"float32, rescaled ÷{scale}", unet, torch.float32, size, reference)]
    del unet
    gc.collect()
    unet = build("stage_c", architecture, torch.bfloat16)
    rows.append(measure("bfloat16", unet, torch.bfloat16, size, reference))
    if float16:
        unet.to(torch.float16)
        rows.append(measure("float16, no rescale", unet, torch.float16, size, reference))
        rescale_for_float16(unet, scale)
        rows.append(measure(f"float16, rescaled ÷{scale}", unet, torch.float16, size, reference))
    del unet
    gc.collect()
    if calibrate:  # what load_prior(dtype="float16") does at load: one float32 pass, layer by layer
        unet = build("stage_c", architecture, torch.float16)
        start = time.perf_counter()
        try:
            chosen: object = rescale_for_float16(unet)
        except UnsupportedPrecisionError as error:
            chosen = f"refused ({error})"
        rows[-1]["calibration"] = (chosen, time.perf_counter() - start)
        print(f"  calibration: {rows[-1]['calibration']}", flush=True)
        del unet
    gc.collect()
    rows.append(float8_row("stage_c", architecture, size, reference))
    return rows


def stage_b_rows(architecture: str, size: int) -> list[dict]:
    """float32, bfloat16 and float8 storage: two builds."""
    unet = build("stage_b", architecture, torch.float32)
    reference = measure("float32", unet, torch.float32, size, None)
    unet.to(torch.bfloat16)  # exact: the weights were bfloat16 numbers
    rows = [reference, measure("bfloat16", unet, torch.bfloat16, size, reference)]
    del unet
    gc.collect()
    rows.append(float8_row("stage_b", architecture, size, reference))
    return rows


def table(title: str, rows: list[dict]) -> str:
    """Markdown: each variant's weights, errors against float32, and as multiples of bfloat16's."""
    baseline = next(r for r in rows if r["variant"] == "bfloat16")
    lines = [
        f"**{title}**",
        "",
        "| variant | weights GB | × bfloat16 | rel. error | × bfloat16 | max rel. error | × bfloat16 | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        norm, peak = r["errors"]
        ratios = [r["bytes"] / baseline["bytes"], norm / baseline["errors"][0], peak / baseline["errors"][1]]
        lines.append(
            f"| {r['variant']} | {r['bytes'] / 1e9:.4g} | ×{ratios[0]:.2f} | {norm:.2e} | ×{ratios[1]:.2f} | "
            f"{peak:.2e} | ×{ratios[2]:.2f} | {r['seconds']:.1f} |"
        )
    notes = [
        f"- calibration on the float16 weights (load_prior's): scale {r['calibration'][0]}, {r['calibration'][1]:.1f} s"
        for r in rows
        if "calibration" in r
    ]
    return "\n".join(lines + [""] + notes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny models (a smoke run)")
    parser.add_argument("--scale", type=int, default=256, help="the forced rescale, a power of two")
    parser.add_argument("--size", type=int, default=24, help="Stage C's latent side (24: a 1024² picture)")
    parser.add_argument("--stage-b-size", type=int, default=64, help="Stage B's latent side (256 for 1024²)")
    parser.add_argument("--no-float16", action="store_true", help="skip the float16 calls (slow on CPUs)")
    parser.add_argument("--calibrate", action="store_true", help="also calibrate the scale and time it")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    architecture = "tiny" if args.tiny else "big"
    print(
        f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; random weights ({architecture})"
    )
    print(
        table(
            f"Stage C {architecture}, 1×16×{args.size}×{args.size}",
            stage_c_rows(architecture, args.scale, args.size, args.calibrate, not args.no_float16),
        )
    )
    print()
    print(
        table(
            f"Stage B {architecture}, 1×4×{args.stage_b_size}×{args.stage_b_size}",
            stage_b_rows(architecture, args.stage_b_size),
        )
    )


if __name__ == "__main__":
    main()
