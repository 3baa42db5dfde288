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


def check_new_tokens(tokenizer, tokens: Sequence[str], *, allow_existing: bool = False) -> None:
    """Refuse, before anything changes, a token that cannot be added as a new word: not a string,
    given twice, added already (a LoRA loaded twice), or — unless ``allow_existing`` — a word the
    tokenizer already has. An added token is matched in the text before anything else, so a LoRA
    whose new token is ``"cat"`` would take over every "cat" in every prompt, and the start of
    "category" too; the official tokens are bracketed (``[fernando]``) so that they never collide.

    Args:
        tokenizer: the CLIP tokenizer the tokens would join.
        tokens: the new tokens.
        allow_existing: take over existing words anyway.

    Raises:
        LoraError: the first token refused, and why.
    """
    added = set(tokenizer.get_added_vocab())
    vocabulary = tokenizer.get_vocab()
    for i, token in enumerate(tokens):
        _check_token_text(token)
        if token in tokens[:i]:
            raise LoraError(f"the new token {token!r} is given twice")
        if token in added:
            raise LoraError(f"the tokenizer already has the token {token!r}: was this LoRA loaded twice?")
        pieces = tokenizer.tokenize(token)
        existing = token in vocabulary or (len(pieces) == 1 and pieces[0] in vocabulary)
        if existing and not allow_existing:
            raise LoraError(
                f"the new token {token!r} is already a word of the tokenizer ({pieces[0] if pieces else token!r}): "
                f"adding it would take over every prompt that says {token!r}, and words that start with it. "
                f"Use a new word such as '[{token.strip('[]<>')}]', or pass allow_existing_tokens=True to take "
                "the word over anyway"
            )


def _check_token_text(token: object) -> None:
    if not isinstance(token, str) or not token.strip():
        raise LoraError(f"a new token must be a non-empty string such as '[fernando]', not {token!r}")


def check_new_token_entries(new_tokens: Sequence[NewToken]) -> list[tuple[str, re.Pattern | None]]:
    """``(token, regex or None)`` pairs, each token a non-empty string and each regex compiled: a typo
    fails here, before any change (and before any tokenizer is at hand: the training settings check
    their ``new_tokens`` with it).

    Returns:
        ``(token, compiled regex or None)`` per entry, in order.

    Raises:
        LoraError: ``new_tokens`` is not a list of pairs, or names the first bad token or regex.
    """
    if isinstance(new_tokens, str) or not isinstance(new_tokens, Sequence):
        raise LoraError(
            f"new_tokens is a list of (token, regex) pairs such as [('[fernando]', '^dog</w>')], not {new_tokens!r}"
        )
    entries = []
    for entry in new_tokens:
        if isinstance(entry, str) or not isinstance(entry, Sequence) or len(entry) != 2:
            raise LoraError(
                f"new_tokens entries are (token, regex) pairs such as ('[fernando]', '^dog</w>'), not {entry!r}"
            )
        token, pattern = entry
        _check_token_text(token)
        if pattern is not None and not isinstance(pattern, str):
            raise LoraError(f"the regex of {token!r} must be a string or None, not {pattern!r}")
        try:
            entries.append((token, None if pattern is None else re.compile(pattern)))
        except re.error as error:
            raise LoraError(
                f"the regex {pattern!r} of the new token {token!r} is not valid: {error}"
            ) from None
    return entries


def _check_vocabulary(text_encoder: nn.Module, tokenizer) -> None:
    """A LoraError unless the tokenizer has as many tokens as the text encoder has rows: a new
    token's id is the next row of both."""
    rows = token_embedding(text_encoder).weight.shape[0]
    if len(tokenizer) != rows:
        raise LoraError(
            f"the tokenizer has {len(tokenizer)} tokens and the text encoder {rows} embedding rows: "
            "they disagree (tokens were added to one of them only); load the prior again"
        )


def initial_token_rows(
    text_encoder: nn.Module, tokenizer, new_tokens: Sequence[NewToken], *, allow_existing: bool = False
) -> dict[str, torch.Tensor]:
    """The initial embedding rows of ``new_tokens``, as the official code makes them: each token will
    get id = current vocabulary size (in order), and its row is the mean of the rows whose token
    matches its regex (tokens added before it included), or zeros when nothing matches (the official
    code warns and does the same). Nothing is changed: :func:`add_tokens` (inference) or
    :func:`install_new_tokens` (training) adds them. Checked first (:func:`check_new_tokens`).

    Args:
        text_encoder, tokenizer: the prior's.
        new_tokens: ``(token, regex or None)`` pairs, the official ``train_tokens`` entries.
        allow_existing: let a token be a word the tokenizer already has.

    Returns:
        Token → embedding row, in order.

    Raises:
        LoraError: a malformed entry or regex, a token :func:`check_new_tokens` refuses, or a
            tokenizer and text encoder that disagree on the vocabulary size.
    """
    entries = check_new_token_entries(new_tokens)
    check_new_tokens(tokenizer, [token for token, _ in entries], allow_existing=allow_existing)
    _check_vocabulary(text_encoder, tokenizer)
    weight = token_embedding(text_encoder).weight.detach()
    vocabulary = dict(tokenizer.get_vocab())
    rows: dict[str, torch.Tensor] = {}
    for token, pattern in entries:
        rows[token] = _initial_row(weight, list(rows.values()), vocabulary, pattern)
        vocabulary[token] = weight.shape[0] + len(rows) - 1
    return rows


def _initial_row(
    weight: torch.Tensor, added: list[torch.Tensor], vocabulary: Mapping[str, int], pattern: re.Pattern | None
) -> torch.Tensor:
    all_rows = torch.cat([weight, *[r[None] for r in added]]) if added else weight
    if pattern is None:
        return torch.zeros_like(weight[0])
    ids = [i for t, i in vocabulary.items() if pattern.search(t) and i < all_rows.shape[0]]
    if not ids:
        warnings.warn(f"no token matches {pattern.pattern!r}: the new token starts from zeros", stacklevel=3)
        return torch.zeros_like(weight[0])
    return all_rows[sorted(ids)].mean(dim=0)


def append_token_rows(text_encoder: nn.Module, rows: Sequence[torch.Tensor]) -> None:
    """Grow the text encoder's vocabulary by ``rows`` (in order: ids old size, old size + 1, ...).

    Args:
        text_encoder: the CLIP text encoder; its token embedding is resized in place.
        rows: the new rows, each of the text encoder's width; none does nothing.
    """
    if not rows:
        return
    old = token_embedding(text_encoder).weight.shape[0]
    text_encoder.resize_token_embeddings(old + len(rows), mean_resizing=False)
    weight = token_embedding(text_encoder).weight
    with torch.no_grad():
        weight[old:] = torch.stack([r.to(weight.device, weight.dtype) for r in rows])


def check_token_width(rows: torch.Tensor, text_encoder: nn.Module) -> None:
    """Refuse token rows made for another text encoder before any row is added.

    Args:
        rows: n × width token embeddings (or deltas) from a file.
        text_encoder: the text encoder they would join (1280 wide for Stable Cascade's CLIP bigG).

    Raises:
        LoraError: ``rows`` is not 2-D or has another width.
    """
    width = token_embedding(text_encoder).weight.shape[1]
    if rows.dim() != 2 or rows.shape[-1] != width:
        raise LoraError(
            f"the LoRA's token embeddings are {rows.shape[-1] if rows.dim() else 0} wide, this text encoder's are "
            f"{width}: it was made for another text encoder (Stable Cascade's CLIP bigG is 1280 wide)"
        )


def check_added_tokens(
    text_encoder: nn.Module, tokenizer, tokens: Mapping[str, torch.Tensor], *, allow_existing: bool = False
) -> None:
    """Everything :func:`add_tokens` checks, before anything changes: rows of the text encoder's
    width, tokens :func:`check_new_tokens` accepts, a tokenizer and text encoder of one vocabulary.

    Args:
        text_encoder, tokenizer: the prior's.
        tokens: token → embedding row; none passes.
        allow_existing: let a token be a word the tokenizer already has.

    Raises:
        LoraError: the first thing refused, named.
    """
    if not tokens:
        return
    check_token_width(torch.stack(list(tokens.values())), text_encoder)
    check_new_tokens(tokenizer, list(tokens), allow_existing=allow_existing)
    _check_vocabulary(text_encoder, tokenizer)


def add_tokens(
    text_encoder: nn.Module,
    tokenizer,
    tokens: Mapping[str, torch.Tensor],
    *,
    allow_existing: bool = False,
    checked: bool = False,
) -> None:
    """Teach a tokenizer and its text encoder new tokens with given embedding rows. Everything is
    checked before anything changes (:func:`check_added_tokens`); the tokenizer changes last.

    Args:
        text_encoder, tokenizer: the prior's.
        tokens: token → embedding row (the text encoder's width).
        allow_existing: let a token be a word the tokenizer already has (it takes the word over).
        checked: the caller ran :func:`check_added_tokens` already (``load_lora`` checks everything
            before it changes anything): do not check again.

    Raises:
        LoraError: a token refused (:func:`check_new_tokens`), rows of another width, or a tokenizer
            and text encoder that disagree on the vocabulary size.
    """
    if not tokens:
        return
    if not checked:
        check_added_tokens(text_encoder, tokenizer, tokens, allow_existing=allow_existing)
    append_token_rows(text_encoder, list(tokens.values()))
    tokenizer.add_tokens(list(tokens))


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


def install_new_tokens(
    prior, new_tokens: Sequence[NewToken], *, allow_existing: bool = False
) -> NewTokenEmbedding | None:
    """Add ``new_tokens`` to the tokenizer, initialized the official way, with trainable embeddings.

    Args:
        prior: the loaded prior (its tokenizer and text encoder change).
        new_tokens: ``(token, regex or None)`` pairs (:func:`initial_token_rows`).
        allow_existing: let a token be a word the tokenizer already has.

    Returns:
        The trainable embedding, or None without new tokens.
    """
    if not new_tokens:
        return None
    rows = initial_token_rows(prior.text_encoder, prior.tokenizer, new_tokens, allow_existing=allow_existing)
    module = NewTokenEmbedding(token_embedding(prior.text_encoder), torch.stack(list(rows.values()))).to(
        prior.device
    )
    prior.text_encoder.set_input_embeddings(module)
    prior.tokenizer.add_tokens(list(rows))
    return module
