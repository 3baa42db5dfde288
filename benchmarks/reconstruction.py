"""Benchmark (not a test): reconstruction through ``cascade_helpers.reconstruction`` against the same
modules run bare, in one process.

Models: the full-size EfficientNet encoder and the full-size lite Stage B (with the big Stage A), with
random weights built offline from the package's configs — speed does not depend on the weights.

- encoding, in pictures per second at the chosen size: ours = ``reconstruction.encode`` on a B×3×H×W
  float tensor in CPU memory (transfer, 3/4 downscale, normalization, encoder, copy back); bare = the
  encoder alone on the already prepared input on the device;
- decoding, in seconds per picture: ours = ``reconstruction.decode`` (the official sampler with
  guidance, then Stage A); bare = the same number of Stage B calls on the doubled (guided) batch with
  a trivial update, then Stage A.

The ratio is ours / bare in time: 1.00 means the helpers add nothing. Figures are medians of
``--repeats`` runs, ours and bare in alternation, after one warm-up run of each.

    python -m benchmarks.reconstruction                                # a GPU if there is one
    python -m benchmarks.reconstruction --device cpu --images 1 --steps 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from cascade_helpers import reconstruction
from cascade_helpers.checkpoints import config_dir
from cascade_helpers.devices import pick_device, pick_dtype
from cascade_helpers.effnet import EfficientNetEncoder, preprocess
from cascade_helpers.models import Decoder
from cascade_helpers.sampling import OFFICIAL_DECODER
from cascade_helpers.sizes import stage_b_shape


def compare(ours: Callable[[], object], bare: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median seconds of ``ours`` and ``bare``, timed in alternation after one warm-up run of each
    (allocations, kernel selection), so that a busy machine slows both alike. Every run ends with a
    copy to the CPU, which waits for the device."""
    ours(), bare()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for run, record in ((ours, times[0]), (bare, times[1])):
            start = time.perf_counter()
            run()
            record.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def random_decoder(device: torch.device, dtype: torch.dtype) -> Decoder:
    """Stage B lite and Stage A at full size with random weights (built offline from our configs)."""
    from cascade_helpers.upstream import PaellaVQModel, StableCascadeUNet

    torch.manual_seed(0)
    unet = StableCascadeUNet.from_config(StableCascadeUNet.load_config(config_dir("stage_b", "lite")))
    vqgan = PaellaVQModel.from_config(PaellaVQModel.load_config(config_dir("stage_a", "big")))
    return Decoder(
        unet=unet.eval().requires_grad_(False).to(device, dtype),
        vqgan=vqgan.eval().requires_grad_(False).to(device),
        device=device,
        dtype=dtype,
        architecture="lite",
    )


@torch.no_grad()
def bare_decode(
    autoencoder: reconstruction.Autoencoder, latents: torch.Tensor, size: int, steps: int
) -> torch.Tensor:
    """The decoder's model calls without the helpers: Stage B on the doubled batch ``steps`` times, Stage A."""
    decoder = autoencoder.decoder
    batch = len(latents)
    effnet = latents.to(decoder.device, decoder.dtype)
    inputs = {
        "effnet": torch.cat([effnet, torch.zeros_like(effnet)]),
        "clip_text_pooled": autoencoder.empty_pooled.expand(2 * batch, -1, -1).to(
            decoder.device, decoder.dtype
        ),
    }
    x = torch.randn(stage_b_shape(size, size, batch), device=decoder.device)
    for r in torch.linspace(1.0, 0.0, steps + 1, device=decoder.device)[:-1]:
        ratio = r.expand(2 * batch).to(decoder.dtype)
        prediction = decoder.unet(torch.cat([x, x]).to(decoder.dtype), ratio, return_dict=False, **inputs)[0]
        conditional, unconditional = prediction.float().chunk(2)
        x = x - 0.1 * torch.lerp(unconditional, conditional, 1.1)
    scaled = x * decoder.vqgan.config.scale_factor
    return decoder.vqgan.decode(scaled).sample.clamp(0, 1).cpu()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default=None, help="cuda, cpu, mps (default: the best available)")
    parser.add_argument("--dtype", default=None, help="Stage B dtype: bf16 or fp32 (default: bf16 on GPUs)")
    parser.add_argument("--images", type=int, default=4, help="pictures per batch (default 4)")
    parser.add_argument("--size", type=int, default=1024, help="picture side (default 1024)")
    parser.add_argument("--steps", type=int, default=10, help="Stage B steps (official: 10)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up (default 3)")
    parser.add_argument(
        "--parts", nargs="+", choices=("encode", "decode"), default=["encode", "decode"], help="what to time"
    )
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    n = args.images
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type}, no GPU used"
    print(f"device: {where}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(
        f"{n} picture(s) of {args.size}², random weights, median of {args.repeats} (ours and bare alternating)"
    )

    torch.manual_seed(0)
    effnet = EfficientNetEncoder().eval().to(device)
    pictures = torch.rand(n, 3, args.size, args.size)
    if "encode" in args.parts:
        prepared = preprocess(pictures).to(device)
        with torch.no_grad():
            ours, bare = compare(
                lambda: reconstruction.encode(effnet, pictures, size=args.size, batch_size=n),
                lambda: effnet(prepared).cpu(),
                args.repeats,
            )
        print(
            f"encode, full-size EfficientNet encoder (float32): ours {n / ours:.3f} pictures/s, "
            f"bare {n / bare:.3f} pictures/s, time ours/bare {ours / bare:.2f}"
        )
    if "decode" in args.parts:
        decoder = random_decoder(device, dtype)
        pooled = torch.randn(1, 1, decoder.unet.config.clip_text_pooled_in_channels)
        autoencoder = reconstruction.Autoencoder(effnet, decoder, pooled)
        latents = reconstruction.encode(effnet, pictures, size=args.size)
        settings = OFFICIAL_DECODER.with_(steps=args.steps)
        ours, bare = compare(
            lambda: reconstruction.decode(autoencoder, latents, settings=settings, batch_size=n),
            lambda: bare_decode(autoencoder, latents, args.size, args.steps),
            args.repeats,
        )
        print(
            f"decode, Stage B lite ({str(dtype).removeprefix('torch.')}, {args.steps} step(s)) + Stage A: "
            f"ours {ours / n:.2f} s/picture, bare {bare / n:.2f} s/picture, time ours/bare {ours / bare:.2f}"
        )


if __name__ == "__main__":
    main()
