"""A LoRA file of any of the three formats onto a loaded prior (UNet, text encoder, new tokens), all or
nothing. One LoRA per model at a time: load a fresh prior to change it (or set its strength to 0)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import files, values
from .adapters import (
    _STRENGTH,
    LoraError,
    _apply_factors,
    _check_factors,
    _lora_layers,
    _refuse_unadaptable,
    _remove_lora,
)
from .formats import _comfyui_factors, _detect_format, _official_factors, _read_ours
from .tokens import (
    _add_tokens,
    _append_token_rows,
    _check_added_tokens,
    _check_token_rows,
    _initial_token_rows,
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
def _all_or_nothing(unet: nn.Module, text_encoder: nn.Module) -> Iterator[None]:
    """Why: a failure midway leaves the prior as it was (LoRA off, embedding back), so a retry works."""
    embedding = text_encoder.get_input_embeddings()
    rows = embedding.weight.shape[0]
    bare = [model for model in (unet, text_encoder) if not _lora_layers(model)]
    try:
        yield
    except BaseException:
        for model in bare:
            _remove_lora(model)
        text_encoder.set_input_embeddings(embedding)
        if embedding.weight.shape[0] != rows:  # transformers resizes the embedding in place
            text_encoder.resize_token_embeddings(rows, mean_resizing=False)
        raise


def _official_deltas(
    state_dict: Mapping, text_encoder: nn.Module, new_tokens: Sequence
) -> tuple[list, object]:
    """Why: official token deltas are stored by id: ids this encoder has or will add, finite, its width."""
    indices = [int(i) for i in state_dict.get("embeddings.indices", torch.zeros(0)).reshape(-1).tolist()]
    deltas = state_dict.get("embeddings.embeddings")
    if not indices:
        return [], None
    if deltas is None or deltas.shape[:1] != (len(indices),):
        rows = "no" if deltas is None else tuple(deltas.shape)
        raise LoraError(
            f"the LoRA names {len(indices)} token ids but holds {rows} embedding deltas: the file is damaged"
        )
    _check_token_rows(deltas, text_encoder, "token embedding deltas")
    vocabulary = text_encoder.get_input_embeddings().weight.shape[0]
    missing = [i for i in indices if not 0 <= i < vocabulary + len(new_tokens)]
    if missing:
        given = f" plus the {len(new_tokens)} new one(s) given" if new_tokens else ""
        raise LoraError(
            f"the LoRA trained token id(s) {missing}, beyond this tokenizer's {vocabulary} tokens{given}: it "
            "adds new tokens. Pass them in order as in the official config's train_tokens, e.g. "
            "new_tokens=[('[fernando]', '^dog</w>')]"
        )
    return indices, deltas


def _load_official(
    prior, state_dict: Mapping[str, torch.Tensor], new_tokens: Sequence, strength: float, allow_existing: bool
) -> None:
    """Why: new tokens started as official training did, then the deltas added at their ids (``ReToken``)."""
    factors = _official_factors(prior.unet, state_dict)
    _check_factors(prior.unet, factors)
    indices, deltas = _official_deltas(state_dict, prior.text_encoder, new_tokens)
    rows = _initial_token_rows(prior.text_encoder, prior.tokenizer, new_tokens, allow_existing)
    with _all_or_nothing(prior.unet, prior.text_encoder):
        _apply_factors(prior.unet, factors, strength)
        _append_token_rows(prior.text_encoder, list(rows.values()))
        if indices:
            weight = prior.text_encoder.get_input_embeddings().weight
            index = torch.tensor(indices, device=weight.device)
            with torch.no_grad():
                weight[index] = weight[index] + deltas.to(weight.device, weight.dtype)
        prior.tokenizer.add_tokens(list(rows))


def _read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Why: a missing, cut or foreign file is named, with what to do (safetensors says what is wrong)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        hint = ""
        if path.name == files.LORA_FERNANDO.name:
            hint = f" Fetch the official example with:\n  {files.download_command([files.LORA_FERNANDO])}"
        raise FileNotFoundError(f"no LoRA file at {path}.{hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except SafetensorError as error:
        raise LoraError(
            f"{path} cannot be read as a .safetensors LoRA file ({error}): it is cut short (an interrupted "
            "download or copy) or not a safetensors file. Download or copy the LoRA again"
        ) from None


def load_lora(
    prior,
    source: str | Path | Mapping[str, torch.Tensor],
    *,
    strength: float = 1.0,
    new_tokens: Sequence[tuple[str, str | None]] = (),
    allow_existing_tokens: bool = False,
) -> LoadedLora:
    """Apply a LoRA file (or state dict) of any of the three formats to a loaded prior, all or nothing:
    everything is checked before the prior changes, and a failure midway is undone.

    Args:
        prior: the loaded prior (``memory="gpu"`` or ``"model_offload"``).
        source: a ``.safetensors`` file, or its state dict.
        strength: the LoRA's weight (0 off, 1 as trained; any finite number).
        new_tokens: official files only (they store deltas, not tokens): the official config's ``train_tokens``,
            ``(token, regex of the words whose mean row starts it, or None)``: ``[("[fernando]", "^dog</w>")]``.
        allow_existing_tokens: let a new token be a word the tokenizer has (``"cat"``): it takes it over.

    Returns:
        What was applied.

    Raises:
        LoraError: a LoRA for another model or size, a second LoRA, a prior loaded with sequential
            offload, a damaged or foreign file, a token already a word, ``new_tokens`` for another format.
        FileNotFoundError: no file at ``source`` (for the official example, with the command to fetch it).
        ValueError: a strength that is not a finite number.
    """
    strength = values._finite(strength, "strength", _STRENGTH)
    for model in (prior.unet, prior.text_encoder):
        _refuse_unadaptable(model)
    state_dict, metadata = (dict(source), {}) if isinstance(source, Mapping) else _read_lora_file(source)
    kind = _detect_format(state_dict, metadata)
    if kind == "official":
        _load_official(prior, state_dict, new_tokens, strength, allow_existing_tokens)
        tokens = tuple(token for token, _ in new_tokens)
        return LoadedLora(kind, len(_lora_layers(prior.unet)), 0, tokens, strength)
    if new_tokens:
        raise LoraError(f"new_tokens is for official-format files; this {kind} file carries its own tokens")
    if kind == "comfyui":
        (unet_factors, te_factors), rows = _comfyui_factors(state_dict, prior.unet, prior.text_encoder), {}
    else:
        (unet_factors, rows), te_factors = _read_ours(state_dict, metadata), {}
    _check_factors(prior.unet, unet_factors)
    _check_factors(prior.text_encoder, te_factors)
    _check_added_tokens(prior.text_encoder, prior.tokenizer, rows, allow_existing_tokens)
    with _all_or_nothing(prior.unet, prior.text_encoder):
        _apply_factors(prior.unet, unet_factors, strength)
        _apply_factors(prior.text_encoder, te_factors, strength)
        _add_tokens(prior.text_encoder, prior.tokenizer, rows)
    return LoadedLora(kind, len(unet_factors), len(te_factors), tuple(rows), strength)


def load_comfyui_embedding(
    prior, path: str | Path, token: str, *, allow_existing_tokens: bool = False
) -> None:
    """Add a one-vector ComfyUI / A1111 textual-inversion embedding (key ``clip_g``, or a lone tensor) as ``token``.

    Args:
        prior: the loaded prior.
        path: the embedding file.
        token: the new word, e.g. ``"[fernando]"``.
        allow_existing_tokens: let ``token`` be a word the tokenizer already has (it takes it over).

    Raises:
        LoraError: not a one-vector embedding, another text width, or ``token`` already a word.
    """
    state, _ = _read_lora_file(path)
    rows = state.get("clip_g", next(iter(state.values())) if len(state) == 1 else None)
    if rows is None or rows.dim() != 2 or rows.shape[0] != 1:
        raise LoraError(f"{path} is not a one-vector embedding with a 'clip_g' key (keys: {list(state)[:3]})")
    tokens = {token: rows[0]}
    _check_added_tokens(prior.text_encoder, prior.tokenizer, tokens, allow_existing_tokens)
    _add_tokens(prior.text_encoder, prior.tokenizer, tokens)
