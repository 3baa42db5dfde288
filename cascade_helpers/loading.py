"""Load Stable Cascade from a local ``models/`` folder (offline) or from the Hub.

A folder is laid out as ``download_models.sh`` leaves it: the official single files plus the CLIP
folders of ``transformers``; the UNet configs ship in this package, so loading opens no connection.
Every file is checked before any weight is read. A Hub repo id loads the diffusers folders instead.
Weights come from safetensors only: a pickled ``.bin`` can run code when loaded, and is never a fallback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from . import files
from .checkpoints import _Architecture, _stage_a_from_official, config_dir
from .devices import MemoryMode, _check_memory, _place, pick_device, pick_dtype
from .effnet import EfficientNetEncoder
from .file_checks import (
    MissingModelFileError,
    _check_files,
    _check_present,
    _choose_precision_file,
    _fetch_command,
    _inspect_file,
    _size_present,
)
from .files import ModelFile, Size
from .float8 import _check_float8, store_in_float8
from .float16 import rescale_for_float16
from .memory import MemoryPlan, _plan_for_load
from .models import Decoder, Prior, TextEncoder, _ClipImageSettings
from .previewer import Previewer

_Placer = Callable[[nn.Module, str], nn.Module]


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


def _load_unet(path: Path, kind: str, architecture: _Architecture, dtype: torch.dtype) -> nn.Module:
    """With our shipped config: diffusers would look it up on the Hub."""
    from .upstream import StableCascadeUNet

    with _quiet_diffusers():
        unet = StableCascadeUNet.from_single_file(
            str(path), config=str(config_dir(kind, architecture)), torch_dtype=dtype, local_files_only=True
        )
    return unet.eval().requires_grad_(False)


def _load_stage_a(path: Path, architecture: _Architecture) -> nn.Module:
    """diffusers has no single-file loader for Stage A; float32: it is small, and never cast officially."""
    from accelerate import init_empty_weights

    from .upstream import PaellaVQModel

    with init_empty_weights():
        vqgan = PaellaVQModel.from_config(PaellaVQModel.load_config(config_dir("stage_a", architecture)))
    vqgan.load_state_dict(_float32(_stage_a_from_official(load_file(str(path)))), strict=True, assign=True)
    return vqgan.eval().requires_grad_(False)


def _float32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Integer buffers (BatchNorm's ``num_batches_tracked``) stay integers."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _load_strict(module: nn.Module, path: Path) -> nn.Module:
    """EfficientNet and previewer are our modules, not diffusers models: float32, every key matched."""
    module.load_state_dict(_float32(load_file(str(path))), strict=True)
    return module.eval().requires_grad_(False)


def _clip(tower: str, where: Path | str, dtype: torch.dtype, bf16: bool, **options) -> nn.Module:
    """A CLIP tower (``text_encoder``, ``image_encoder``) of a models folder or a Hub repo: same layout,
    bfloat16 weights as transformers' ``bf16`` variant."""
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    model_class = CLIPTextModelWithProjection if tower == "text_encoder" else CLIPVisionModelWithProjection
    model = model_class.from_pretrained(
        where, subfolder=tower, dtype=dtype, variant="bf16" if bf16 else None, use_safetensors=True, **options
    )
    return model.eval().requires_grad_(False)


def _text_encoder(where: Path | str, dtype: torch.dtype, bf16: bool, **options) -> tuple[nn.Module, object]:
    """The ``text_encoder/`` and ``tokenizer/`` folders: every models folder and Hub repo has both."""
    from transformers import CLIPTokenizer

    text_encoder = _clip("text_encoder", where, dtype, bf16, **options)
    return text_encoder, CLIPTokenizer.from_pretrained(where, subfolder="tokenizer", **options)


def _read_clip_image_settings(folder: Path) -> _ClipImageSettings:
    """transformers writes ``size`` as a number or a dict: both are read."""
    config = json.loads((folder / "preprocessor_config.json").read_text())
    size, crop = config.get("size", {}), config.get("crop_size", {})
    resize = size.get("shortest_edge", size.get("height", 224)) if isinstance(size, dict) else int(size)
    crop_hw = (
        (crop.get("height", resize), crop.get("width", resize)) if isinstance(crop, dict) else (crop, crop)
    )
    return _ClipImageSettings(resize, crop_hw, tuple(config["image_mean"]), tuple(config["image_std"]))


_HUB_ID = re.compile(r"[A-Za-z0-9][\w-]*/[\w.-]+")


def _is_local_folder(source: str | Path) -> bool:
    """A string shaped like ``owner/name`` is a Hub repo unless such a folder exists (``./x/y`` is one)."""
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
            f"pass the models folder, e.g. load_prior('models'); to fetch them: "
            f"{files.download_command([*files._essential_files('bf16'), files.STAGE_C['big']['bf16']])}"
        ) from error


def _hub_file(repo: str, file: ModelFile) -> Path:
    """One file of a Hub repo through huggingface_hub's cache, like the diffusers folders."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo, file.path))


def _settings(memory: object, device: object, dtype: object, float8: object):
    """Every loader checks its settings before any file is read (dtype None: the memory plan chooses)."""
    memory, device = _check_memory(memory), pick_device(device)
    _check_float8(float8, memory)
    return memory, device, None if dtype is None else pick_dtype(dtype, device)


def _fit_precision(unet: nn.Module, device: torch.device, rescale: bool, float8: bool) -> nn.Module:
    """Before the UNet is placed: the float16 rescale and float8 storage both need it whole."""
    dtype = next(unet.parameters()).dtype
    if rescale and dtype == torch.float16:
        rescale_for_float16(unet, device=device)
    if float8:
        store_in_float8(unet, dtype)
    return unet


def _planned(
    memory: str,
    device: torch.device,
    dtype: torch.dtype | None,
    stage: str,
    sizes: dict[str, Size],
    architecture: str,
    image_encoder: bool = True,
) -> tuple[torch.dtype, _Placer]:
    """The memory plan decides a bundle's dtype and placement; tiny test weights just go on the device."""
    known = "stage_c" if stage == "Stage C" else "stage_b"
    test = architecture == "tiny"
    plan = _plan_for_load(memory, device, dtype, sizes, known, image_encoder, test_weights=test)
    return plan._row(stage).dtype, _placer(device, plan)


def _placer(device: torch.device, plan: MemoryPlan) -> _Placer:
    """Each model of a bundle is placed as the memory plan says."""

    def place(model: nn.Module, name: str) -> nn.Module:
        mode = plan._row(name).mode
        return _place(model, device, "gpu" if mode == "cpu" else mode)

    return place


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
    variation), the EfficientNet encoder (image-to-image) and the previewer (live previews): checked
    now, read on first use.

    Args:
        source: a models folder (offline) or the Hub repo ``stabilityai/stable-cascade-prior``
            (EfficientNet and previewer then come from ``stabilityai/stable-cascade``).
        variant: Stage C's size, "big" (official, 3.6 B parameters) or "lite".
        dtype: for Stage C and the CLIP encoders; None: bfloat16 on GPUs that have it natively, float16
            on older ones, float32 on CPUs. float16 rescales Stage C's last block group on load
            (:mod:`cascade_helpers.float16`) against overflow. A folder's files of that precision are read
            if present, else the other form, cast.
        device: "cpu", "cuda", "cuda:1", "mps" or None (the best there is).
        memory: how Stage C and the CLIP encoders share the GPU (:mod:`cascade_helpers.devices`).
        image_encoder, effnet, previewer: False leaves that part out (what needs it fails naming the flag).
        allow_float16: float16 without the rescale (only to reproduce its black pictures).
        float8: store Stage C's weights in float8 (:mod:`cascade_helpers.float8`): a byte a weight.

    Returns:
        The :class:`~cascade_helpers.models.Prior`.

    Raises:
        MissingModelFileError: files missing from the folder (named, with the command that fetches them),
            or ``source`` is neither a folder nor a loadable Hub repo.
        CheckpointError: a file is damaged, cut short, or holds another model or size (with the command).
        ValueError: an unknown variant, memory mode, device or dtype; float8 with sequential offload;
            float16 where the rescale cannot help (``UnsupportedPrecisionError``, saying why).
    """
    variant = files._check_size(variant)
    memory, device, dtype = _settings(memory, device, dtype, float8)
    precision = {"rescale": not allow_float16, "float8": float8}
    wanted = {"image_encoder": image_encoder, "effnet": effnet, "previewer": previewer}
    if not _is_local_folder(source):
        sizes = {"stage_c": variant, "stage_b": variant}
        dtype, place = _planned(memory, device, dtype, "Stage C", sizes, variant, image_encoder)
        with _explain_hub_failure(source):
            return _prior_from_hub(str(source), variant, dtype, device, place, wanted, precision)
    models_dir = Path(source)
    stage_b = _size_present(models_dir, files.STAGE_B)
    form = dtype or pick_dtype(None, device)  # which file form to read; the plan may cast it
    stage_c = _choose_precision_file(models_dir, files.STAGE_C[variant], form)
    text, image = (_choose_precision_file(models_dir, files._WEIGHTS[n], form) for n in files._WEIGHTS)
    needed = [files._FILES["text_encoder_config"], text, files._FILES["tokenizer"]]
    if image_encoder:
        needed += [files._FILES["image_encoder_config"], image, files._FILES["feature_extractor"]]
    needed += [files._FILES[part] for part in ("effnet", "previewer") if wanted[part]]
    _check_present(models_dir, [stage_c, *needed], stage_b=stage_b, stage_c=variant)
    fetch = functools.partial(_fetch_command, models_dir, [stage_c], stage_b, variant)
    _, architecture = _inspect_file(models_dir / stage_c.path, "stage_c", variant, fetch)
    _check_files(models_dir, needed)  # everything else: encoders, configs, tokenizer
    sizes = {"stage_c": variant, "stage_b": stage_b or variant}
    dtype, place = _planned(memory, device, dtype, "Stage C", sizes, architecture, image_encoder)
    unet = _load_unet(models_dir / stage_c.path, "stage_c", architecture, dtype)
    text_encoder, tokenizer = _text_encoder(
        models_dir, dtype, text.precision == "bf16", local_files_only=True
    )
    return Prior(
        place(_fit_precision(unet, device, **precision), "Stage C"),
        place(text_encoder, "text encoder"),
        tokenizer,
        device,
        dtype,
        architecture,
        stage_c_file=models_dir / stage_c.path,
        clip_image=_read_clip_image_settings(models_dir / "feature_extractor") if image_encoder else None,
        _parts=_optional_parts(
            lambda file: models_dir / file.path,
            lambda: _clip(
                "image_encoder", models_dir, dtype, image.precision == "bf16", local_files_only=True
            ),
            wanted,
            place,
        ),
    )


def _optional_parts(
    single_file: Callable[[ModelFile], Path],
    image_encoder: Callable[[], nn.Module],
    wanted: dict[str, bool],
    place: _Placer,
) -> dict[str, Callable[[], nn.Module]]:
    """Read and placed on first use (``single_file``: where the official single files are, folder or Hub)."""
    loaders = {
        "image_encoder": image_encoder,
        "effnet": lambda: _load_strict(EfficientNetEncoder(), single_file(files._FILES["effnet"])),
        "previewer": lambda: _load_strict(Previewer(), single_file(files._FILES["previewer"])),
    }
    names = {"image_encoder": "image encoder", "effnet": "EfficientNet", "previewer": "previewer"}
    return {
        part: (lambda load=load, name=names[part]: place(load(), name))
        for part, load in loaders.items()
        if wanted[part]
    }


def _prior_from_hub(
    repo: str,
    variant: Size,
    dtype: torch.dtype,
    device: torch.device,
    place: _Placer,
    wanted: dict[str, bool],
    precision: dict[str, bool],
) -> Prior:
    """EfficientNet and previewer come from ``stabilityai/stable-cascade``: the prior repo has none."""
    from .upstream import StableCascadeUNet

    unet = StableCascadeUNet.from_pretrained(
        repo,
        subfolder="prior" if variant == "big" else "prior_lite",
        variant="bf16" if dtype == torch.bfloat16 else None,
        torch_dtype=dtype,
        use_safetensors=True,
    )
    text_encoder, tokenizer = _text_encoder(repo, dtype, dtype == torch.bfloat16)
    clip_image = None
    if wanted["image_encoder"]:
        clip_image = _read_clip_image_settings(_hub_file(repo, files._FILES["feature_extractor"]).parent)
    return Prior(
        place(_fit_precision(unet.eval().requires_grad_(False), device, **precision), "Stage C"),
        place(text_encoder, "text encoder"),
        tokenizer,
        device,
        dtype,
        variant,
        clip_image=clip_image,
        _parts=_optional_parts(
            lambda file: _hub_file(files._REPO_DECODER, file),
            lambda: _clip("image_encoder", repo, dtype, dtype == torch.bfloat16),
            wanted,
            place,
        ),
    )


def load_decoder(
    source: str | Path = "models",
    variant: Size = "big",
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    memory: MemoryMode = "gpu",
    float8: bool = False,
) -> Decoder:
    """Stage B and Stage A: no text encoder of their own, they take the prior's pooled prompt embedding.

    Args:
        source: a models folder (offline) or the Hub repo ``stabilityai/stable-cascade``.
        variant: Stage B's size, "big" (official, 1.5 B parameters) or "lite".
        dtype, device, memory, float8: as for :func:`load_prior`, for Stage B; Stage A runs in float32.

    Returns:
        The :class:`~cascade_helpers.models.Decoder`.

    Raises:
        MissingModelFileError, CheckpointError, ValueError: as for :func:`load_prior`.
    """
    variant = files._check_size(variant)
    memory, device, dtype = _settings(memory, device, dtype, float8)
    if not _is_local_folder(source):
        sizes = {"stage_c": variant, "stage_b": variant}
        dtype, place = _planned(memory, device, dtype, "Stage B", sizes, variant)
        with _explain_hub_failure(source):
            return _decoder_from_hub(source, variant, dtype, device, place, float8)
    models_dir = Path(source)
    stage_c = _size_present(models_dir, files.STAGE_C)
    form = dtype or pick_dtype(None, device)
    stage_b = _choose_precision_file(models_dir, files.STAGE_B[variant], form)
    stage_a = files._FILES["stage_a"]
    _check_present(models_dir, [stage_b, stage_a], stage_b=variant, stage_c=stage_c)
    fetch = functools.partial(_fetch_command, models_dir, [stage_b], variant, stage_c)
    _, architecture = _inspect_file(models_dir / stage_b.path, "stage_b", variant, fetch)
    _, stage_a_architecture = _inspect_file(
        models_dir / stage_a.path, "stage_a", None, lambda: _fetch_command(models_dir, [stage_a])
    )
    sizes = {"stage_c": stage_c or variant, "stage_b": variant}
    dtype, place = _planned(memory, device, dtype, "Stage B", sizes, architecture)
    unet = _load_unet(models_dir / stage_b.path, "stage_b", architecture, dtype)
    return Decoder(
        place(_fit_precision(unet, device, False, float8), "Stage B"),
        place(_load_stage_a(models_dir / stage_a.path, stage_a_architecture), "Stage A"),
        device,
        dtype,
        architecture,
        stage_b_file=models_dir / stage_b.path,
        stage_a_file=models_dir / stage_a.path,
    )


def _decoder_from_hub(
    repo: str, variant: Size, dtype: torch.dtype, device: torch.device, place: _Placer, float8: bool
) -> Decoder:
    """Stage A is the repo's ``vqgan`` folder, in float32 like the official single file."""
    from .upstream import PaellaVQModel, StableCascadeUNet

    unet = StableCascadeUNet.from_pretrained(
        repo,
        subfolder="decoder" if variant == "big" else "decoder_lite",
        variant="bf16" if dtype == torch.bfloat16 else None,
        torch_dtype=dtype,
        use_safetensors=True,
    )
    vqgan = PaellaVQModel.from_pretrained(
        repo, subfolder="vqgan", torch_dtype=torch.float32, use_safetensors=True
    )
    return Decoder(
        place(_fit_precision(unet.eval().requires_grad_(False), device, False, float8), "Stage B"),
        place(vqgan.eval().requires_grad_(False), "Stage A"),
        device,
        dtype,
        variant,
    )


def _load_effnet(
    source: str | Path = "models", *, device: str | torch.device | None = None
) -> EfficientNetEncoder:
    """Reconstruction needs this 81 MB, not the 7 GB Stage C that ``load_prior`` brings."""
    device = pick_device(device)
    if not _is_local_folder(source):
        with _explain_hub_failure(source):
            return _load_strict(EfficientNetEncoder(), _hub_file(source, files._FILES["effnet"])).to(device)
    models_dir = Path(source)
    _check_present(models_dir, [files._FILES["effnet"]])
    _check_files(models_dir, [files._FILES["effnet"]])
    return _load_strict(EfficientNetEncoder(), models_dir / files._FILES["effnet"].path).to(device)


def _load_text_encoder(
    source: str | Path = "models",
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    memory: MemoryMode = "gpu",
) -> TextEncoder:
    """Stage B's text conditioning for reconstruction (1.4 GB in bfloat16), without Stage C."""
    memory, device, dtype = _settings(memory, device, dtype, float8=False)
    alone = "model_offload" if memory == "auto" else memory  # alone it needs no plan: it takes turns
    plan = _plan_for_load(alone, device, dtype, {"stage_c": "big", "stage_b": "big"}, None)
    dtype = plan._row("text encoder").dtype
    if not _is_local_folder(source):
        with _explain_hub_failure(source):
            text_encoder, tokenizer = _text_encoder(source, dtype, dtype == torch.bfloat16)
    else:
        models_dir = Path(source)
        weights = _choose_precision_file(models_dir, files._WEIGHTS["text_encoder"], dtype)
        needed = [files._FILES["text_encoder_config"], weights, files._FILES["tokenizer"]]
        _check_present(models_dir, needed)
        _check_files(models_dir, needed)
        text_encoder, tokenizer = _text_encoder(
            models_dir, dtype, weights.precision == "bf16", local_files_only=True
        )
    return TextEncoder(_placer(device, plan)(text_encoder, "text encoder"), tokenizer, device, dtype)
