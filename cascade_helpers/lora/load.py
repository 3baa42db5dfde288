"""Loading a LoRA file of any of the three formats onto a loaded prior: UNet modules, text-encoder
modules and new tokens. One LoRA per model at a time: load a fresh prior to change it (or set its
strength to 0).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import files
from ..checkpoints import CheckpointError, TruncatedCheckpointError, read_header
from .adapters import LoraError, apply_factors, lora_layers, refuse_streamed
from .formats import comfyui_factors, detect_format, official_factors, our_factors
from .tokens import (
    NewToken,
    add_tokens,
    append_token_rows,
    check_token_width,
    initial_token_rows,
    token_embedding,
)


@dataclass(frozen=True)
class LoadedLora:
    """What :func:`load_lora` applied."""

    format: str
    unet_modules: int
    text_encoder_modules: int
    tokens: tuple[str, ...]
    strength: float

    def __str__(self) -> str:
        tokens = f", new tokens {', '.join(self.tokens)}" if self.tokens else ""
        te = f" + {self.text_encoder_modules} text-encoder modules" if self.text_encoder_modules else ""
        return (
            f"{self.format} LoRA on {self.unet_modules} Stage C modules{te}{tokens}, strength {self.strength}"
        )


def load_official_lora(
    unet: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    text_encoder: nn.Module | None = None,
    tokenizer=None,
    new_tokens: Sequence[NewToken] = (),
    *,
    strength: float = 1.0,
) -> None:
    """Apply an official-format LoRA (the dict ``safetensors.torch.load_file`` returns) in place.

    ``new_tokens`` are the bracketed entries of the official config's ``train_tokens``, in order, e.g.
    ``[("[fernando]", "^dog</w>")]``. With a text encoder and tokenizer, each is added and
    initialized as official training did, then the stored deltas are added at the stored indices;
    afterwards the UNet and the text encoder compute what the official model with this LoRA computes.
    """
    factors = official_factors(unet, state_dict)
    deltas = state_dict.get("embeddings.embeddings")
    indices = [int(i) for i in state_dict.get("embeddings.indices", torch.zeros(0)).tolist()]
    if (text_encoder is None) != (tokenizer is None):
        raise LoraError("pass both text_encoder and tokenizer (or neither, to apply the UNet part only)")
    if text_encoder is None:
        if new_tokens:
            raise LoraError(
                "new_tokens need the text encoder and tokenizer: pass text_encoder= and tokenizer="
            )
        if indices:
            warnings.warn(
                f"the LoRA also trained token embeddings (ids {indices}); without text_encoder/tokenizer they are "
                "not applied and prompts will not know its tokens",
                stacklevel=2,
            )
        apply_factors(unet, factors, strength)
        return
    _check_official_tokens(deltas, indices, text_encoder, new_tokens)
    apply_factors(unet, factors, strength)
    rows = initial_token_rows(text_encoder, tokenizer, new_tokens)
    append_token_rows(text_encoder, list(rows.values()))
    weight = token_embedding(text_encoder).weight
    with torch.no_grad():
        for delta, index in zip(deltas, indices, strict=True):
            weight[index] += delta.to(weight.device, weight.dtype)  # in the weight's dtype, as ReToken adds


def _check_official_tokens(
    deltas, indices: list[int], text_encoder: nn.Module, new_tokens: Sequence[NewToken]
) -> None:
    if not indices:
        return
    check_token_width(deltas, text_encoder)
    vocabulary = token_embedding(text_encoder).weight.shape[0]
    available = vocabulary + len(new_tokens)
    missing = [i for i in indices if i >= available]
    if missing:
        raise LoraError(
            f"the LoRA trained token id(s) {missing}, beyond this tokenizer's {vocabulary} tokens"
            + (f" plus the {len(new_tokens)} new one(s) given" if new_tokens else "")
            + ": it adds new tokens. Pass them in order as in the official config's train_tokens, e.g. "
            "new_tokens=[('[fernando]', '^dog</w>')]"
        )


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA file, with clear errors for a missing, cut or foreign file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        hint = ""
        if path.name == files.LORA_FERNANDO.name:
            hint = f" Fetch the official example with:\n  {files.download_command([files.LORA_FERNANDO])}"
        raise FileNotFoundError(f"no LoRA file at {path}.{hint}")
    try:
        read_header(path)
    except TruncatedCheckpointError as error:
        raise TruncatedCheckpointError(f"{error}. Download or copy the LoRA again.") from None
    except CheckpointError as error:
        raise LoraError(f"{error}: LoRA files must be .safetensors") from None
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def load_lora(
    prior,
    source: str | Path | Mapping[str, torch.Tensor],
    *,
    strength: float = 1.0,
    new_tokens: Sequence[NewToken] = (),
) -> LoadedLora:
    """Apply a LoRA file (or state dict) in any of the three formats to a loaded prior: UNet
    modules, text-encoder modules and new tokens. ``new_tokens`` is needed for official files only
    (they store deltas, not the tokens): e.g. ``[("[fernando]", "^dog</w>")]`` for the example."""
    for model in (prior.unet, prior.text_encoder):
        refuse_streamed(model)
    if isinstance(source, Mapping):
        state_dict, metadata = dict(source), {}
    else:
        state_dict, metadata = read_lora_file(source)
    kind = detect_format(state_dict, metadata)
    if kind == "official":
        load_official_lora(
            prior.unet, state_dict, prior.text_encoder, prior.tokenizer, new_tokens, strength=strength
        )
        tokens = tuple(t for t, _ in new_tokens)
        return LoadedLora(kind, len(lora_layers(prior.unet)), 0, tokens, strength)
    if new_tokens:
        raise LoraError(f"new_tokens is for official-format files; this {kind} file carries its own tokens")
    if kind == "comfyui":
        unet_factors, te_factors = comfyui_factors(state_dict, prior.unet, prior.text_encoder)
        tokens: dict[str, torch.Tensor] = {}
    else:
        unet_factors, te_factors = our_factors(state_dict), {}
        names = json.loads(metadata.get("tokens", "[]"))
        rows = state_dict.get("tokens.embeddings", torch.zeros(0, 0))
        if len(names) != rows.shape[0]:
            raise LoraError(
                f"the file names {len(names)} tokens but holds {rows.shape[0]} embeddings: it is damaged"
            )
        tokens = dict(zip(names, rows, strict=True))
        if tokens:
            check_token_width(rows, prior.text_encoder)
    apply_factors(prior.unet, unet_factors, strength)
    apply_factors(prior.text_encoder, te_factors, strength)
    add_tokens(prior, tokens)
    return LoadedLora(kind, len(unet_factors), len(te_factors), tuple(tokens), strength)


def load_comfyui_embedding(prior, path: str | Path, token: str) -> None:
    """Add a one-vector ComfyUI / A1111 textual-inversion embedding (key ``clip_g``, or a file with a
    single tensor) as the new token ``token``."""
    state, _ = read_lora_file(path)
    rows = state.get("clip_g", next(iter(state.values())) if len(state) == 1 else None)
    if rows is None or rows.dim() != 2 or rows.shape[0] != 1:
        raise LoraError(f"{path} is not a one-vector embedding with a 'clip_g' key (keys: {list(state)[:3]})")
    check_token_width(rows, prior.text_encoder)
    add_tokens(prior, {token: rows[0]})
