"""Text conditioning: shapes, what happens to a prompt longer than CLIP's 77 tokens, and long prompts
read in 77-token windows."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from cascade_helpers.conditioning import PromptTruncatedWarning, encode_text, no_image

FITS = "a photo of a cat " * 15  # 75 one-token words in the tiny vocabulary: exactly one window


def _official(prior, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The official encoding written out: 77 tokens (cut, padded), the last hidden state before the
    final layer norm, and the projected pooled embedding."""
    tokens = prior.tokenizer(
        prompts, truncation=True, padding="max_length", max_length=77, return_tensors="pt"
    )
    with torch.no_grad():
        output = prior.text_encoder(**tokens, output_hidden_states=True)
    return output.hidden_states[-1], output.text_embeds.unsqueeze(1)


def test_text_embeddings_have_the_shapes_stage_c_expects(tiny_pipeline):
    prior, _ = tiny_pipeline
    text = encode_text(prior, ["a photo of a cat", "a dog"])
    assert text.hidden.shape == (2, 77, 32) and text.pooled.shape == (2, 1, 32)
    assert torch.equal(text.select([1, 1, 0]).pooled, text.pooled[[1, 1, 0]])
    assert torch.equal(no_image(prior, 2), torch.zeros(2, 1, 24))


def test_a_short_prompt_gives_no_warning(tiny_pipeline):
    prior, _ = tiny_pipeline
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        encode_text(prior, FITS)


def test_a_long_prompt_is_cut_to_what_clip_reads_with_a_warning(tiny_pipeline):
    """CLIP reads 77 tokens: start, 75 words, end. The warning names what was dropped and the option
    that keeps it, and the embedding is that of the prompt without it."""
    prior, _ = tiny_pipeline
    message = r"79 tokens long and CLIP reads 77.*'red horse'.*long_prompts=True reads it all"
    with pytest.warns(PromptTruncatedWarning, match=message):
        long = encode_text(prior, FITS + "red horse")
    expected = encode_text(prior, FITS)
    assert torch.equal(long.hidden, expected.hidden) and torch.equal(long.pooled, expected.pooled)


def test_the_tokenizers_own_warning_is_not_shown(tiny_pipeline, monkeypatch, caplog):
    """transformers warns of "indexing errors" for a prompt we cut ourselves (issue 18): only our
    PromptTruncatedWarning, which says what was cut, remains."""
    prior, _ = tiny_pipeline
    monkeypatch.setattr(prior.tokenizer, "deprecation_warnings", {})  # it warns once per tokenizer
    library = logging.getLogger("transformers")  # it does not propagate to the root logger
    library.addHandler(caplog.handler)
    try:
        with pytest.warns(PromptTruncatedWarning):
            encode_text(prior, FITS * 2)
    finally:
        library.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if "indexing errors" in r.getMessage()]


def test_prompts_of_one_window_give_exactly_the_77_token_numbers(tiny_pipeline):
    prior, _ = tiny_pipeline
    prompts = ["a photo of a cat", "", FITS]
    hidden, pooled = _official(prior, prompts)
    for long_prompts in (False, True):
        text = encode_text(prior, prompts, long_prompts=long_prompts)
        assert torch.equal(text.hidden, hidden) and torch.equal(text.pooled, pooled)


def test_a_long_prompt_is_read_in_77_token_windows(tiny_pipeline):
    """Window 1: start, the first 75 tokens, end; window 2: start, the rest, end, padding — each as
    CLIP encodes a prompt of its own. The pooled embedding is the first window's; the shorter prompt
    of the call (the negative one) is padded with empty windows to the same length, no warning."""
    prior, _ = tiny_pipeline
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        text = encode_text(prior, [FITS + "red horse", "blurry"], long_prompts=True)
    hidden, pooled = _official(prior, [FITS, "red horse", "blurry", ""])
    assert text.hidden.shape == (2, 154, 32) and text.pooled.shape == (2, 1, 32)
    torch.testing.assert_close(text.hidden[0], torch.cat([hidden[0], hidden[1]]))
    torch.testing.assert_close(text.hidden[1], torch.cat([hidden[2], hidden[3]]))
    torch.testing.assert_close(text.pooled, pooled[[0, 2]])
