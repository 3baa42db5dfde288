"""New words for the text encoder, initialized the official way (the mean embedding of the tokens a regex
matches), as fixed rows or trainable ones. Every check runs before anything changes; the tokenizer
changes last (its added tokens cannot be taken back)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .adapters import LoraError

_PAIR = "(token, regex) pairs such as ('[fernando]', '^dog</w>')"


def _check_token_text(token: object) -> None:
    """Why: a token that is no text, or only blanks, would match nothing or everything."""
    if not isinstance(token, str) or not token.strip():
        raise LoraError(f"a new token must be a non-empty string such as '[fernando]', not {token!r}")


def _token_entry(entry: object) -> tuple[str, re.Pattern | None]:
    """Why: one ``(token, regex)`` pair checked and compiled, so that a typo fails before any change."""
    if isinstance(entry, str) or not isinstance(entry, Sequence) or len(entry) != 2:
        raise LoraError(f"new_tokens entries are {_PAIR}, not {entry!r}")
    token, pattern = entry
    _check_token_text(token)
    if pattern is not None and not isinstance(pattern, str):
        raise LoraError(f"the regex of {token!r} must be a string or None, not {pattern!r}")
    try:
        return token, None if pattern is None else re.compile(pattern)
    except re.error as error:
        raise LoraError(f"the regex {pattern!r} of the new token {token!r} is not valid: {error}") from None


def _token_entries(new_tokens: object) -> list[tuple[str, re.Pattern | None]]:
    """Why: the config checks ``new_tokens`` before any tokenizer is at hand; loading uses the regexes."""
    if isinstance(new_tokens, str) or not isinstance(new_tokens, Sequence):
        raise LoraError(f"new_tokens is a list of {_PAIR}, not {new_tokens!r}")
    return [_token_entry(entry) for entry in new_tokens]


def _check_new_tokens(
    text_encoder: nn.Module, tokenizer, tokens: Sequence[str], allow_existing: bool
) -> None:
    """Why: an added token wins over words ("cat" would take over every prompt): refuse what would clash."""
    rows = text_encoder.get_input_embeddings().weight.shape[0]
    if len(tokenizer) != rows:
        raise LoraError(
            f"the tokenizer has {len(tokenizer)} tokens and the text encoder {rows} embedding rows: they "
            "disagree (tokens were added to one of them only); load the prior again"
        )
    added = set(tokenizer.get_added_vocab())
    for i, token in enumerate(tokens):
        _check_token_text(token)
        if token in tokens[:i] or token in added:
            again = "given twice" if token in tokens[:i] else "added already: was this LoRA loaded twice?"
            raise LoraError(f"the new token {token!r} is {again}")
        pieces = tokenizer.tokenize(token)
        if not allow_existing and _known_word(tokenizer.get_vocab(), token, pieces):
            raise LoraError(
                f"the new token {token!r} is already a word of the tokenizer ({pieces[0] if pieces else token!r}): "
                f"adding it would take over every prompt that says {token!r}, and words that start with it. "
                f"Use a new word such as '[{token.strip('[]<>')}]', or pass allow_existing_tokens=True to take "
                "the word over anyway"
            )


def _known_word(vocabulary: Mapping[str, int], token: str, pieces: list[str]) -> bool:
    """Why: a word the tokenizer has, as written or as its one piece (``cat`` is ``cat</w>``)."""
    return token in vocabulary or (len(pieces) == 1 and pieces[0] in vocabulary)


def _check_token_rows(rows: torch.Tensor, text_encoder: nn.Module, what: str = "token embeddings") -> None:
    """Why: token rows made for another text encoder, or damaged, are refused before any row is added."""
    width = text_encoder.get_input_embeddings().weight.shape[1]
    if rows.dim() != 2 or rows.shape[-1] != width:
        raise LoraError(
            f"the LoRA's {what} are {rows.shape[-1] if rows.dim() else 0} wide, this text encoder's are {width}: "
            "it was made for another text encoder (Stable Cascade's CLIP bigG is 1280 wide)"
        )
    if not torch.isfinite(rows).all():
        raise LoraError(f"the LoRA's {what} hold NaN or infinite values: the file is damaged")


def _initial_token_rows(
    text_encoder: nn.Module, tokenizer, new_tokens: Sequence, allow_existing: bool
) -> dict:
    """Why: as official, a new token starts from the mean row its regex matches (none: zeros, warned)."""
    entries = _token_entries(new_tokens)
    _check_new_tokens(text_encoder, tokenizer, [token for token, _ in entries], allow_existing)
    all_rows = text_encoder.get_input_embeddings().weight.detach()
    vocabulary = dict(tokenizer.get_vocab())
    rows: dict[str, torch.Tensor] = {}
    for token, pattern in entries:
        ids = sorted(i for t, i in vocabulary.items() if pattern and pattern.search(t))
        if pattern and not ids:
            warnings.warn(
                f"no token matches {pattern.pattern!r}: the new token starts from zeros", stacklevel=3
            )
        rows[token] = all_rows[ids].mean(dim=0) if ids else torch.zeros_like(all_rows[0])
        vocabulary[token] = len(all_rows)
        all_rows = torch.cat([all_rows, rows[token][None]])
    return rows


def _append_token_rows(text_encoder: nn.Module, rows: Sequence[torch.Tensor]) -> None:
    """Why: transformers' resize adds rows but cannot fill them: grow the vocabulary by ``rows``."""
    if not rows:
        return
    old = text_encoder.get_input_embeddings().weight.shape[0]
    text_encoder.resize_token_embeddings(old + len(rows), mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[old:] = torch.stack([r.to(weight.device, weight.dtype) for r in rows])


def _check_added_tokens(text_encoder: nn.Module, tokenizer, tokens: Mapping, allow_existing: bool) -> None:
    """Why: everything :func:`_add_tokens` needs, checked before anything changes."""
    if tokens:
        _check_token_rows(torch.stack(list(tokens.values())), text_encoder)
        _check_new_tokens(text_encoder, tokenizer, list(tokens), allow_existing)


def _add_tokens(text_encoder: nn.Module, tokenizer, tokens: Mapping[str, torch.Tensor]) -> None:
    """Why: new words with given rows (a LoRA file's, an embedding's); the tokenizer changes last."""
    _append_token_rows(text_encoder, list(tokens.values()))
    tokenizer.add_tokens(list(tokens))


class _TrainableTokens(nn.Module):
    """Why: only the new tokens' rows learn (as the official ``ReToken``), after the vocabulary."""

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


def _install_trainable_tokens(prior, new_tokens: Sequence) -> _TrainableTokens | None:
    """Why: training adds its new tokens, initialized the official way, as trainable rows."""
    if not new_tokens:
        return None
    rows = _initial_token_rows(prior.text_encoder, prior.tokenizer, new_tokens, False)
    embedding = prior.text_encoder.get_input_embeddings()
    module = _TrainableTokens(embedding, torch.stack(list(rows.values()))).to(prior.device)
    prior.text_encoder.set_input_embeddings(module)
    prior.tokenizer.add_tokens(list(rows))
    return module
