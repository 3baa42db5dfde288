"""What is inside an official single-file checkpoint, read from its safetensors header alone.

The released files carry no metadata saying what they are, and a 7 GB file in the wrong slot only
fails deep inside ``load_state_dict`` with a wall of size mismatches. Here we read the header (a few
kB, no tensor data), check that the file is complete, tell which model it holds from its key names,
and which architecture (big, lite or our tiny test size) from its shapes, so the loader can say
"this is a Stage C lite checkpoint, you asked for big" before touching the weights.

The key conversions between the official names and diffusers' names live here too: diffusers
converts the UNets itself (``from_single_file``); we only need the inverse for writing tiny models in
the official format, and Stage A's one renamed key.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Literal

import torch

Kind = Literal[
    "stage_c",
    "stage_b",
    "stage_a",
    "effnet",
    "previewer",
    "controlnet",
    "lora",
    "text_encoder",
    "image_encoder",
]
Architecture = Literal["big", "lite", "tiny"]

KIND_NAMES: dict[str, str] = {
    "stage_c": "Stage C (prior)",
    "stage_b": "Stage B (decoder)",
    "stage_a": "Stage A (VQGAN)",
    "effnet": "EfficientNet encoder",
    "previewer": "previewer",
    "controlnet": "Stage C ControlNet",
    "lora": "Stage C LoRA (official format)",
    "text_encoder": "CLIP text encoder",
    "image_encoder": "CLIP image encoder",
}

# A key only that model's files have (checked in this order: Stage B also has ``clip_norm``...).
_SIGNATURE_KEYS: list[tuple[str, Kind]] = [
    ("clip_txt_mapper.weight", "stage_c"),
    ("effnet_mapper.0.weight", "stage_b"),
    ("vquantizer.codebook.weight", "stage_a"),
    ("mapper.0.weight", "effnet"),
    ("blocks.0.weight", "previewer"),
    ("projections.0.0.weight", "controlnet"),
    ("weights.0.lora_down", "lora"),
    ("text_model.embeddings.token_embedding.weight", "text_encoder"),  # transformers' CLIP key names
    ("vision_model.embeddings.patch_embedding.weight", "image_encoder"),
]

#: config folder shipped in ``cascade_helpers/configs`` for each (kind, architecture)
CONFIG_DIRS: dict[tuple[str, Architecture], str] = {
    ("stage_c", "big"): "prior",
    ("stage_c", "lite"): "prior_lite",
    ("stage_c", "tiny"): "prior_tiny",
    ("stage_b", "big"): "decoder",
    ("stage_b", "lite"): "decoder_lite",
    ("stage_b", "tiny"): "decoder_tiny",
    ("stage_a", "big"): "stage_a",
    ("stage_a", "tiny"): "stage_a_tiny",
}


_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit; real headers are < 1 MB


class CheckpointError(ValueError):
    """A model file is unreadable, incomplete, or holds something else than its slot needs."""


class TruncatedCheckpointError(CheckpointError):
    """The file ends before the data its header announces: an interrupted download."""


class WrongCheckpointError(CheckpointError):
    """The file is complete but holds another model (or another size) than the one asked for."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    kind: Kind | None
    tensors: dict[str, TensorInfo]

    @property
    def dtypes(self) -> set[str]:
        return {t.dtype for t in self.tensors.values()}


def config_dir(kind: str, architecture: Architecture) -> Path:
    """The local diffusers config folder for a known architecture (what makes loading offline).

    Args:
        kind: "stage_c", "stage_b" or "stage_a".
        architecture: "big", "lite" or "tiny" (Stage A: "big" or "tiny"; a key of :data:`CONFIG_DIRS`).

    Returns:
        The folder inside ``cascade_helpers/configs`` holding its ``config.json``.
    """
    return Path(str(resources.files("cascade_helpers") / "configs" / CONFIG_DIRS[(kind, architecture)]))


def read_header(path: str | os.PathLike) -> CheckpointInfo:
    """Read a safetensors header, check the file holds all the bytes it announces, identify it."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise TruncatedCheckpointError(f"{path} is {size} bytes long: too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER_BYTES:  # e.g. an HTML error page saved under the file's name
            raise CheckpointError(f"{path} is not a safetensors file (it starts with {prefix[:8]!r})")
        if header_len > size - 8:
            raise TruncatedCheckpointError(
                f"{path} is cut short ({size} bytes): its header alone should take {header_len} bytes"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path} is not a safetensors file (its header is not JSON)") from error
    try:  # JSON, but maybe not a safetensors header: every entry needs dtype, shape and offsets
        header.pop("__metadata__", None)
        data_end = max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
        tensors = {
            key: TensorInfo(str(entry["dtype"]), tuple(entry["shape"])) for key, entry in header.items()
        }
    except (AttributeError, KeyError, TypeError, IndexError, ValueError) as error:
        raise CheckpointError(f"{path} is not a safetensors file (its header is malformed)") from error
    expected = 8 + header_len + data_end
    if size < expected:
        raise TruncatedCheckpointError(
            f"{path} is incomplete: {size:,} of {expected:,} bytes ({size / expected:.0%}); the download was interrupted"
        )
    return CheckpointInfo(path, identify_kind(tensors), tensors)


def identify_kind(keys) -> Kind | None:
    """Which model a state dict (or header) belongs to, from the key names only."""
    for key, kind in _SIGNATURE_KEYS:
        if key in keys:
            return kind
    return None


def describe(info: CheckpointInfo) -> str:
    """'a Stage C (prior) lite checkpoint' — for error messages."""
    if info.kind is None:
        return "no Stable Cascade checkpoint we know"
    architecture = match_architecture(info) if (info.kind, "big") in CONFIG_DIRS else None
    size = f" {architecture}" if architecture else ""
    return f"a {KIND_NAMES[info.kind]}{size} checkpoint"


# --- architectures ----------------------------------------------------------------------------------


@cache
def official_shapes(kind: str, architecture: Architecture) -> dict[str, tuple[int, ...]]:
    """Key → shape of the official checkpoint for a known architecture, derived from our config.

    Args:
        kind, architecture: a key of :data:`CONFIG_DIRS`, as for :func:`config_dir`.

    Returns:
        Official key → shape, computed once per pair (the model is built on the meta device).
    """
    from accelerate import init_empty_weights

    from .upstream import PaellaVQModel, StableCascadeUNet

    model_class = PaellaVQModel if kind == "stage_a" else StableCascadeUNet
    with init_empty_weights():
        model = model_class.from_config(model_class.load_config(config_dir(kind, architecture)))
    state = model.state_dict()
    official = stage_a_to_official(state) if kind == "stage_a" else unet_to_official(state, kind)
    return {key: tuple(value.shape) for key, value in official.items()}


def match_architecture(info: CheckpointInfo) -> Architecture | None:
    """The known architecture whose official key set and shapes equal the file's, if any."""
    found = {key: t.shape for key, t in info.tensors.items()}
    for kind, architecture in CONFIG_DIRS:
        if kind == info.kind and official_shapes(kind, architecture) == found:
            return architecture
    return None


# --- key conversions --------------------------------------------------------------------------------


def unet_to_official(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """diffusers ``StableCascadeUNet`` keys → official Stage B/C keys (inverse of diffusers' converter).

    Attention: ``to_q/to_k/to_v`` stack into ``attn.in_proj_*``, ``to_out.0`` is ``attn.out_proj``.
    Stage B calls the pooled-text mapper ``clip_mapper``.

    Args:
        state: a diffusers ``StableCascadeUNet`` state dict.
        kind: "stage_c" or "stage_b".

    Returns:
        A new state dict with the official keys; the tensors are shared, except the stacked
        ``in_proj`` ones.
    """
    official: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".to_k." in key or ".to_v." in key:
            continue
        if ".to_q." in key:
            suffix = key.rsplit(".", 1)[1]  # weight / bias
            parts = [state[key.replace(".to_q.", f".to_{p}.")] for p in "qkv"]
            official[key.replace(f"to_q.{suffix}", f"attn.in_proj_{suffix}")] = torch.cat(parts, dim=0)
        elif ".to_out.0." in key:
            official[key.replace(".to_out.0.", ".attn.out_proj.")] = value
        elif kind == "stage_b" and key.startswith("clip_txt_pooled_mapper."):
            official[key.replace("clip_txt_pooled_mapper.", "clip_mapper.")] = value
        else:
            official[key] = value
    return official


_STAGE_A_RENAMES = {"vquantizer.codebook.weight": "vquantizer.embedding.weight"}


def stage_a_from_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official Stage A keys → diffusers ``PaellaVQModel`` keys (only the codebook is named differently)."""
    return {_STAGE_A_RENAMES.get(key, key): value for key, value in state.items()}


def stage_a_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    inverse = {v: k for k, v in _STAGE_A_RENAMES.items()}
    return {inverse.get(key, key): value for key, value in state.items()}
