"""What is inside an official single-file checkpoint, read from its safetensors header alone.

The released files carry no metadata, and a 7 GB file in the wrong slot only fails deep inside
``load_state_dict``. The header (a few kB) tells from its key names which model a file holds and from
its shapes which architecture (big, lite or our tiny test size), before any weight is read. Also the
official ↔ diffusers key conversions diffusers lacks: the UNets' inverse (to write tiny models), and
Stage A's one renamed key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open

_Architecture = Literal["big", "lite", "tiny"]

#: kind → (a key only its files have, checked in this order; its name in messages)
_KINDS: dict[str, tuple[str, str]] = {
    "stage_c": ("clip_txt_mapper.weight", "Stage C (prior)"),
    "stage_b": ("effnet_mapper.0.weight", "Stage B (decoder)"),
    "stage_a": ("vquantizer.codebook.weight", "Stage A (VQGAN)"),
    "effnet": ("mapper.0.weight", "EfficientNet encoder"),
    "previewer": ("blocks.0.weight", "previewer"),
    "controlnet": ("projections.0.0.weight", "Stage C ControlNet"),
    "lora": ("weights.0.lora_down", "Stage C LoRA (official format)"),
    "text_encoder": ("text_model.embeddings.token_embedding.weight", "CLIP text encoder"),
    "image_encoder": ("vision_model.embeddings.patch_embedding.weight", "CLIP image encoder"),
}
_KIND_NAMES = {kind: name for kind, (_, name) in _KINDS.items()}

#: the config folder in ``cascade_helpers/configs`` of each (kind, architecture)
_CONFIG_DIRS: dict[tuple[str, _Architecture], str] = {
    ("stage_c", "big"): "prior",
    ("stage_c", "lite"): "prior_lite",
    ("stage_c", "tiny"): "prior_tiny",
    ("stage_b", "big"): "decoder",
    ("stage_b", "lite"): "decoder_lite",
    ("stage_b", "tiny"): "decoder_tiny",
    ("stage_a", "big"): "stage_a",
    ("stage_a", "tiny"): "stage_a_tiny",
}

# safetensors' words for a file shorter (or longer) than its header announces
_INCOMPLETE = ("incomplete metadata", "header too small", "invalid header length")


class CheckpointError(ValueError):
    """A model file is unreadable, incomplete, or holds something else than its slot needs."""


class _TruncatedCheckpointError(CheckpointError):
    """An interrupted download: re-running it resumes, so the message says so."""


class _WrongCheckpointError(CheckpointError):
    """A complete file of another model or size: a re-download would not help."""


@dataclass(frozen=True)
class _TensorInfo:
    """What the header states of a tensor: enough to tell an architecture without reading it."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _CheckpointInfo:
    """A checked header: the model it holds (None: none we know) and its tensors."""

    kind: str | None
    tensors: dict[str, _TensorInfo]


def config_dir(kind: str, architecture: str) -> Path:
    """The shipped diffusers config folder of a known architecture: what makes loading offline.

    Args:
        kind: "stage_c", "stage_b" or "stage_a".
        architecture: "big", "lite" or "tiny" (Stage A: "big" or "tiny").

    Returns:
        The folder holding its ``config.json``.
    """
    return Path(str(resources.files("cascade_helpers") / "configs" / _CONFIG_DIRS[(kind, architecture)]))


def _read_header(path: str | os.PathLike) -> _CheckpointInfo:
    """``safe_open`` reads the header only, and refuses a cut or junk file itself."""
    path = Path(path)
    try:
        with safe_open(path, "pt") as f:
            slices = {key: f.get_slice(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
            tensors = {key: _TensorInfo(s.get_dtype(), tuple(s.get_shape())) for key, s in slices.items()}
    except SafetensorError as error:
        size = path.stat().st_size
        if any(words in str(error) for words in _INCOMPLETE):
            raise _TruncatedCheckpointError(
                f"{path} is incomplete ({size:,} bytes, not what its header announces): the download was "
                "interrupted"
            ) from None
        raise CheckpointError(f"{path} is not a safetensors file ({error})") from None
    kind = next((kind for kind, (key, _) in _KINDS.items() if key in tensors), None)
    return _CheckpointInfo(kind, tensors)


def _describe(info: _CheckpointInfo) -> str:
    """'a Stage C (prior) lite checkpoint', for error messages."""
    if info.kind is None:
        return "no Stable Cascade checkpoint we know"
    architecture = _match_architecture(info) if (info.kind, "big") in _CONFIG_DIRS else None
    return f"a {_KIND_NAMES[info.kind]}{f' {architecture}' if architecture else ''} checkpoint"


@cache
def _official_shapes(kind: str, architecture: _Architecture) -> dict[str, tuple[int, ...]]:
    """What a released file must hold exactly, from our config on the meta device, once per pair."""
    from accelerate import init_empty_weights

    from .upstream import PaellaVQModel, StableCascadeUNet

    model_class = PaellaVQModel if kind == "stage_a" else StableCascadeUNet
    with init_empty_weights():
        model = model_class.from_config(model_class.load_config(config_dir(kind, architecture)))
    state = model.state_dict()
    official = _stage_a_to_official(state) if kind == "stage_a" else _unet_to_official(state, kind)
    return {key: tuple(value.shape) for key, value in official.items()}


def _match_architecture(info: _CheckpointInfo) -> _Architecture | None:
    """The known architecture whose official keys and shapes equal the file's, if any."""
    found = {key: t.shape for key, t in info.tensors.items()}
    return next((a for k, a in _CONFIG_DIRS if k == info.kind and _official_shapes(k, a) == found), None)


def _unet_to_official(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """The inverse of diffusers' single-file converter (it has none): ``to_q/k/v`` stack into
    ``attn.in_proj_*``, ``to_out.0`` is ``attn.out_proj``, Stage B's pooled-text mapper is ``clip_mapper``."""
    official: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".to_k." in key or ".to_v." in key:
            continue
        if ".to_q." in key:
            parts = [state[key.replace(".to_q.", f".to_{p}.")] for p in "qkv"]
            official[key.replace(".to_q.", ".attn.in_proj_")] = torch.cat(parts, dim=0)  # weight / bias
        elif ".to_out.0." in key:
            official[key.replace(".to_out.0.", ".attn.out_proj.")] = value
        elif kind == "stage_b" and key.startswith("clip_txt_pooled_mapper."):
            official[key.replace("clip_txt_pooled_mapper.", "clip_mapper.")] = value
        else:
            official[key] = value
    return official


_STAGE_A_RENAMES = {"vquantizer.codebook.weight": "vquantizer.embedding.weight"}


def _stage_a_from_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers has no single-file loader for Stage A; only the codebook is named differently."""
    return {_STAGE_A_RENAMES.get(key, key): value for key, value in state.items()}


def _stage_a_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """For the tiny writer: files in the official format."""
    inverse = {v: k for k, v in _STAGE_A_RENAMES.items()}
    return {inverse.get(key, key): value for key, value in state.items()}
