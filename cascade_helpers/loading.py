"""Load Stable Cascade from a local ``models/`` folder (offline) or from the Hub.

A local folder is laid out as ``download_models.sh`` leaves it: the official single files
(``stage_c_bf16.safetensors`` ...) plus the CLIP text encoder, tokenizer and image encoder in their
``transformers`` folders. Loading it never opens a network connection: the UNet configs ship in
this package (``cascade_helpers/configs``), so diffusers' ``from_single_file`` has nothing to look
up.

Before reading any weights every file is checked: missing files are reported together with the
exact download command, an interrupted download is recognized from the safetensors header, and a
file that holds the wrong model (a Stage B in Stage C's slot, a lite checkpoint where big was asked
for) is named as such.

A Hub repo id (``stabilityai/stable-cascade-prior`` / ``stabilityai/stable-cascade``) loads the
diffusers folders instead, for users with internet access.

Every model is read from safetensors files only (``use_safetensors=True``, local and Hub): a pickled
``.bin`` can run code when it is loaded, and a folder or repo that has nothing else fails with the
library's error naming the missing file instead of falling back to one. (Tokenizers and
preprocessing configs are plain text and JSON.)
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from . import files
from .checkpoints import Architecture, config_dir, stage_a_from_official
from .devices import MemoryMode, check_memory, pick_device, pick_dtype, place
from .effnet import EfficientNetEncoder
from .file_checks import (
    MissingModelFileError,
    check_files,
    check_present,
    choose_precision_file,
    fetch_command,
    inspect_file,
    size_present,
)
from .files import ModelFile, Size
from .float8 import _check_float8, store_in_float8
from .float16 import rescale_for_float16
from .models import ClipImageSettings, Decoder, Prior, TextEncoder
from .previewer import Previewer

# the bundles and the missing-file error were defined here before; importing them from here still works
__all__ = [
    "ClipImageSettings",
    "Decoder",
    "MissingModelFileError",
    "Prior",
    "TextEncoder",
    "is_local_folder",
    "load_decoder",
    "load_effnet",
    "load_prior",
    "load_stage_a",
    "load_strict",
    "load_text_encoder",
    "load_unet_single_file",
]


# --- building blocks ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers logs a harmless 'modules kept in float32: []' notice on every single-file load."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def load_unet_single_file(path: Path, kind: str, architecture: Architecture, dtype: torch.dtype) -> nn.Module:
    """An official Stage B/C file → diffusers ``StableCascadeUNet``, with our shipped config (offline).

    Args:
        path: the single file (already checked: :func:`cascade_helpers.file_checks.inspect_file`).
        kind: "stage_c" or "stage_b".
        architecture: "big", "lite" or "tiny": which shipped config to build.
        dtype: the weights' dtype after loading (cast from the file's).

    Returns:
        The UNet in eval mode, gradients off, on the CPU.
    """
    from .upstream import StableCascadeUNet

    with _quiet_diffusers():
        unet = StableCascadeUNet.from_single_file(
            str(path), config=str(config_dir(kind, architecture)), torch_dtype=dtype, local_files_only=True
        )
    return unet.eval().requires_grad_(False)


def load_stage_a(path: Path, architecture: Architecture) -> nn.Module:
    """Official ``stage_a.safetensors`` → diffusers ``PaellaVQModel`` (float32: it is small, and the
    official code never casts it).

    Args:
        path: the single file.
        architecture: "big" (the released one) or "tiny".

    Returns:
        The VQGAN in eval mode, gradients off, float32, on the CPU; every key must match.
    """
    from accelerate import init_empty_weights

    from .upstream import PaellaVQModel

    with init_empty_weights():
        vqgan = PaellaVQModel.from_config(PaellaVQModel.load_config(config_dir("stage_a", architecture)))
    vqgan.load_state_dict(_float32(stage_a_from_official(load_file(str(path)))), strict=True, assign=True)
    return vqgan.eval().requires_grad_(False)


def _float32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors to float32; integer buffers (BatchNorm's ``num_batches_tracked``) untouched."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_strict(module: nn.Module, path: Path) -> nn.Module:
    """Load an official single file into one of our modules; every key must match.

    Args:
        module: an :class:`~cascade_helpers.effnet.EfficientNetEncoder` or
            :class:`~cascade_helpers.previewer.Previewer`, freshly built.
        path: its safetensors file; floating tensors are cast to float32.

    Returns:
        ``module``, loaded, in eval mode, gradients off.
    """
    module.load_state_dict(_float32(load_file(str(path))), strict=True)
    return module.eval().requires_grad_(False)


def _transformers_variant(file: ModelFile) -> str | None:
    return "bf16" if file.precision == "bf16" else None


def read_clip_image_settings(folder: Path) -> ClipImageSettings:
    config = json.loads((folder / "preprocessor_config.json").read_text())
    size = config.get("size", {})
    crop = config.get("crop_size", {})
    resize = size.get("shortest_edge", size.get("height", 224)) if isinstance(size, dict) else int(size)
    crop_hw = (
        (crop.get("height", resize), crop.get("width", resize)) if isinstance(crop, dict) else (crop, crop)
    )
    return ClipImageSettings(resize, crop_hw, tuple(config["image_mean"]), tuple(config["image_std"]))


_HUB_ID = re.compile(r"[A-Za-z0-9][\w-]*/[\w.-]+")


def is_local_folder(source: str | Path) -> bool:
    """A folder (existing or not) unless it is a string shaped like a Hub repo id (``owner/name``)
    and no such folder exists here. ``./x/y`` or ``../models`` are always folders."""
    return isinstance(source, Path) or Path(source).is_dir() or not _HUB_ID.fullmatch(source)


@contextlib.contextmanager
def _explain_hub_failure(repo: str) -> Iterator[None]:
    """A failed Hub load most often means a mistyped local folder or no internet: say both."""
    try:
        yield
    except OSError as error:
        only = (
            " Only safetensors weights are read, never pickled .bin files: the repo has no safetensors weights "
            "for this model."
            if "safetensors" in str(error)
            else ""
        )
        raise MissingModelFileError(
            f"{repo!r} is not a folder here, and loading it as a Hub repo failed ({error}).{only} For local files "
            f"pass the models folder, e.g. load_prior('models'); to fetch them: bash download_models.sh essential big-big"
        ) from error


# --- the prior ---------------------------------------------------------------------------------------


def load_prior(
    source: str | Path = "models",
    variant: Size = "big",
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    memory: MemoryMode = "gpu",
    image_encoder: bool = True,
    effnet: bool = True,
    previewer: bool = True,
    allow_float16: bool = False,
    float8: bool = False,
) -> Prior:
    """Stage C with its text encoder and tokenizer, and optionally the CLIP image encoder (image
    variation), the EfficientNet encoder (image-to-image) and the previewer (live previews).

    Args:
        source: a models folder (offline; default "models") or the Hub repo
            ``stabilityai/stable-cascade-prior`` (its diffusers folders; EfficientNet and previewer
            from ``stabilityai/stable-cascade``).
        variant: Stage C's size, "big" (official, 3.6 B parameters) or "lite".
        dtype: defaults to bfloat16 on GPUs that support it, else float32. float16 rescales Stage C's
            last block group (:mod:`cascade_helpers.float16`), which would overflow otherwise.
            In a folder the weight files of that precision are read if present, else the other form,
            cast on load.
        device: "cpu", "cuda", "cuda:1", "mps" or None (the best there is).
        memory: "gpu", "model_offload" or "sequential_offload" (:mod:`cascade_helpers.devices`) for
            Stage C and the CLIP encoders; EfficientNet and previewer stay on ``device``.
        image_encoder, effnet, previewer: load these optional parts (all True by default); without
            them image variation, image-to-image and ControlNet init pictures, and previews fail
            with an error naming the flag.
        allow_float16: True runs Stage C in float16 without the rescale (only to reproduce its black
            pictures).
        float8: store Stage C's weights in float8 (:mod:`cascade_helpers.float8`): a byte a weight.

    Returns:
        The :class:`~cascade_helpers.models.Prior`.

    Raises:
        MissingModelFileError: files are missing from the folder (named, with the command that fetches
            them), or ``source`` is neither a folder nor a Hub repo that could be loaded.
        WrongCheckpointError: Stage C's file holds another model or another size than ``variant``.
        CheckpointError: a file is damaged or cut short (``TruncatedCheckpointError``).
        ValueError: an unknown variant, memory mode, device or dtype; float8 with sequential offload;
            float16 for a Stage C the rescale cannot help (``UnsupportedPrecisionError``, saying why).
    """
    variant = files.check_size_word(variant)
    memory = check_memory(memory)
    _check_float8(float8, memory)
    device = pick_device(device)
    dtype = pick_dtype(dtype, device, stage="Stage C", allow_float16=True)  # float16: rescaled on load
    precision = (dtype, device, not allow_float16, float8)
    if not is_local_folder(source):
        with _explain_hub_failure(source):
            return _load_prior_from_hub(
                str(source), variant, precision, memory, image_encoder, effnet, previewer
            )
    models_dir = Path(source)
    stage_c = choose_precision_file(models_dir, files.STAGE_C[variant], dtype)
    text_weights = choose_precision_file(models_dir, files.TEXT_ENCODER, dtype)
    needed = [stage_c, files.TEXT_ENCODER_CONFIG, text_weights, files.TOKENIZER]  # Stage C first
    if image_encoder:
        image_weights = choose_precision_file(models_dir, files.IMAGE_ENCODER, dtype)
        needed += [files.IMAGE_ENCODER_CONFIG, image_weights, files.FEATURE_EXTRACTOR]
    needed += [files.EFFNET] if effnet else []
    needed += [files.PREVIEWER] if previewer else []
    stage_b = size_present(models_dir, files.STAGE_B)
    check_present(models_dir, needed, stage_b=stage_b, stage_c=variant)

    command = fetch_command(models_dir, [stage_c], stage_b, variant)
    _, architecture = inspect_file(models_dir / stage_c.path, "stage_c", variant, command)
    check_files(models_dir, needed[1:])  # everything else: encoders, configs, tokenizer

    from transformers import CLIPVisionModelWithProjection

    unet = load_unet_single_file(models_dir / stage_c.path, "stage_c", architecture, dtype)
    unet = place(_fit_precision(unet, *precision), device, memory)
    text_encoder, tokenizer = _text_encoder_from_folder(models_dir, text_weights, dtype)
    prior = Prior(
        unet=unet,
        text_encoder=place(text_encoder, device, memory),
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        architecture=architecture,
        files=[models_dir / f.path for f in needed],
    )
    if image_encoder:
        vision = CLIPVisionModelWithProjection.from_pretrained(
            models_dir / "image_encoder",
            variant=_transformers_variant(image_weights),
            dtype=dtype,
            local_files_only=True,
            use_safetensors=True,
        )
        prior.image_encoder = place(vision.eval().requires_grad_(False), device, memory)
        prior.clip_image = read_clip_image_settings(models_dir / "feature_extractor")
    if effnet:
        prior.effnet = place(
            load_strict(EfficientNetEncoder(), models_dir / files.EFFNET.path), device, memory, small=True
        )
    if previewer:
        prior.previewer = place(
            load_strict(Previewer(), models_dir / files.PREVIEWER.path), device, memory, small=True
        )
    return prior


def _hub_file(repo: str, file: ModelFile) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo, file.path))


def _hub_variant(dtype: torch.dtype) -> str | None:
    """The Hub repos keep bfloat16 weights as the ``bf16`` variant beside the float32 ones."""
    return "bf16" if dtype == torch.bfloat16 else None


def _text_encoder_from_hub(repo: str, dtype: torch.dtype) -> tuple[nn.Module, object]:
    """The ``text_encoder/`` and ``tokenizer/`` folders of a Hub repo (both published repos have them)."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    text_encoder = CLIPTextModelWithProjection.from_pretrained(
        repo, subfolder="text_encoder", variant=_hub_variant(dtype), dtype=dtype, use_safetensors=True
    )
    tokenizer = CLIPTokenizer.from_pretrained(repo, subfolder="tokenizer")
    return text_encoder.eval().requires_grad_(False), tokenizer


def _fit_precision(
    unet: nn.Module, dtype: torch.dtype, device: torch.device, rescale: bool, float8: bool
) -> nn.Module:
    """The float16 rescale and float8 storage, before the UNet is placed: both need it whole."""
    if rescale and dtype == torch.float16:
        rescale_for_float16(unet, device=device)
    if float8:
        store_in_float8(unet, dtype)
    return unet


def _load_prior_from_hub(repo, variant, precision, memory, image_encoder, effnet, previewer) -> Prior:
    """The diffusers folders of ``stabilityai/stable-cascade-prior``; EfficientNet and previewer come
    as the official single files from ``stabilityai/stable-cascade`` (the prior repo has none)."""
    from transformers import CLIPVisionModelWithProjection

    from .upstream import StableCascadeUNet

    dtype, device = precision[:2]
    subfolder = "prior" if variant == "big" else "prior_lite"
    unet = StableCascadeUNet.from_pretrained(
        repo, subfolder=subfolder, variant=_hub_variant(dtype), torch_dtype=dtype, use_safetensors=True
    )
    text_encoder, tokenizer = _text_encoder_from_hub(repo, dtype)
    prior = Prior(
        unet=place(_fit_precision(unet.eval().requires_grad_(False), *precision), device, memory),
        text_encoder=place(text_encoder, device, memory),
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        architecture=variant,
    )
    if image_encoder:
        from huggingface_hub import snapshot_download

        vision = CLIPVisionModelWithProjection.from_pretrained(
            repo, subfolder="image_encoder", variant=_hub_variant(dtype), dtype=dtype, use_safetensors=True
        )
        prior.image_encoder = place(vision.eval().requires_grad_(False), device, memory)
        local = Path(snapshot_download(repo, allow_patterns=[files.FEATURE_EXTRACTOR.path]))
        prior.clip_image = read_clip_image_settings(local / "feature_extractor")
    if effnet:
        path = _hub_file(files.REPO_DECODER, files.EFFNET)
        prior.effnet = place(load_strict(EfficientNetEncoder(), path), device, memory, small=True)
    if previewer:
        path = _hub_file(files.REPO_DECODER, files.PREVIEWER)
        prior.previewer = place(load_strict(Previewer(), path), device, memory, small=True)
    return prior


# --- the decoder -------------------------------------------------------------------------------------


def load_decoder(
    source: str | Path = "models",
    variant: Size = "big",
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    memory: MemoryMode = "gpu",
    float8: bool = False,
) -> Decoder:
    """Stage B (``variant`` big or lite) and Stage A. The decoder needs no text encoder of its own:
    it is conditioned on the pooled prompt embedding the prior's text encoder already computed.

    Args:
        source: a models folder (offline; default "models") or the Hub repo ``stabilityai/stable-cascade``.
        variant: Stage B's size, "big" (official, 1.5 B parameters) or "lite".
        dtype: Stage B's dtype; defaults as for :func:`load_prior` (float16 is accepted here).
            Stage A always runs in float32.
        device, memory: as for :func:`load_prior`; Stage A stays on ``device``.
        float8: store Stage B's weights in float8, as for :func:`load_prior`.

    Returns:
        The :class:`~cascade_helpers.models.Decoder`.

    Raises:
        MissingModelFileError, WrongCheckpointError, CheckpointError, ValueError: as for
            :func:`load_prior`, for Stage B's and Stage A's files.
    """
    variant = files.check_size_word(variant)
    memory = check_memory(memory)
    _check_float8(float8, memory)
    device = pick_device(device)
    dtype = pick_dtype(dtype, device, stage="Stage B")
    if not is_local_folder(source):
        with _explain_hub_failure(source):
            return _load_decoder_from_hub(source, variant, dtype, device, memory, float8)
    models_dir = Path(source)
    stage_b = choose_precision_file(models_dir, files.STAGE_B[variant], dtype)
    stage_c = size_present(models_dir, files.STAGE_C)
    check_present(models_dir, [stage_b, files.STAGE_A], stage_b=variant, stage_c=stage_c)
    _, architecture = inspect_file(
        models_dir / stage_b.path,
        "stage_b",
        variant,
        fetch_command(models_dir, [stage_b], variant, stage_c),
    )
    _, stage_a_architecture = inspect_file(
        models_dir / files.STAGE_A.path, "stage_a", None, fetch_command(models_dir, [files.STAGE_A])
    )
    unet = load_unet_single_file(models_dir / stage_b.path, "stage_b", architecture, dtype)
    unet = _fit_precision(unet, dtype, device, False, float8)
    vqgan = load_stage_a(models_dir / files.STAGE_A.path, stage_a_architecture)
    return Decoder(
        unet=place(unet, device, memory),
        vqgan=place(vqgan, device, memory, small=True),
        device=device,
        dtype=dtype,
        architecture=architecture,
        files=[models_dir / stage_b.path, models_dir / files.STAGE_A.path],
    )


def _load_decoder_from_hub(repo, variant, dtype, device, memory, float8) -> Decoder:
    from .upstream import PaellaVQModel, StableCascadeUNet

    subfolder = "decoder" if variant == "big" else "decoder_lite"
    unet = StableCascadeUNet.from_pretrained(
        repo, subfolder=subfolder, variant=_hub_variant(dtype), torch_dtype=dtype, use_safetensors=True
    )
    vqgan = PaellaVQModel.from_pretrained(
        repo, subfolder="vqgan", torch_dtype=torch.float32, use_safetensors=True
    )
    unet = _fit_precision(unet.eval().requires_grad_(False), dtype, device, False, float8)
    return Decoder(
        unet=place(unet, device, memory),
        vqgan=place(vqgan.eval().requires_grad_(False), device, memory, small=True),
        device=device,
        dtype=dtype,
        architecture=variant,
    )


# --- the autoencoder's parts alone: EfficientNet encoder, CLIP text encoder -----------------------------
# Reconstruction (images → Stage C latents → images) needs neither Stage C nor the image encoder: these
# load the encoder and the text encoder by themselves, with the same checks as the bundles above.


def _text_encoder_from_folder(
    models_dir: Path, weights: ModelFile, dtype: torch.dtype
) -> tuple[nn.Module, object]:
    """The ``transformers`` folders ``text_encoder/`` and ``tokenizer/`` (already checked present)."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    text_encoder = CLIPTextModelWithProjection.from_pretrained(
        models_dir / "text_encoder",
        variant=_transformers_variant(weights),
        dtype=dtype,
        local_files_only=True,
        use_safetensors=True,
    )
    tokenizer = CLIPTokenizer.from_pretrained(models_dir / files.TOKENIZER.path, local_files_only=True)
    return text_encoder.eval().requires_grad_(False), tokenizer


def load_effnet(
    source: str | Path = "models",
    *,
    device: str | torch.device | None = None,
) -> EfficientNetEncoder:
    """The EfficientNet encoder alone (images → Stage C latents), in float32 — 81 MB instead of the 7 GB
    Stage C that ``load_prior(..., effnet=True)`` also loads.

    Args:
        source: a models folder (offline) or the Hub repo ``stabilityai/stable-cascade``.
        device: as for :func:`load_prior` (no offloading: it is small).

    Returns:
        The encoder, float32, in eval mode, on ``device``.

    Raises:
        MissingModelFileError: ``effnet_encoder.safetensors`` is missing (with the command).
        CheckpointError: it is damaged or holds another model.
    """
    device = pick_device(device)
    if not is_local_folder(source):
        with _explain_hub_failure(source):
            return load_strict(EfficientNetEncoder(), _hub_file(source, files.EFFNET)).to(device)
    models_dir = Path(source)
    check_present(models_dir, [files.EFFNET])
    check_files(models_dir, [files.EFFNET])
    return load_strict(EfficientNetEncoder(), models_dir / files.EFFNET.path).to(device)


def load_text_encoder(
    source: str | Path = "models",
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    memory: MemoryMode = "gpu",
) -> TextEncoder:
    """The CLIP text encoder and tokenizer alone (1.4 GB in bfloat16).

    Args:
        source: a models folder (offline) or a Hub repo with ``text_encoder/`` and ``tokenizer/``
            folders (``stabilityai/stable-cascade``).
        dtype, device, memory: as for :func:`load_prior` (float16 is accepted here).

    Returns:
        The :class:`~cascade_helpers.models.TextEncoder`, which ``conditioning.encode_text`` accepts
        like a prior.

    Raises:
        MissingModelFileError, CheckpointError, ValueError: as for :func:`load_prior`.
    """
    memory = check_memory(memory)
    device = pick_device(device)
    dtype = pick_dtype(dtype, device, stage="text encoder")
    if not is_local_folder(source):
        with _explain_hub_failure(source):
            text_encoder, tokenizer = _text_encoder_from_hub(source, dtype)
    else:
        models_dir = Path(source)
        weights = choose_precision_file(models_dir, files.TEXT_ENCODER, dtype)
        check_present(models_dir, [files.TEXT_ENCODER_CONFIG, weights, files.TOKENIZER])
        check_files(models_dir, [files.TEXT_ENCODER_CONFIG, weights, files.TOKENIZER])
        text_encoder, tokenizer = _text_encoder_from_folder(models_dir, weights, dtype)
    return TextEncoder(place(text_encoder, device, memory), tokenizer, device, dtype)
