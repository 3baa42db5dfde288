"""Stable Cascade as an image autoencoder: pictures → 16-channel Stage C latents → pictures, for training
your own models in that space: encode a data set once (:func:`encode_folder`), train on the latents,
decode what your model produces (:func:`decode`). How good and how small: :mod:`.quality`.

As the official ``inference/reconstruct_images.ipynb``: pictures cut to the target's aspect ratio in the
centre and scaled (``Resize`` + ``CenterCrop``), Stage B with ``sampling.OFFICIAL_DECODER``, the empty
caption by default (pass yours with ``captions``). Ours: the encoder in float32 (it is small), noise drawn
on the CPU from the seed (42): the same pictures on every device. Sides are multiples of 32: Stage A
decodes 4× its latents, and Stage B's (a quarter of the picture) divide by 8 for its three downsamplings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from . import files, values
from .atomic import _save_safetensors
from .conditioning import encode_text
from .devices import MemoryMode, pick_device, pick_dtype
from .effnet import EfficientNetEncoder
from .effnet import encode as effnet_encode
from .file_checks import _check_present, _choose_precision_file, _size_present
from .files import Size
from .images import (
    _IMAGE_SUFFIXES,
    ImageInput,
    _images_in_folder,
    _picture_list,
    batch_images,
    image_to_tensor,
)
from .loading import _is_local_folder, _load_effnet, _load_text_encoder, load_decoder
from .models import Decoder, TextEncoder
from .sampling import OFFICIAL_DECODER, StageSettings
from .sizes import _ENCODING, _LATENT_CHANNELS, _STRIDE, _image_size_for_latents, check_size
from .stages import decode_stage_a, generate_stage_b

_LATENTS_KEY = "latents"
_DEFAULT_SIZE = 1024
_ENCODED_WITH = "encoded_with"  # a latents file's metadata: the settings and the picture's sha256


@dataclass
class Autoencoder:
    """The encoder, the decoder, and the empty caption's conditioning, made at load: no text encoder kept."""

    effnet: EfficientNetEncoder
    decoder: Decoder
    empty_pooled: torch.Tensor  # 1×1×P, float32, CPU
    text: TextEncoder | None = None  # kept only for decoding with captions


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    """One side or (height, width), checked as the encoder needs it (whole multiples of 32, ≥ 64)."""
    size = (size, size) if values._is_whole(size) else size
    if not (isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2):
        raise ValueError(f"size must be one side or (height, width) in pixels, not {size!r}")
    return check_size(*size, _ENCODING)


def _crop_to_stride(image: torch.Tensor) -> torch.Tensor:
    """``size=None`` keeps a picture's own size: its centre, cut to multiples of 32 (no scaling)."""
    height, width = (side // _STRIDE * _STRIDE for side in image.shape[-2:])
    check_size(height, width, _ENCODING)
    top, left = (image.shape[-2] - height) // 2, (image.shape[-1] - width) // 2
    return image[..., top : top + height, left : left + width]


def _prepare(images: ImageInput | Sequence[ImageInput], size: int | tuple[int, int] | None) -> torch.Tensor:
    """The encoder's pictures as one batch: all at ``size``, or at their own (equal) size."""
    if size is not None:
        return batch_images(images, *_pair(size))
    tensors = [_crop_to_stride(image_to_tensor(picture)) for picture in _picture_list(images)]
    sizes = sorted({tuple(t.shape[-2:]) for t in tensors})
    if len(sizes) > 1:
        raise ValueError(
            f"the pictures have different sizes {sizes} (after cropping to multiples of {_STRIDE}): pass "
            f"size=(height, width) to scale them to one size, or encode them separately"
        )
    return torch.stack(tensors)


def _batch_size(batch_size: object) -> int:
    """``range(0, n, -1)`` is empty: a batch size below 1 would encode or decode nothing, silently."""
    return values._whole(batch_size, "batch_size", 1, meaning="pictures or latents at once")


def _check_files(models_dir: Path, stage_b: Size, dtype: torch.dtype) -> None:
    """One error naming every missing file (and one download command), before anything loads."""
    weights = _choose_precision_file(models_dir, files.STAGE_B[stage_b], dtype)
    text_weights = _choose_precision_file(models_dir, files._WEIGHTS["text_encoder"], dtype)
    needed = [weights, *(files._FILES[name] for name in ("stage_a", "effnet", "text_encoder_config"))]
    needed += [text_weights, files._FILES["tokenizer"]]
    _check_present(models_dir, needed, stage_b=stage_b, stage_c=_size_present(models_dir, files.STAGE_C))


def load_autoencoder(
    source: str | Path = "models",
    stage_b: Size = "big",
    *,
    keep_text_encoder: bool = False,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    memory: MemoryMode = "gpu",
) -> Autoencoder:
    """The EfficientNet encoder, Stage B and Stage A — no Stage C. Stage B's conditioning, the empty
    caption's pooled CLIP embedding, is computed once here with the text encoder, then released (1.4 GB).

    Args:
        source: a models folder or the Hub repo ``stabilityai/stable-cascade``.
        stage_b: "big" or "lite".
        keep_text_encoder: keep it, to decode with captions.
        dtype, device, memory: as for :func:`.loading.load_decoder`; the encoder runs in float32.

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
    folder = Path(models_dir)
    return [
        size
        for size, forms in files.STAGE_B.items()
        if any((folder / f.path).is_file() for f in forms.values())
    ]


def _encode_batch(effnet: EfficientNetEncoder, batch: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Prepared pictures through the encoder ``batch_size`` at a time; the latents come back to the CPU."""
    chunks = batch.split(batch_size)
    return torch.cat([effnet_encode(effnet, chunk, downscale=True).cpu() for chunk in chunks])


def encode(
    effnet: EfficientNetEncoder,
    images: ImageInput | Sequence[ImageInput],
    *,
    size: int | tuple[int, int] | None = _DEFAULT_SIZE,
    batch_size: int = 8,
) -> torch.Tensor:
    """Pictures → Stage C latents (24×24 for 1024²), all in memory (:func:`encode_folder` streams them).

    Args:
        effnet: the encoder (``_load_effnet``, ``Autoencoder.effnet``).
        images: what :func:`cascade_helpers.images.batch_images` takes.
        size: (height, width) or one side, multiples of 32: each picture cut to its aspect ratio in the
            centre and scaled. None keeps the pictures' own (equal) size, cut to multiples of 32.
        batch_size: pictures through the encoder at once.

    Returns:
        B×16×h×w, float32, CPU.
    """
    return _encode_batch(effnet, _prepare(images, size), _batch_size(batch_size))


def _pooled(autoencoder: Autoencoder, captions: str | Sequence[str] | None, batch: int) -> torch.Tensor:
    """Stage B's pooled text conditioning: the empty caption's unless captions are given (one or one each)."""
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


def _checked_latents(latents: torch.Tensor, what: str) -> torch.Tensor:
    """Latents from files or models: int8 (decoded as integers), NaN (black) refused; float32."""
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
        kind = latents.dtype if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"{what}: Stage C latents are a float tensor, not {kind}")
    if latents.dim() < 3 or latents.shape[-3] != _LATENT_CHANNELS:
        raise ValueError(f"{what}: expected {_LATENT_CHANNELS}×h×w latents, got shape {tuple(latents.shape)}")
    if not torch.isfinite(latents).all():
        raise ValueError(f"{what} hold NaN or infinite values: they would decode to a black picture")
    return latents.float()


def decode(
    autoencoder: Autoencoder,
    latents: torch.Tensor,
    *,
    size: int | tuple[int, int] | None = None,
    settings: StageSettings = OFFICIAL_DECODER,
    seed: int = 42,
    captions: str | Sequence[str] | None = None,
    batch_size: int = 4,
) -> torch.Tensor:
    """Stage C latents (from :func:`encode` or from your own model) → pictures, with Stage B then Stage A.

    Args:
        autoencoder: from :func:`load_autoencoder`.
        latents: B×16×h×w or 16×h×w, floating point.
        size: (height, width) or one side, multiples of 32; default from the latents (24×24 → 1024²).
        settings: Stage B's sampler settings (the official reconstruction's: cfg 1.1, shift 1, 10 steps).
        seed: seeds Stage B's noise, drawn on the CPU (official: 42).
        captions: one for all or one per latent (needs ``keep_text_encoder=True``); default: the empty one.
        batch_size: latents decoded at once.

    Returns:
        B×3×H×W in [0, 1], float32, CPU.
    """
    latents = _checked_latents(latents, "the latents")
    latents = latents[None] if latents.dim() == 3 else latents
    batch_size = _batch_size(batch_size)
    size = _pair(_image_size_for_latents(*latents.shape[-2:]) if size is None else size)
    pooled = _pooled(autoencoder, captions, len(latents))
    negative = autoencoder.empty_pooled.expand(len(latents), -1, -1)
    generator = torch.Generator("cpu").manual_seed(values._whole(seed, "seed", 0, 2**64 - 1))
    decoder, pictures = autoencoder.decoder, []
    chunks = [tensor.split(batch_size) for tensor in (latents, pooled, negative)]
    for parts in zip(*chunks, strict=True):
        stage_b = generate_stage_b(decoder, *parts, size, settings, generator=generator)
        pictures.append(decode_stage_a(decoder, stage_b))
    return torch.cat(pictures)


@dataclass
class StoredLatents:
    """One latents file: the latents, the picture size they encode, the picture's name."""

    latents: torch.Tensor  # 16×h×w, float32
    image_size: tuple[int, int]  # (height, width)
    source: str


def _latent_path(image: Path, out_dir: Path) -> Path:
    """``cat.png`` → ``out_dir/cat.png.safetensors``: the full name, since ``cat.png`` and ``cat.jpg`` differ."""
    return Path(out_dir) / f"{Path(image).name}.safetensors"


def _encoded_with(picture: Path, size: int | tuple[int, int] | None, dtype: torch.dtype) -> str:
    """What makes a file current: the settings and the picture's bytes, not only its name."""
    settings = {
        "size": None if size is None else list(_pair(size)),
        "dtype": str(dtype).removeprefix("torch."),
        "sha256": hashlib.sha256(picture.read_bytes()).hexdigest(),
    }
    return json.dumps(settings, sort_keys=True)


def _read_tensor(path: str | Path) -> tuple[torch.Tensor, dict[str, str]]:
    """A latents file's one tensor and metadata; a damaged file named, not a bare safetensors error."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            key = _LATENTS_KEY if _LATENTS_KEY in keys else (keys[0] if len(keys) == 1 else None)
            if key is None:
                raise ValueError(f"{path} holds {keys}: expected one tensor, or one named {_LATENTS_KEY!r}")
            return f.get_tensor(key), f.metadata() or {}
    except SafetensorError as error:
        raise ValueError(
            f"{path} is not a complete safetensors file ({error}): write or copy it again"
        ) from None


def read_latents(path: str | Path) -> StoredLatents:
    """One latents file: ours, or any safetensors file holding one 16×h×w (or 1×16×h×w) float tensor.

    Args:
        path: the ``.safetensors`` file.

    Returns:
        The :class:`StoredLatents`; the picture size from the metadata, else the smallest encoding to them.
    """
    latents, metadata = _read_tensor(path)
    latents = _checked_latents(latents[0] if latents.dim() == 4 and len(latents) == 1 else latents, str(path))
    if latents.dim() != 3:
        raise ValueError(f"{path}: expected {_LATENT_CHANNELS}×h×w latents, got {tuple(latents.shape)}")
    size = _image_size_for_latents(*latents.shape[-2:])  # unless the file says
    if {"height", "width"} <= metadata.keys():
        size = (int(metadata["height"]), int(metadata["width"]))
    return StoredLatents(latents, size, metadata.get("source", Path(path).name))


def _is_encoded(path: Path, encoded_with: str) -> bool:
    """Done: a complete file made with these settings from these bytes (a damaged one is not)."""
    try:
        return path.is_file() and _read_tensor(path)[1].get(_ENCODED_WITH) == encoded_with
    except ValueError:
        return False


def _same_size_batches(paths: list[Path], size: int | tuple[int, int] | None):
    """Prepared pictures grouped by size (with ``size=None`` pictures keep their own)."""
    groups: dict[tuple[int, int], list[tuple[Path, torch.Tensor]]] = {}
    for path in paths:
        picture = _prepare(path, size)[0]
        groups.setdefault(tuple(picture.shape[-2:]), []).append((path, picture))
    for members in groups.values():
        yield [p for p, _ in members], torch.stack([t for _, t in members])


def encode_folder(
    effnet: EfficientNetEncoder,
    folder: str | Path,
    out_dir: str | Path,
    *,
    size: int | tuple[int, int] | None = _DEFAULT_SIZE,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float16,
    progress: bool = True,
) -> list[Path]:
    """Encode every picture in ``folder`` to ``out_dir/<name>.safetensors`` (key ``latents``, 16×h×w),
    each written atomically. Resumable: a picture whose complete file was made with these settings
    from these bytes is skipped; one edited since, or another ``size`` or ``dtype``, is encoded again.

    Args:
        effnet, folder, out_dir: the encoder, the pictures (not searched recursively), the latents.
        size, batch_size: as for :func:`encode`.
        dtype: a floating dtype; float16 halves the files and keeps the latents' precision.
        progress: False hides the progress bar.

    Returns:
        The latents files written now (not those already done); a FileNotFoundError for no pictures.
    """
    folder, out_dir, batch_size = Path(folder), Path(out_dir), _batch_size(batch_size)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch dtype such as torch.float16, not {dtype!r}")
    pictures = _images_in_folder(folder)
    if not pictures:
        raise FileNotFoundError(f"no pictures in {folder} (looked for {', '.join(_IMAGE_SUFFIXES)})")
    made_with = {p: _encoded_with(p, size, dtype) for p in pictures}
    pending = [p for p in pictures if not _is_encoded(_latent_path(p, out_dir), made_with[p])]
    out_dir.mkdir(parents=True, exist_ok=True)
    written, done = [], len(pictures) - len(pending)
    with tqdm(
        total=len(pictures), initial=done, desc="Encoding", unit="picture", disable=not progress
    ) as bar:
        for start in range(0, len(pending), batch_size):
            for paths, batch in _same_size_batches(pending[start : start + batch_size], size):
                sides = {"height": str(batch.shape[-2]), "width": str(batch.shape[-1])}
                for path, latents in zip(paths, _encode_batch(effnet, batch, batch_size), strict=True):
                    written.append(_latent_path(path, out_dir))
                    metadata = {"source": path.name, **sides, _ENCODED_WITH: made_with[path]}
                    _save_safetensors(written[-1], {_LATENTS_KEY: latents.to(dtype)}, metadata)
                    bar.update(1)
    return written
