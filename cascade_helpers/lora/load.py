"""Loading a LoRA file of any of the three formats onto a loaded prior: UNet modules, text-encoder
modules and new tokens. One LoRA per model at a time: load a fresh prior to change it (or set its
strength to 0).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import files, values
from ..checkpoints import CheckpointError, _read_header, _TruncatedCheckpointError
from .adapters import LoraError, apply_factors, check_factors, lora_layers, refuse_streamed, remove_lora
from .formats import comfyui_factors, detect_format, official_factors, our_factors
from .tokens import (
    NewToken,
    add_tokens,
    append_token_rows,
    check_added_tokens,
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


@contextlib.contextmanager
def all_or_nothing(unet: nn.Module, text_encoder: nn.Module | None) -> Iterator[None]:
    """Undo LoRA layers and new token rows added in the ``with`` block when it fails midway (an
    out-of-memory error while peft adds layers, say): the LoRA layers come off, a trainable token
    embedding (:func:`~.tokens.install_new_tokens`) is replaced by the one it wraps and a grown one
    shrinks back, so the model is as before and a corrected retry works. Run the checks before the
    block, and change the tokenizer last in it: a tokenizer's added tokens cannot be taken back.

    Args:
        unet: Stage C's UNet.
        text_encoder: the text encoder, or None when the block leaves it alone.

    Yields:
        Nothing: the block runs, and on any exception the models are put back before it propagates.
    """
    embedding = token_embedding(text_encoder) if text_encoder is not None else None
    rows = embedding.weight.shape[0] if embedding is not None else 0
    bare = [model for model in (unet, text_encoder) if model is not None and not lora_layers(model)]
    try:
        yield
    except BaseException:
        for model in bare:
            remove_lora(model)
        if text_encoder is not None:
            if token_embedding(text_encoder) is not embedding:
                text_encoder.set_input_embeddings(embedding)
            if token_embedding(text_encoder).weight.shape[0] != rows:
                text_encoder.resize_token_embeddings(rows, mean_resizing=False)
        raise


def load_official_lora(
    unet: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    text_encoder: nn.Module | None = None,
    tokenizer=None,
    new_tokens: Sequence[NewToken] = (),
    *,
    strength: float = 1.0,
    allow_existing_tokens: bool = False,
) -> None:
    """Apply an official-format LoRA (the dict ``safetensors.torch.load_file`` returns) in place, all
    or nothing: a failure leaves the models and the tokenizer as they were.

    With a text encoder and tokenizer, each new token is added and initialized as official training
    did, then the stored deltas are added at the stored indices; afterwards the UNet and the text
    encoder compute what the official model with this LoRA computes.

    Args:
        unet: Stage C's UNet.
        state_dict: the official file's tensors.
        text_encoder, tokenizer: both, for the learned tokens, or neither to apply the UNet part
            only (a warning says when the file trained tokens).
        new_tokens: the bracketed entries of the official config's ``train_tokens``, in order, as
            (token, regex of the tokens whose mean row starts it, or None), e.g.
            ``[("[fernando]", "^dog</w>")]``.
        strength: the UNet LoRA's weight (0 off, 1 as trained); token deltas are added in full.
        allow_existing_tokens: let a new token be a word the tokenizer already has (it takes it over).

    Raises:
        LoraError: a LoRA for another Stage C, damaged weights or token deltas, token ids beyond the
            tokenizer and ``new_tokens``, one of ``text_encoder``/``tokenizer`` without the other,
            ``new_tokens`` without them, or a second LoRA on the model.
    """
    values._finite(strength, "strength", "the LoRA's weight: 0 off, 1 as trained")
    factors = official_factors(unet, state_dict)
    deltas = state_dict.get("embeddings.embeddings")
    indices = [int(i) for i in state_dict.get("embeddings.indices", torch.zeros(0)).tolist()]
    if (text_encoder is None) != (tokenizer is None):
        raise LoraError("pass both text_encoder and tokenizer (or neither, to apply the UNet part only)")
    check_factors(unet, factors)
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
        with all_or_nothing(unet, None):
            apply_factors(unet, factors, strength, checked=True)
        return
    _check_official_tokens(deltas, indices, text_encoder, new_tokens)
    rows = initial_token_rows(text_encoder, tokenizer, new_tokens, allow_existing=allow_existing_tokens)
    with all_or_nothing(unet, text_encoder):
        apply_factors(unet, factors, strength, checked=True)
        append_token_rows(text_encoder, list(rows.values()))
        if indices:
            weight = token_embedding(text_encoder).weight
            index = torch.tensor(indices, device=weight.device)
            with torch.no_grad():  # in the weight's dtype, as ReToken adds
                weight[index] = weight[index] + deltas.to(weight.device, weight.dtype)
        tokenizer.add_tokens(list(rows))


def _check_official_tokens(
    deltas, indices: list[int], text_encoder: nn.Module, new_tokens: Sequence[NewToken]
) -> None:
    if not indices:
        return
    if deltas is None or deltas.dim() != 2 or deltas.shape[0] != len(indices):
        rows = "no" if deltas is None else tuple(deltas.shape)
        raise LoraError(
            f"the LoRA names {len(indices)} token ids but holds {rows} embedding deltas: the file is damaged"
        )
    check_token_width(deltas, text_encoder)
    if not torch.isfinite(deltas).all():
        raise LoraError("the LoRA's token embedding deltas hold NaN or infinite values: the file is damaged")
    vocabulary = token_embedding(text_encoder).weight.shape[0]
    available = vocabulary + len(new_tokens)
    missing = [i for i in indices if not 0 <= i < available]
    if missing:
        raise LoraError(
            f"the LoRA trained token id(s) {missing}, beyond this tokenizer's {vocabulary} tokens"
            + (f" plus the {len(new_tokens)} new one(s) given" if new_tokens else "")
            + ": it adds new tokens. Pass them in order as in the official config's train_tokens, e.g. "
            "new_tokens=[('[fernando]', '^dog</w>')]"
        )


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA file, with clear errors for a missing, cut or foreign file.

    Args:
        path: the ``.safetensors`` file.

    Returns:
        Its tensors (on the CPU) and its metadata.

    Raises:
        FileNotFoundError: no file there (for the official example, with the command that fetches it).
        TruncatedCheckpointError: the file is cut short.
        LoraError: not a safetensors file.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        hint = ""
        if path.name == files.LORA_FERNANDO.name:
            hint = f" Fetch the official example with:\n  {files.download_command([files.LORA_FERNANDO])}"
        raise FileNotFoundError(f"no LoRA file at {path}.{hint}")
    try:
        _read_header(path)
    except _TruncatedCheckpointError as error:
        raise _TruncatedCheckpointError(f"{error}. Download or copy the LoRA again.") from None
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
    allow_existing_tokens: bool = False,
) -> LoadedLora:
    """Apply a LoRA file (or state dict) in any of the three formats to a loaded prior: UNet
    modules, text-encoder modules and new tokens. All or nothing: everything is checked before the
    prior changes, and a failure midway is undone, so a corrected retry works.

    Args:
        prior: the loaded prior (``memory="gpu"`` or ``"model_offload"``).
        source: a ``.safetensors`` file, or its state dict.
        strength: the LoRA's weight (0 off, 1 as trained; any finite number).
        new_tokens: for official files only (they store deltas, not the tokens), e.g.
            ``[("[fernando]", "^dog</w>")]`` for the example.
        allow_existing_tokens: let a new token be a word the tokenizer already has (``"cat"``): it
            takes that word over in every prompt. Refused by default.

    Returns:
        What was applied.

    Raises:
        LoraError: a LoRA for another model or size, an unknown format, damaged factors or tokens, a
            token that is already a word (without ``allow_existing_tokens``), ``new_tokens`` for a
            file that is not official, a second LoRA, or a prior loaded with sequential offload.
        FileNotFoundError, TruncatedCheckpointError: as for :func:`read_lora_file`.
        ValueError: a strength that is not a finite number.
    """
    values._finite(strength, "strength", "the LoRA's weight: 0 off, 1 as trained")
    for model in (prior.unet, prior.text_encoder):
        refuse_streamed(model)
    if isinstance(source, Mapping):
        state_dict, metadata = dict(source), {}
    else:
        state_dict, metadata = read_lora_file(source)
    kind = detect_format(state_dict, metadata)
    if kind == "official":
        load_official_lora(
            prior.unet,
            state_dict,
            prior.text_encoder,
            prior.tokenizer,
            new_tokens,
            strength=strength,
            allow_existing_tokens=allow_existing_tokens,
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
        tokens = _our_tokens(state_dict, metadata)
    check_factors(prior.unet, unet_factors)
    check_factors(prior.text_encoder, te_factors)
    check_added_tokens(prior.text_encoder, prior.tokenizer, tokens, allow_existing=allow_existing_tokens)
    with all_or_nothing(prior.unet, prior.text_encoder):
        apply_factors(prior.unet, unet_factors, strength, checked=True)
        apply_factors(prior.text_encoder, te_factors, strength, checked=True)
        add_tokens(prior.text_encoder, prior.tokenizer, tokens, checked=True)
    return LoadedLora(kind, len(unet_factors), len(te_factors), tuple(tokens), strength)


def _our_tokens(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """The learned tokens our format stores: their names in the metadata, their rows as a tensor."""
    try:
        names = json.loads(metadata.get("tokens", "[]"))
    except json.JSONDecodeError:
        names = None
    rows = state_dict.get("tokens.embeddings", torch.zeros(0, 0))
    if not isinstance(names, list) or len(names) != rows.shape[0]:
        raise LoraError(
            f"the file's metadata names the tokens {metadata.get('tokens')!r} but it holds {rows.shape[0]} "
            "token embeddings: it is damaged"
        )
    if names and not torch.isfinite(rows).all():
        raise LoraError("the LoRA's token embeddings hold NaN or infinite values: the file is damaged")
    return dict(zip(names, rows, strict=True))


def load_comfyui_embedding(
    prior, path: str | Path, token: str, *, allow_existing_tokens: bool = False
) -> None:
    """Add a one-vector ComfyUI / A1111 textual-inversion embedding (key ``clip_g``, or a file with a
    single tensor) as the new token ``token``.

    Args:
        prior: the loaded prior.
        path: the embedding file.
        token: the new word, e.g. ``"[fernando]"``.
        allow_existing_tokens: let ``token`` be a word the tokenizer already has (it takes it over).

    Raises:
        LoraError: not a one-vector embedding, another text width, or ``token`` already a word.
    """
    state, _ = read_lora_file(path)
    rows = state.get("clip_g", next(iter(state.values())) if len(state) == 1 else None)
    if rows is None or rows.dim() != 2 or rows.shape[0] != 1:
        raise LoraError(f"{path} is not a one-vector embedding with a 'clip_g' key (keys: {list(state)[:3]})")
    add_tokens(prior.text_encoder, prior.tokenizer, {token: rows[0]}, allow_existing=allow_existing_tokens)
