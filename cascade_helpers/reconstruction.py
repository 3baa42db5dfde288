"""Stable Cascade as an image autoencoder: pictures → 16-channel Stage C latents → pictures.

The EfficientNet encoder compresses a 1024×1024 picture to 16×24×24 latents (42.67× per side), and
Stage B + Stage A decode them back. That makes the pair a tool for training your own models in this
highly compressed space: encode a data set once (:func:`encode_folder`), train on the latents, decode
what your model produces (:func:`decode`).

Faithful to the official ``inference/reconstruct_images.ipynb``:

- pictures are scaled to cover the target size and centre-cropped (the official data loader's
  ``Resize`` + ``CenterCrop``), then downscaled by 3/4 with nearest neighbour, floored to multiples
  of 32, and ImageNet-normalized before the encoder (:func:`cascade_helpers.effnet.preprocess`);
- Stage B samples with cfg 1.1, shift 1, 10 steps from t = 1 (with the official guidance rescale
  0.7): the same settings as text-to-image's Stage B, :data:`OFFICIAL_RECONSTRUCTION`;
- the unconditional branch gets zero latents and the empty caption; the conditional branch gets the
  latents and a caption — the official notebook uses its data set's captions, we default to the
  empty caption (a reconstruction tool has no captions) and accept captions if you have them.

Differences we chose: the encoder runs in float32 (the official notebook runs everything under
bfloat16 autocast; the encoder is small), and the seed (42, as there) seeds noise drawn on the CPU,
so a seed gives the same pictures on every device but not the official notebook's exact draw.

Sizes are kept to multiples of 32: Stage A decodes 4× its latents, and Stage B's latents (a quarter
of the picture) then divide by 8, which its three 2× downsamplings need.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from . import files, values
from .atomic import _save_safetensors
from .checkpoints import CheckpointError, _read_header
from .conditioning import encode_text
from .devices import MemoryMode, pick_device, pick_dtype
from .effnet import EfficientNetEncoder
from .effnet import encode as effnet_encode
from .file_checks import _check_present, _choose_precision_file, _size_present
from .files import Size
from .images import IMAGE_SUFFIXES, ImageInput, batch_images, image_to_tensor, images_in_folder
from .loading import _is_local_folder, _load_effnet, _load_text_encoder, load_decoder
from .models import Decoder, TextEncoder
from .quality import DEFAULT_SIZE, Compression, Quality, compression, mean_quality, quality
from .sampling import OFFICIAL_DECODER, StageSettings
from .sizes import (
    _ENCODING,
    _LATENT_CHANNELS,
    _STRIDE,
    check_size,
)
from .sizes import (
    _image_size_for_latents as image_size_for_latents,
)
from .sizes import _stage_c_latent_size as latent_size
from .stages import decode_stage_a, generate_stage_b

# quality and compression live in cascade_helpers.quality; importing them from here still works
__all__ = [
    "DEFAULT_SIZE",
    "LATENT_SUFFIX",
    "LATENTS_KEY",
    "OFFICIAL_RECONSTRUCTION",
    "OFFICIAL_SEED",
    "Autoencoder",
    "Compression",
    "FolderEncoding",
    "Images",
    "Quality",
    "StoredLatents",
    "available_stage_b",
    "check_image_size",
    "compression",
    "decode",
    "encode",
    "encode_folder",
    "image_size_for_latents",
    "is_encoded",
    "latent_path",
    "latent_size",
    "load_autoencoder",
    "mean_quality",
    "prepare_images",
    "quality",
    "read_latents",
    "write_latents",
]

#: Stage B settings of the official reconstruction notebook: cfg 1.1, shift 1, 10 steps, t_start 1.
OFFICIAL_RECONSTRUCTION: StageSettings = OFFICIAL_DECODER
OFFICIAL_SEED = 42
LATENTS_KEY = "latents"
LATENT_SUFFIX = ".safetensors"

Images = ImageInput | Sequence[ImageInput]


@dataclass
class Autoencoder:
    """The EfficientNet encoder, the decoder (Stage B + Stage A) and Stage B's text conditioning for
    the empty caption, computed once at load time so the text encoder need not stay in memory."""

    effnet: EfficientNetEncoder
    decoder: Decoder
    empty_pooled: torch.Tensor  # 1×1×P, float32, CPU
    text: TextEncoder | None = None  # kept only for decoding with captions


# --- sizes -------------------------------------------------------------------------------------------


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    """One side or (height, width), checked as the encoder needs it (whole multiples of 32)."""
    if values._is_whole(size):
        size = (size, size)
    if not (isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2):
        raise ValueError(f"size must be one side or (height, width) in pixels, not {size!r}")
    return check_image_size(*size)


def check_image_size(height: int, width: int) -> tuple[int, int]:
    """Picture sides must be multiples of 32 (see the module's docstring), at least 64 px.

    Args:
        height, width: the picture's sides in pixels.

    Returns:
        Both as ints; a ValueError names a side refused.
    """
    return check_size(height, width, _ENCODING)


# --- pictures in ---------------------------------------------------------------------------------------


def _picture_list(images: Images) -> list[ImageInput]:
    """A folder, one picture, a list of pictures or a B×3×H×W tensor → a list of single pictures."""
    if isinstance(images, (str, os.PathLike)) and Path(images).is_dir():
        return list(images_in_folder(images))
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        return list(images.unbind(0))
    if isinstance(images, (str, os.PathLike, torch.Tensor, np.ndarray)) or not isinstance(images, Sequence):
        return [images]
    return list(images)


def _crop_to_stride(image: torch.Tensor) -> torch.Tensor:
    """Centre crop to the nearest smaller multiples of 32 (no scaling)."""
    height, width = (side // _STRIDE * _STRIDE for side in image.shape[-2:])
    check_image_size(height, width)
    top, left = (image.shape[-2] - height) // 2, (image.shape[-1] - width) // 2
    return image[..., top : top + height, left : left + width]


def prepare_images(images: Images, size: int | tuple[int, int] | None = DEFAULT_SIZE) -> torch.Tensor:
    """Pictures (PIL, arrays, tensors, files, a folder) → one B×3×H×W batch in [0, 1].

    Args:
        images: a folder, one picture, a list of them, or a B×3×H×W tensor.
        size: (height, width), or one side for squares (multiples of 32): each picture is scaled to
            cover it and centre-cropped, as the official data loader does. None keeps the pictures'
            own size, centre-cropped to multiples of 32; they must then all have the same size.

    Returns:
        B×3×H×W, float32, CPU; a ValueError for no pictures, a size refused or sizes that differ.
    """
    pictures = _picture_list(images)
    if not pictures:
        raise ValueError("no pictures to encode")
    if size is not None:
        return batch_images(pictures, *_pair(size))
    tensors = [_crop_to_stride(image_to_tensor(picture)) for picture in pictures]
    sizes = sorted({tuple(t.shape[-2:]) for t in tensors})
    if len(sizes) > 1:
        raise ValueError(
            f"the pictures have different sizes {sizes} (after cropping to multiples of {_STRIDE}): pass "
            f"size=(height, width) to scale them to one size, or encode them separately"
        )
    return torch.stack(tensors)


# --- loading -------------------------------------------------------------------------------------------


def _check_files(models_dir: Path, stage_b: Size, dtype: torch.dtype) -> None:
    """One error naming every missing file (and one download command), before anything loads."""
    needed = [
        _choose_precision_file(models_dir, files.STAGE_B[stage_b], dtype),
        files._FILES["stage_a"],
        files._FILES["effnet"],
        files._FILES["text_encoder_config"],
        _choose_precision_file(models_dir, files._WEIGHTS["text_encoder"], dtype),
        files._FILES["tokenizer"],
    ]
    _check_present(models_dir, needed, stage_b=stage_b, stage_c=_size_present(models_dir, files.STAGE_C))


def load_autoencoder(
    source: str | Path = "models",
    stage_b: Size = "big",
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    memory: MemoryMode = "gpu",
    keep_text_encoder: bool = False,
) -> Autoencoder:
    """The EfficientNet encoder, Stage B (``stage_b`` big or lite) and Stage A — no Stage C.

    Stage B is conditioned on a pooled CLIP text embedding; for reconstruction that is the empty
    caption's, computed here once with the text encoder, which is then released (1.4 GB).

    Args:
        source: a models folder or the Hub repo ``stabilityai/stable-cascade``.
        stage_b: "big" or "lite".
        dtype, device, memory: as for :func:`.loading.load_decoder`; the encoder runs in float32.
        keep_text_encoder: keep it, to decode with captions.

    Returns:
        The :class:`Autoencoder`. Missing files raise one ``MissingModelFileError`` naming them all.
    """
    files._check_size(stage_b, "stage_b")
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    if _is_local_folder(source):
        _check_files(Path(source), stage_b, dtype)
    decoder = load_decoder(source, stage_b, dtype=dtype, device=device, memory=memory)
    effnet = _load_effnet(source, device=device)
    text = _load_text_encoder(source, dtype=dtype, device=device, memory=memory)
    empty_pooled = encode_text(text, "").pooled.cpu()
    if not keep_text_encoder:
        text = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return Autoencoder(effnet, decoder, empty_pooled, text)


def available_stage_b(models_dir: str | Path) -> list[Size]:
    """The Stage B sizes whose file (either precision) is in the models folder."""
    return [
        size
        for size, by_precision in files.STAGE_B.items()
        if any((Path(models_dir) / f.path).is_file() for f in by_precision.values())
    ]


# --- encode and decode -----------------------------------------------------------------------------------


def _encode_batch(effnet: EfficientNetEncoder, batch: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat(
        [effnet_encode(effnet, chunk, downscale=True).cpu() for chunk in batch.split(batch_size)]
    )


def encode(
    effnet: EfficientNetEncoder,
    images: Images,
    *,
    size: int | tuple[int, int] | None = DEFAULT_SIZE,
    batch_size: int = 8,
) -> torch.Tensor:
    """Pictures → Stage C latents (B×16×h×w, float32, CPU); 1024×1024 pictures give 24×24 latents.
    All pictures are held in memory: for a data set, :func:`encode_folder` streams them from disk.

    Args:
        effnet: the encoder (``load_effnet``, ``Autoencoder.effnet``).
        images, size: as for :func:`prepare_images`.
        batch_size: pictures through the encoder at once.

    Returns:
        B×16×h×w, float32, CPU.
    """
    return _encode_batch(effnet, prepare_images(images, size), batch_size)


def _pooled(autoencoder: Autoencoder, captions: str | Sequence[str] | None, batch: int) -> torch.Tensor:
    if captions is None:
        return autoencoder.empty_pooled.expand(batch, -1, -1)
    captions = [captions] * batch if isinstance(captions, str) else list(captions)
    if len(captions) != batch:
        raise ValueError(f"{len(captions)} captions for {batch} latents: give one caption, or one per latent")
    if autoencoder.text is None:
        raise ValueError(
            "decoding with captions needs the text encoder: load_autoencoder(..., keep_text_encoder=True)"
        )
    return encode_text(autoencoder.text, captions).pooled.cpu()


def decode(
    autoencoder: Autoencoder,
    latents: torch.Tensor,
    *,
    size: int | tuple[int, int] | None = None,
    settings: StageSettings = OFFICIAL_RECONSTRUCTION,
    seed: int = OFFICIAL_SEED,
    captions: str | Sequence[str] | None = None,
    batch_size: int = 4,
) -> torch.Tensor:
    """Stage C latents (B×16×h×w or 16×h×w, from :func:`encode` or from your own model) → pictures
    (B×3×H×W in [0, 1], float32, CPU) with Stage B then Stage A.

    Args:
        autoencoder: from :func:`load_autoencoder`.
        latents: B×16×h×w or 16×h×w.
        size: (height, width) or one side, multiples of 32; default from the latents (24×24 → 1024²).
        settings: Stage B's sampler settings (official: cfg 1.1, shift 1, 10 steps).
        seed: seeds Stage B's noise, drawn on the CPU (official: 42).
        captions: one for all or one per latent (needs ``keep_text_encoder=True``); default: the empty one.
        batch_size: latents decoded at once.

    Returns:
        B×3×H×W in [0, 1], float32, CPU; a ValueError for latents without 16 channels, a size
        refused or captions that do not fit.
    """
    latents = latents[None] if latents.dim() == 3 else latents
    if latents.shape[1] != _LATENT_CHANNELS:
        raise ValueError(f"Stage C latents have {_LATENT_CHANNELS} channels, not {latents.shape[1]}")
    height, width = (
        check_image_size(*image_size_for_latents(*latents.shape[-2:])) if size is None else _pair(size)
    )
    pooled = _pooled(autoencoder, captions, len(latents))
    negative = autoencoder.empty_pooled.expand(len(latents), -1, -1)
    generator = torch.Generator("cpu").manual_seed(seed)
    pictures = []
    for start in range(0, len(latents), batch_size):
        chunk = slice(start, start + batch_size)
        stage_b = generate_stage_b(
            autoencoder.decoder,
            latents[chunk].float(),
            pooled[chunk],
            negative[chunk],
            (height, width),
            settings,
            generator=generator,
        )
        pictures.append(decode_stage_a(autoencoder.decoder, stage_b))
    return torch.cat(pictures)


# --- a data set on disk ----------------------------------------------------------------------------------


@dataclass
class StoredLatents:
    latents: torch.Tensor  # 16×h×w, float32
    image_size: tuple[int, int]  # the picture size they encode (what decoding should produce)
    source: str  # the picture's file name, when known


@dataclass
class FolderEncoding:
    written: list[Path]
    skipped: list[Path]  # already encoded by an earlier run


def latent_path(image: Path, out_dir: Path) -> Path:
    """``cat.png`` → ``out_dir/cat.png.safetensors`` (the full name: ``cat.png`` and ``cat.jpg`` differ).

    Args:
        image, out_dir: the picture file and the latents folder.

    Returns:
        The latents file's path.
    """
    return Path(out_dir) / (Path(image).name + LATENT_SUFFIX)


def is_encoded(path: Path) -> bool:
    """A complete latents file (an interrupted write leaves no file, a damaged one counts as missing)."""
    if not path.is_file():
        return False
    try:
        return LATENTS_KEY in _read_header(path).tensors
    except CheckpointError:
        return False


def write_latents(path: Path, latents: torch.Tensor, image_size: tuple[int, int], source: str) -> None:
    """Save one picture's latents (16×h×w) atomically (a temporary file, then renamed), so an
    interruption never leaves a half-written ``.safetensors``.

    Args:
        path: the latents file (:func:`latent_path`).
        latents: 16×h×w, stored in their dtype under the key ``latents``.
        image_size, source: the picture's (height, width) and file name, kept in the metadata.
    """
    metadata = {"source": source, "height": str(image_size[0]), "width": str(image_size[1])}
    _save_safetensors(path, {LATENTS_KEY: latents}, metadata)


def read_latents(path: str | Path) -> StoredLatents:
    """One latents file: ours, or any safetensors file holding one 16×h×w (or 1×16×h×w) tensor."""
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        key = LATENTS_KEY if LATENTS_KEY in keys else (keys[0] if len(keys) == 1 else None)
        if key is None:
            raise ValueError(f"{path} holds {keys}: expected one tensor, or one named {LATENTS_KEY!r}")
        latents, metadata = f.get_tensor(key).float(), f.metadata() or {}
    latents = latents[0] if latents.dim() == 4 and len(latents) == 1 else latents
    if latents.dim() != 3 or latents.shape[0] != _LATENT_CHANNELS:
        raise ValueError(f"{path}: expected {_LATENT_CHANNELS}×h×w latents, got {tuple(latents.shape)}")
    if "height" in metadata and "width" in metadata:
        image_size = (int(metadata["height"]), int(metadata["width"]))
    else:
        image_size = image_size_for_latents(*latents.shape[-2:])
    return StoredLatents(latents, image_size, metadata.get("source", Path(path).name))


def encode_folder(
    effnet: EfficientNetEncoder,
    folder: str | Path,
    out_dir: str | Path,
    *,
    size: int | tuple[int, int] | None = DEFAULT_SIZE,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float16,
    progress: bool = True,
) -> FolderEncoding:
    """Encode every picture in ``folder`` to ``out_dir/<name>.safetensors`` (key ``latents``, 16×h×w
    in ``dtype``; metadata: source name, picture height and width).

    Resumable: pictures whose file is already complete are skipped, so an interrupted run picks up
    where it stopped, and each file is written atomically.

    Args:
        effnet, folder, out_dir: the encoder, the pictures (not searched recursively), the latents.
        size, batch_size: as for :func:`encode`.
        dtype: float16 halves the files and keeps the latents' precision (values of a few units).
        progress: False hides the progress bar.

    Returns:
        The files written now, and those skipped as already complete.

    Raises:
        FileNotFoundError: the folder holds no pictures.
    """
    folder, out_dir = Path(folder), Path(out_dir)
    pictures = images_in_folder(folder)
    if not pictures:
        raise FileNotFoundError(f"no pictures in {folder} (looked for {', '.join(IMAGE_SUFFIXES)})")
    out_dir.mkdir(parents=True, exist_ok=True)
    done = {p for p in pictures if is_encoded(latent_path(p, out_dir))}
    pending = [p for p in pictures if p not in done]
    result = FolderEncoding([], [latent_path(p, out_dir) for p in pictures if p in done])
    with tqdm(
        total=len(pictures),
        initial=len(result.skipped),
        desc="Encoding",
        unit="picture",
        disable=not progress,
    ) as bar:
        for start in range(0, len(pending), batch_size):
            for paths, batch in _same_size_batches(pending[start : start + batch_size], size):
                for path, latents in zip(paths, _encode_batch(effnet, batch, batch_size), strict=True):
                    target = latent_path(path, out_dir)
                    write_latents(target, latents.to(dtype), tuple(batch.shape[-2:]), path.name)
                    result.written.append(target)
                    bar.update(1)
    return result


def _same_size_batches(paths: list[Path], size: int | tuple[int, int] | None):
    """Prepared pictures grouped by size (with ``size=None`` pictures keep their own)."""
    groups: dict[tuple[int, int], list[tuple[Path, torch.Tensor]]] = {}
    for path in paths:
        picture = prepare_images(path, size)[0]
        groups.setdefault(tuple(picture.shape[-2:]), []).append((path, picture))
    for members in groups.values():
        yield [p for p, _ in members], torch.stack([t for _, t in members])
