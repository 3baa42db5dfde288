"""The weights-on-GPU figures the text-to-image notebook prints, against sums done by hand from the
published file sizes (decimal GB)."""

from __future__ import annotations

import pytest

from cascade_helpers.devices import weights_on_gpu

SMALL = 0.0737 + 0.0815 + 0.016  # Stage A, EfficientNet, previewer (float32 files)


@pytest.mark.parametrize(
    "stage_c,stage_b,precision,memory,expected_gb",
    [
        ("big", "big", "bf16", "gpu", 7.18 + 3.13 + 1.39 + 0.608 + SMALL),
        ("big", "big", "bf16", "model_offload", 7.18 + SMALL),
        ("lite", "lite", "bf16", "gpu", 2.06 + 1.4 + 1.39 + 0.608 + SMALL),
        ("lite", "lite", "bf16", "model_offload", 2.06 + SMALL),
        ("lite", "lite", "fp32", "model_offload", 4.12 + SMALL),
        ("big", "lite", "fp32", "gpu", 14.4 + 2.8 + 2.78 + 1.22 + SMALL),
        ("big", "big", "bf16", "sequential_offload", SMALL),
    ],
)
def test_weights_on_gpu(stage_c, stage_b, precision, memory, expected_gb):
    assert weights_on_gpu(stage_c, stage_b, precision, memory) / 1e9 == pytest.approx(expected_gb, abs=1e-6)


def test_without_the_image_encoder():
    expected = 7.18 + 3.13 + 1.39 + SMALL
    assert weights_on_gpu("big", "big", "bf16", "gpu", image_encoder=False) / 1e9 == pytest.approx(expected)


def test_unknown_memory_mode_lists_the_valid_ones():
    with pytest.raises(ValueError, match="gpu, model_offload, sequential_offload"):
        weights_on_gpu("big", "big", "bf16", "cpu_offload")


@pytest.mark.parametrize(
    "args,named",
    [
        (("small", "big", "bf16"), "stage_c must be 'big' or 'lite', not 'small'"),
        (("big", "huge", "bf16"), "stage_b must be 'big' or 'lite'"),
        (
            ("big", "big", "bfloat16"),
            r"precision must be one of 'bf16' \(bfloat16\), 'fp32' \(float32\), not 'bfloat16'",
        ),
    ],
)
def test_unknown_words_are_named(args, named):
    with pytest.raises(ValueError, match=named):
        weights_on_gpu(*args, "gpu")
