"""controlnet_aux's detectors as control pictures for the canny ControlNet, offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascade_helpers.controlnet.filters import _canny_edges as _canny_edges
from cascade_helpers.controlnet.preprocessors import aux_control_input, edge_agreement


def _square(side: int = 768) -> np.ndarray:
    """A white square on black: its only edges are its outline (rows/columns 256 and 511)."""
    picture = np.zeros((side, side, 3), np.uint8)
    picture[256:512, 256:512] = 255
    return picture


def test_aux_canny_at_full_resolution_is_plain_opencv_canny(no_network):
    """With detection at the control size itself controlnet_aux's canny is cv2.Canny(100, 200) on the
    8-bit picture, which the official filter without its 224 px resize also is: the wiring (channels,
    scaling, orientation, size) must then give the very same map."""
    square = _square()
    control = aux_control_input("canny", square, 1024, 1024, detect_resolution=768, image_resolution=768)
    expected = _canny_edges(torch.from_numpy(square).permute(2, 0, 1)[None].float() / 255, resize=None)
    assert control.tensor.shape == (1, 1, 768, 768) and control.preview.shape == (1, 3, 768, 768)
    torch.testing.assert_close(control.tensor, expected)
    rows = control.tensor[0, 0].amax(dim=1).nonzero().flatten()
    assert rows.min() >= 255 and rows.max() <= 512, "edges only on the square's outline"


def test_aux_canny_with_its_defaults_draws_other_edges_than_the_official_filter(no_network):
    """controlnet_aux detects at 512 px, the official filter at 224 px: on the same picture the edges
    are in the same places but not the same pixels (the lesson of the ControlNet notebook)."""
    square = _square()
    official = _canny_edges(torch.from_numpy(square).permute(2, 0, 1)[None].float() / 255)
    aux = aux_control_input("canny", square, 1024, 1024).tensor
    agreement = edge_agreement(official, aux)
    assert 0.0 < agreement.iou < 1.0 and agreement.differing > 0
    assert agreement.coverage_a > agreement.coverage_b > 0, "224 px edges, enlarged, are the thicker ones"


def test_lineart_standard_draws_the_lines_of_a_picture(no_network):
    picture = np.full((768, 768, 3), 255, np.uint8)
    picture[:, 380:388] = 0  # one black vertical line on white
    lines = aux_control_input("lineart_standard", picture, 1024, 1024).tensor[0, 0]
    assert lines[:, 370:398].mean() > 10 * lines[:, :300].mean()
    assert lines.shape == (768, 768)


def test_the_control_has_the_generations_control_size(no_network):
    control = aux_control_input("canny", _square(300), 1024, 1536)
    assert (
        control.tensor.shape == (1, 1, 768, 1152) and 0 <= control.tensor.min() <= control.tensor.max() <= 1
    )


def test_a_loaded_detector_object_can_be_passed(no_network):
    calls = []

    def detector(picture, **options):
        calls.append((picture.size, options))
        return picture.convert("L").resize((100, 100))

    control = aux_control_input(detector, _square(), 1024, 1024, detect_resolution=256)
    assert calls == [((768, 768), {"output_type": "pil", "detect_resolution": 256})]
    assert control.tensor.shape == (1, 1, 768, 768)


def test_a_detector_that_needs_weights_says_how_to_get_them(no_network):
    with pytest.raises(ValueError, match="needs weights") as error:
        aux_control_input("softedge_hed", _square())
    message = str(error.value)
    assert "HEDdetector.from_pretrained" in message and "lllyasviel/Annotators" in message
    assert "'canny'" in message and "'lineart_standard'" in message


def test_other_names_are_refused_with_the_choices(no_network):
    with pytest.raises(ValueError, match="no released Stable Cascade ControlNet reads them"):
        aux_control_input("shuffle", _square())
    with pytest.raises(ValueError, match="unknown controlnet_aux detector 'cany'.*'canny'"):
        aux_control_input("cany", _square())


def test_edge_agreement_against_hand_counted_maps():
    a = torch.zeros(1, 1, 4, 4)
    b = torch.zeros(1, 1, 4, 4)
    a[..., 0, :] = 1  # 4 edge pixels
    b[..., 0, :2] = 1  # 2 of them
    b[..., 3, 3] = 0.9  # and one of its own
    agreement = edge_agreement(a, b)
    assert agreement.iou == pytest.approx(2 / 5) and agreement.differing == pytest.approx(3 / 16)
    assert (agreement.coverage_a, agreement.coverage_b) == (pytest.approx(4 / 16), pytest.approx(3 / 16))
    assert edge_agreement(a, a).iou == 1.0 and edge_agreement(a, a).differing == 0.0
    with pytest.raises(ValueError, match="different sizes"):
        edge_agreement(a, torch.zeros(1, 1, 4, 5))


def test_several_pictures_give_one_control_each():
    """Like control_input: a list of pictures is a batch, none dropped."""
    pictures = [_square(), np.ascontiguousarray(_square()[::-1, ::3])]  # the second: a tall rectangle
    control = aux_control_input("canny", pictures, 1024, 1024)
    assert control.tensor.shape == (2, 1, 768, 768)
    assert torch.equal(control.tensor[1:], aux_control_input("canny", pictures[1], 1024, 1024).tensor)


@pytest.mark.parametrize("threshold", [float("nan"), 1.0, 2.0, -0.5])
def test_a_threshold_that_finds_no_edge_is_refused(threshold):
    """At a threshold no pixel passes, two different maps would "agree" perfectly (IoU 1)."""
    a, b = torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8)
    with pytest.raises(ValueError, match="threshold"):
        edge_agreement(a, b, threshold=threshold)


@pytest.mark.parametrize("name", ["depth_zoe", "openpose", "normal_bae"])
def test_detectors_no_stable_cascade_controlnet_reads_are_refused_by_kind(name):
    with pytest.raises(ValueError, match="no released Stable Cascade ControlNet reads them"):
        aux_control_input(name, _square())


def test_sizes_generation_would_refuse_are_refused_when_the_control_is_made():
    with pytest.raises(ValueError, match="height=40"):
        aux_control_input("canny", _square(), 40, 40)


@pytest.mark.parametrize(
    ("detector", "option", "message"),
    [
        ("canny", "low_treshold", "CannyDetector has no option 'low_treshold': did you mean 'low_threshold'"),
        ("lineart_standard", "gaussian_sigma", "did you mean 'guassian_sigma'"),  # controlnet_aux's spelling
    ],
)
def test_a_mistyped_detector_option_is_refused_by_name(no_network, detector, option, message):
    """CannyDetector takes **kwargs and ignores what it does not know: the defaults would run."""
    with pytest.raises(TypeError, match=message):
        aux_control_input(detector, _square(), 1024, 1024, **{option: 1})
    low = aux_control_input("canny", _square(), 1024, 1024, low_threshold=1, high_threshold=2).tensor
    assert low.shape == (1, 1, 768, 768)


def test_the_same_edges_agree_on_either_scale():
    """An 8-bit edge map (0-255) and the same map in 0-1 are the same edges, not half of them."""
    edges = torch.zeros(1, 1, 8, 8)
    edges[..., 2, :] = 1
    edges[..., 3, :] = 0.4  # a soft edge (resized maps have them): below the 0.5 threshold on either scale
    eight_bit = (edges * 255).round().to(torch.uint8)
    agreement = edge_agreement(eight_bit, edges)
    assert (agreement.iou, agreement.differing) == (1.0, 0.0)
    assert edge_agreement(eight_bit.numpy(), edges.numpy()).iou == 1.0
    with pytest.raises(ValueError, match="floats from 0 to 255.*divide by 255"):
        edge_agreement(edges * 255, edges)  # 0-255 floats: refused, not compared as if 0-1


def test_a_nan_edge_map_is_refused():
    """NaN compares false with any threshold: the map would count as "no edges"."""
    nan = torch.full((1, 1, 8, 8), float("nan"))
    with pytest.raises(ValueError, match="edge map a holds NaN"):
        edge_agreement(nan, torch.zeros(1, 1, 8, 8))
