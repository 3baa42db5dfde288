"""New words for the text encoder: tokens added to the tokenizer, initialized the official way (the
mean embedding of existing tokens that match a regex), as fixed rows for inference or trainable rows
for training.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .adapters import LoraError

#: a token to add and the regex of existing tokens whose mean embedding initializes it (the official
#: ``train_tokens`` entries), e.g. ``("[fernando]", "^dog</w>")``
NewToken = tuple[str, str | None]


def token_embedding(text_encoder: nn.Module) -> nn.Embedding:
    return text_encoder.get_input_embeddings()


def initial_token_rows(
    text_encoder: nn.Module, tokenizer, new_tokens: Sequence[NewToken]
) -> dict[str, torch.Tensor]:
    """Add ``new_tokens`` to the tokenizer the official way (each gets id = current vocabulary size)
    and return their initial embedding rows: the mean of the rows whose token matches the regex, or
    zeros when nothing matches (the official code warns and does the same). The text encoder is not
    changed: call :func:`append_token_rows` (inference) or train the rows."""
    weight = token_embedding(text_encoder).weight.detach()
    rows: dict[str, torch.Tensor] = {}
    for token, pattern in new_tokens:
        if token in tokenizer.get_vocab():
            raise LoraError(f"the tokenizer already has the token {token!r}: was this LoRA loaded twice?")
        tokenizer.add_tokens([token])
        new_id = tokenizer.convert_tokens_to_ids(token)
        if new_id != weight.shape[0] + len(rows):
            raise LoraError(
                f"{token!r} got id {new_id}, expected {weight.shape[0] + len(rows)}: the tokenizer and text encoder disagree"
            )
        rows[token] = _initial_row(weight, list(rows.values()), tokenizer, pattern)
    return rows


def _initial_row(
    weight: torch.Tensor, added: list[torch.Tensor], tokenizer, pattern: str | None
) -> torch.Tensor:
    all_rows = torch.cat([weight, *[r[None] for r in added]]) if added else weight
    if pattern is None:
        return torch.zeros_like(weight[0])
    ids = [i for t, i in tokenizer.get_vocab().items() if re.search(pattern, t) and i < all_rows.shape[0]]
    if not ids:
        warnings.warn(f"no token matches {pattern!r}: the new token starts from zeros", stacklevel=3)
        return torch.zeros_like(weight[0])
    return all_rows[sorted(ids)].mean(dim=0)


def append_token_rows(text_encoder: nn.Module, rows: Sequence[torch.Tensor]) -> None:
    """Grow the text encoder's vocabulary by ``rows`` (in order: ids old size, old size + 1, ...)."""
    if not rows:
        return
    old = token_embedding(text_encoder).weight.shape[0]
    text_encoder.resize_token_embeddings(old + len(rows), mean_resizing=False)
    weight = token_embedding(text_encoder).weight
    with torch.no_grad():
        weight[old:] = torch.stack([r.to(weight.device, weight.dtype) for r in rows])


def check_token_width(rows: torch.Tensor, text_encoder: nn.Module) -> None:
    width = token_embedding(text_encoder).weight.shape[1]
    if rows.shape[-1] != width:
        raise LoraError(
            f"the LoRA's token embeddings are {rows.shape[-1]} wide, this text encoder's are {width}: "
            "it was made for another text encoder (Stable Cascade's CLIP bigG is 1280 wide)"
        )


def add_tokens(prior, tokens: Mapping[str, torch.Tensor]) -> None:
    """Teach the prior's tokenizer and text encoder new tokens with given embedding rows."""
    for token in tokens:
        if token in prior.tokenizer.get_vocab():
            raise LoraError(f"the tokenizer already has the token {token!r}: was this LoRA loaded twice?")
    prior.tokenizer.add_tokens(list(tokens))
    append_token_rows(prior.text_encoder, list(tokens.values()))


# --- trainable rows (LoRA training) ------------------------------------------------------------------


class NewTokenEmbedding(nn.Module):
    """The text encoder's token embedding with trainable rows for tokens added after its vocabulary:
    only those rows learn (the official ``ReToken`` trains deltas on the same rows)."""

    def __init__(self, base: nn.Embedding, rows: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.rows = nn.Parameter(rows.detach().float().clone())

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.base.weight, self.rows.to(self.base.weight.dtype)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        size = self.base.num_embeddings
        known = self.base(ids.clamp(max=size - 1))
        new = self.rows.to(known.dtype)[(ids - size).clamp(min=0)]
        return torch.where((ids >= size)[..., None], new, known)


def install_new_tokens(prior, new_tokens: Sequence[NewToken]) -> NewTokenEmbedding | None:
    """Add ``new_tokens`` to the tokenizer, initialized the official way, with trainable embeddings."""
    if not new_tokens:
        return None
    rows = initial_token_rows(prior.text_encoder, prior.tokenizer, new_tokens)
    module = NewTokenEmbedding(token_embedding(prior.text_encoder), torch.stack(list(rows.values()))).to(
        prior.device
    )
    prior.text_encoder.text_model.embeddings.token_embedding = module
    return module
