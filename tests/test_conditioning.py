"""Text conditioning: shapes, and what happens to a prompt longer than CLIP's 77 tokens."""

from __future__ import annotations

import warnings

import pytest
import torch

from cascade_helpers.conditioning import PromptTruncatedWarning, encode_text, no_image


def test_text_embeddings_have_the_shapes_stage_c_expects(tiny_pipeline):
    prior, _ = tiny_pipeline
    text = encode_text(prior, ["a photo of a cat", "a dog"])
    assert text.hidden.shape == (2, 77, 32) and text.pooled.shape == (2, 1, 32)
    assert text.repeat(3).hidden.shape == (6, 77, 32)
    assert torch.equal(text.repeat(3).pooled[:3], text.pooled[:1].expand(3, -1, -1))
    assert torch.equal(no_image(prior, 2), torch.zeros(2, 1, 24))


def test_a_short_prompt_gives_no_warning(tiny_pipeline):
    prior, _ = tiny_pipeline
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        encode_text(prior, "a photo of a cat " * 15)  # 75 tokens: exactly what fits


def test_a_long_prompt_is_cut_to_what_clip_reads_with_a_warning(tiny_pipeline):
    """CLIP reads 77 tokens: start, 75 words, end. The warning names what was dropped, and the
    embedding is that of the prompt without it."""
    prior, _ = tiny_pipeline
    fits = "a photo of a cat " * 15  # 75 one-token words in the tiny vocabulary
    with pytest.warns(PromptTruncatedWarning, match=r"79 tokens long and CLIP reads 77.*'red horse'"):
        long = encode_text(prior, fits + "red horse")
    expected = encode_text(prior, fits)
    assert torch.equal(long.hidden, expected.hidden) and torch.equal(long.pooled, expected.pooled)
