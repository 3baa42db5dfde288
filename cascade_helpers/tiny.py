"""Write a complete ``models/`` folder of tiny random models, in the formats of the real downloads.

Every file has its real name, format and key names (the EfficientNet encoder and previewer are full
size: they are small), so tests, CI and the notebooks load them through the same code as the real
weights, in seconds on a CPU. The weights are random: pictures made with them are noise. They prove an
install works before a 20 GB download, nothing more.

Command line::

    python -m cascade_helpers.tiny --demo       # write outputs/tiny_models and make one picture
    python -m cascade_helpers.tiny --all        # and the ControlNets, the example LoRA, both Stage B sizes:
                                                # everything the notebooks read (what CI gives them)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import files
from .atomic import _atomic_files, _atomic_path, _save_safetensors
from .checkpoints import _stage_a_to_official, _unet_to_official, config_dir
from .controlnet.kinds import CONTROLNET_TYPES, _fed_blocks
from .controlnet.model import ControlNet
from .devices import _DTYPE_NAMES
from .effnet import EfficientNetEncoder
from .files import Size, _Precision
from .previewer import Previewer

if TYPE_CHECKING:
    from transformers import CLIPTextConfig

_DEFAULT_TINY_DIR = Path("outputs/tiny_models")

# Sizes of the tiny CLIP models; the tiny UNet configs in cascade_helpers/configs/*_tiny match them.
_TEXT_HIDDEN = 32  # also the pooled/projected size
_IMAGE_EMBED = 24
_IMAGE_SIZE = 32
_TINY_CLIP = {
    "hidden_size": _TEXT_HIDDEN,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": _TEXT_HIDDEN,
}
# Words the tiny tokenizer knows whole (others fall back to characters): what the notebooks and
# tests prompt with, plus "dog"/"dogs" for the official LoRA token initialization (^dog</w>).
_TINY_WORDS = (  # noqa: SIM905 (a list literal takes a line per word)
    "a photo of the an and in on with painting astronaut riding horse red green blue cat dog dogs fernando "
    "person rodent knight city night mountain lake house sunset portrait"
).split()


def _save_official(state: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None = None) -> Path:
    """A state dict as an official single file (floating tensors in ``dtype``), atomically: its path."""
    tensors = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in state.items()}
    _save_safetensors(path, tensors)
    return path


def _tiny_unet(kind: str, seed: int):
    """A seeded random tiny Stage C/B from the shipped tiny config (the writers and tests share it)."""
    from .upstream import StableCascadeUNet

    torch.manual_seed(seed)
    return StableCascadeUNet.from_config(StableCascadeUNet.load_config(config_dir(kind, "tiny")))


def _write_unet(
    models_dir: Path, kind: str, size: Size, precision: _Precision, seed: int | None = None
) -> Path:
    """The official single file, so the loader's checks run on it as on the released one; ``size`` only
    names it (the weights are always tiny), the seed defaults to :func:`write_tiny_models`'s."""
    stage = files.STAGE_C if kind == "stage_c" else files.STAGE_B
    seed = {"stage_c": 0, "stage_b": 1}[kind] if seed is None else seed
    state = _unet_to_official(_tiny_unet(kind, seed).state_dict(), kind)
    return _save_official(state, models_dir / stage[size][precision].path, _DTYPE_NAMES[precision])


def _write_stage_a(models_dir: Path, seed: int = 2) -> Path:
    """Official keys (``vquantizer.codebook``), so the loader's conversion runs as on the real file."""
    from .upstream import PaellaVQModel

    torch.manual_seed(seed)
    vqgan = PaellaVQModel.from_config(PaellaVQModel.load_config(config_dir("stage_a", "tiny")))
    return _save_official(_stage_a_to_official(vqgan.state_dict()), models_dir / files._FILES["stage_a"].path)


@torch.no_grad()
def _random_effnet(seed: int = 3) -> EfficientNetEncoder:
    """Random, but with latents of order 1: fresh ones are ~1e-6, below the BatchNorm's epsilon and
    subnormal in float16 (zeros): the BatchNorm is calibrated on noise, as training calibrates it on data."""
    torch.manual_seed(seed)
    encoder = EfficientNetEncoder().eval()
    conv, norm = encoder.mapper
    noise = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(seed))
    features = conv(encoder.backbone(noise))
    conv.weight /= features.std()
    features = features / features.std()
    norm.running_mean.copy_(features.mean(dim=(0, 2, 3)))
    norm.running_var.copy_(features.var(dim=(0, 2, 3)))
    return encoder


def _write_previewer(models_dir: Path, seed: int = 4) -> Path:
    """The full-size previewer (it is small) with random weights, as ``previewer.safetensors``."""
    torch.manual_seed(seed)
    return _save_official(Previewer().state_dict(), models_dir / files._FILES["previewer"].path)


def _write_tokenizer(models_dir: Path) -> Path:
    """A CLIP BPE tokenizer with the real one's layout: byte symbols, byte symbols + ``</w>``, merges,
    then ``<|startoftext|>`` and ``<|endoftext|>`` as the highest ids; pads with ``!`` like bigG's."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())  # the 256 symbols CLIP's byte-level BPE starts from
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    for word in _TINY_WORDS:
        prefix = word[0]
        for i, char in enumerate(word[1:], start=1):
            piece = char + ("</w>" if i == len(word) - 1 else "")
            merged = prefix + piece
            if merged not in tokens:
                merges.append(f"{prefix} {piece}")
                tokens.append(merged)
            prefix = merged
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder = models_dir / files._FILES["tokenizer"].path
    with _atomic_files(folder) as temporary:
        vocab = json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False)
        (temporary / "vocab.json").write_text(vocab, encoding="utf-8")
        (temporary / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer(
            vocab=str(temporary / "vocab.json"), merges=str(temporary / "merges.txt"), pad_token="!"
        )
        tokenizer.model_max_length = 77
        tokenizer.save_pretrained(temporary)
    return folder


def _text_encoder_config(vocab_size: int) -> CLIPTextConfig:
    """The tiny ``CLIPTextConfig``, with bigG's quirks: eos_token_id=2 (pooling at the highest token
    id), gelu, 77 positions. The benchmarks build their tiny text encoder from it too."""
    from transformers import CLIPTextConfig

    special = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
    return CLIPTextConfig(
        vocab_size=vocab_size, max_position_embeddings=77, hidden_act="gelu", **_TINY_CLIP, **special
    )


def _write_text_encoder(models_dir: Path, precision: _Precision, seed: int = 5) -> Path:
    """bigG's quirks (:func:`_text_encoder_config`), tiny; write the tokenizer first: its vocabulary size."""
    from transformers import CLIPTextModelWithProjection

    vocab_size = len(json.loads((models_dir / files._FILES["tokenizer"].path / "vocab.json").read_text()))
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(_text_encoder_config(vocab_size)).to(_DTYPE_NAMES[precision])
    folder = models_dir / "text_encoder"
    with _atomic_files(folder) as temporary:
        model.save_pretrained(temporary, variant="bf16" if precision == "bf16" else None)
    return folder


def _write_image_encoder(models_dir: Path, precision: _Precision, seed: int = 6) -> Path:
    """The image encoder and its ``feature_extractor/``, saved as ``transformers`` saves the real ones."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        **{**_TINY_CLIP, "projection_dim": _IMAGE_EMBED}, image_size=_IMAGE_SIZE, patch_size=8
    )
    model = CLIPVisionModelWithProjection(config).to(_DTYPE_NAMES[precision])
    folder = models_dir / "image_encoder"
    with _atomic_files(folder) as temporary:
        model.save_pretrained(temporary, variant="bf16" if precision == "bf16" else None)
    processor = CLIPImageProcessor(
        size={"shortest_edge": _IMAGE_SIZE}, crop_size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}
    )
    with _atomic_files(models_dir / "feature_extractor") as temporary:
        processor.save_pretrained(temporary)
    return folder


def _write_controlnets(models_dir: Path, precision: _Precision = "bf16", seed: int = 7) -> list[Path]:
    """The released three for the tiny Stage C: the real bottlenecks (fixed shapes: 47 MB a file in bf16,
    super-resolution's 346 MB), random last projections (not the official zeros), so the control shows."""
    unet = _tiny_unet("stage_c", seed)
    width = unet.config.block_out_channels[0]
    paths = []
    for i, kind in enumerate(CONTROLNET_TYPES.values()):
        torch.manual_seed(seed + i)
        model = ControlNet(kind.c_in, width, _fed_blocks(unet, kind), kind.bottleneck_mode)
        for projection in model.projections:
            projection[-1].reset_parameters()
        paths.append(_save_official(model.state_dict(), models_dir / kind.file.path, _DTYPE_NAMES[precision]))
    return paths


def _write_official_lora(models_dir: Path, seed: int = 7) -> Path:
    """The official example LoRA's format for the tiny Stage C: rank 4, and the ``[fernando]`` token at
    the id official training gives it (the tokenizer's size: write the tokenizer first)."""
    from .lora.formats import _official_lora_layout

    vocab_size = len(json.loads((models_dir / files._FILES["tokenizer"].path / "vocab.json").read_text()))
    unet = _tiny_unet("stage_c", seed)
    layout, width = _official_lora_layout(unet), unet.config.block_out_channels[0]
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for i, names in enumerate(layout):
        state[f"weights.{i}.lora_down"] = torch.randn(4, width, generator=generator) * 0.05
        state[f"weights.{i}.lora_up"] = torch.randn(len(names) * width, 4, generator=generator)
    state["embeddings.embeddings"] = torch.randn(1, _TEXT_HIDDEN, generator=generator) * 0.05
    state["embeddings.indices"] = torch.tensor([vocab_size])
    return _save_official(state, models_dir / files.LORA_FERNANDO.path)


def write_tiny_models(
    models_dir: str | Path = _DEFAULT_TINY_DIR,
    *,
    stage_c: Size = "big",
    stage_b: Size = "big",
    precision: _Precision = "bf16",
    seed: int = 0,
    both_stage_b: bool = False,
    controlnets: bool = False,
    lora: bool = False,
) -> Path:
    """Write, tiny, the files ``bash download_models.sh essential <variant> <precision>`` would fetch.

    Args:
        models_dir: the folder to fill; files there are replaced.
        stage_c, stage_b: "big" or "lite": the file names only (the weights are always tiny).
        precision: "bf16" or "fp32": the file names and dtypes.
        seed: the first model's seed; the others use fixed offsets from it.
        both_stage_b: also the other Stage B size (other weights): the reconstruction notebook compares them.
        controlnets: also the ControlNets (``bash download_models.sh controlnet``).
        lora: also the official example LoRA (``bash download_models.sh lora``).

    Returns:
        ``models_dir``.
    """
    models_dir = Path(models_dir)
    _write_unet(models_dir, "stage_c", stage_c, precision, seed)
    _write_unet(models_dir, "stage_b", stage_b, precision, seed + 1)
    if both_stage_b:
        _write_unet(models_dir, "stage_b", "lite" if stage_b == "big" else "big", precision, seed + 8)
    _write_stage_a(models_dir, seed + 2)
    _save_official(_random_effnet(seed + 3).state_dict(), models_dir / files._FILES["effnet"].path)
    _write_previewer(models_dir, seed + 4)
    _write_tokenizer(models_dir)
    _write_text_encoder(models_dir, precision, seed + 5)
    _write_image_encoder(models_dir, precision, seed + 6)
    if controlnets:
        _write_controlnets(models_dir, precision, seed + 7)
    if lora:
        _write_official_lora(models_dir, seed + 7)
    return models_dir


def _demo_picture(models_dir: str | Path, stage_b: Size = "big", stage_c: Size = "big") -> Path:
    """The install check of ``--demo``: the models through the real loaders, one 512² picture saved."""
    from .generation import text_to_image
    from .loading import load_decoder, load_prior

    prior = load_prior(models_dir, stage_c, image_encoder=False, effnet=False)
    decoder = load_decoder(models_dir, stage_b)
    result = text_to_image(prior, decoder, "a photo of a red cat", height=512, width=512, seed=0)
    path = Path(models_dir).parent / "tiny_demo.png"
    with _atomic_path(path) as temporary:
        result.images[0].save(temporary, format="PNG")
    return path


def main(argv: list[str] | None = None) -> None:
    """``python -m cascade_helpers.tiny``: write the tiny models, and with ``--demo`` make a picture."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models-dir", type=Path, default=_DEFAULT_TINY_DIR)
    parser.add_argument("--variant", choices=tuple(files._VARIANTS), default="big-big")
    parser.add_argument("--precision", choices=tuple(files._PRECISIONS_BY_WORD), default="bfloat16")
    for flag, what in (
        ("--controlnets", "also the ControlNets (download_models.sh controlnet)"),
        ("--lora", "also the official example LoRA (download_models.sh lora)"),
        ("--both-stage-b", "also the other Stage B size (reconstruct_images.ipynb)"),
        ("--all", "all of the above: every file the notebooks read"),
        ("--demo", "then generate one (random-weights) picture with them"),
    ):
        parser.add_argument(flag, action="store_true", help=what)
    args = parser.parse_args(argv)
    stage_b, stage_c = files._VARIANTS[args.variant]
    precision = files._PRECISIONS_BY_WORD[args.precision]
    extras = {name: getattr(args, name) or args.all for name in ("controlnets", "lora", "both_stage_b")}
    folder = write_tiny_models(
        args.models_dir, stage_c=stage_c, stage_b=stage_b, precision=precision, **extras
    )
    print(f"tiny random models written to {folder}/")
    if args.demo:
        path = _demo_picture(folder, stage_b=stage_b, stage_c=stage_c)
        print(f"picture from RANDOM tiny weights (noise, not art) saved to {path}: your install works")


if __name__ == "__main__":
    main()
