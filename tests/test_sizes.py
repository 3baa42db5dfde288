"""Every size rule in one place (cascade_helpers.sizes), checked against the official formulas written
out here: the official notebooks' ``calculate_latent_sizes`` (``ceil(side / 42.67)`` for Stage C,
``ceil(side / 4.0)`` for Stage B) and the official EfficientNet preprocessing (3/4, floored to 32)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cascade_helpers import sizes

GENERATION_SIDES = range(512, 2049, 128)


@pytest.mark.parametrize("side", GENERATION_SIDES)
def test_stage_c_grid_equals_the_official_formula_for_every_generation_size(side):
    assert sizes._stage_c_latent_size(side, 1024) == (math.ceil(side / 42.67), 24)
    assert sizes._stage_c_latent_size(1024, side) == (24, math.ceil(side / 42.67))


@pytest.mark.parametrize("side", GENERATION_SIDES)
def test_stage_b_grid_equals_the_official_formula(side):
    assert sizes.stage_b_shape(side, side, 1)[2:] == (math.ceil(side / 4.0),) * 2


def test_the_grid_is_the_encoders_output_off_multiples_of_128():
    """Where the official text-to-image formula and the encoder disagree (1000 px: 24 vs 23), the grid
    follows the encoder, so an encoded picture always fits the generation's latents."""
    assert math.ceil(1000 / 42.67) == 24
    assert sizes._encoder_input_size(1000, 1000) == (736, 736)  # int(750 / 32) * 32
    assert sizes._stage_c_latent_size(1000, 1000) == (23, 23)


def test_shapes_put_the_batch_and_channels_first():
    assert sizes.stage_c_shape(1024, 1536, 4) == (4, 16, 24, 36)
    assert sizes.stage_b_shape(640, 1536, 2) == (2, 4, 160, 384)


@pytest.mark.parametrize(
    "grid,picture", [((24, 24), (1024, 1024)), ((24, 36), (1024, 1536)), ((15, 36), (640, 1536))]
)
def test_picture_size_for_a_latent_grid_encodes_back_to_that_grid(grid, picture):
    assert sizes._image_size_for_latents(*grid) == picture
    assert sizes._stage_c_latent_size(*picture) == grid


@pytest.mark.parametrize(
    "height,width,rule,named",
    [
        (1000, 1024, sizes._GENERATION, "height=1000"),
        (1024, 4096, sizes._GENERATION, "width=4096"),
        (384, 1024, sizes._GENERATION, "height=384"),
        (1024.0, 1024, sizes._GENERATION, "height=1024.0"),
        (True, 1024, sizes._GENERATION, "height=True"),
        ("1024", 1024, sizes._GENERATION, "height='1024'"),
        (100, 96, sizes._ENCODING, "height=100"),
        (32, 64, sizes._ENCODING, "height=32"),
        (1024, 200, sizes._TRAINING, "width=200"),
    ],
)
def test_refused_sides_are_named_with_the_rule(height, width, rule, named):
    with pytest.raises(ValueError, match=rf"{named}.*{rule.describe()}"):
        sizes.check_size(height, width, rule)


def test_accepted_sides_come_back_as_ints():
    assert sizes.check_size(np.int64(1024), 1152) == (1024, 1152)
    assert type(sizes.check_size(np.int64(1024), 1152)[0]) is int
    assert sizes.check_size(96, 4096, sizes._ENCODING) == (96, 4096)  # no upper limit for encoding
