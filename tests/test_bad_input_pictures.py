"""Pictures in: every PIL mode read correctly, integer arrays of any dtype, 0–1 floats — and the
ambiguous or broken ones refused with a message that names the picture and the fix. Every entry
point reads pictures through ``images.image_to_tensor``, so a 16-bit PNG that used to become an
all-white picture (mean 0.997) in image-to-image, variation, ControlNet, training and
reconstruction is checked here once and through the entry points.

Expectations come from the pixel values themselves (a gradient whose 16-bit values are its 8-bit
values × 257, so both describe the same picture exactly), not from the code under test.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cascade_helpers.controlnet.filters import control_input
from cascade_helpers.generation import image_to_image, image_variation
from cascade_helpers.images import batch_images, image_to_tensor
from cascade_helpers.stages import _encode_picture, _variation_embeddings

EIGHT = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (48, 1))  # 48×64 grey gradient, 0..252
SIXTEEN = EIGHT.astype(np.uint16) * 257  # the same picture in 16 bits: 65535 / 255 = 257
EXPECTED = torch.from_numpy(EIGHT / 255).float()[None].expand(3, -1, -1)


def _close(actual: torch.Tensor, expected: torch.Tensor = EXPECTED) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


# --- what must be read correctly -----------------------------------------------------------------------


def test_a_16_bit_picture_is_scaled_not_clipped():
    picture = PIL.Image.fromarray(SIXTEEN)
    assert picture.mode == "I;16"
    _close(image_to_tensor(picture))  # was all white: every value above 255 clipped


def test_a_16_bit_png_file_in_either_byte_order(tmp_path):
    PIL.Image.fromarray(SIXTEEN).save(tmp_path / "16.png")
    _close(image_to_tensor(tmp_path / "16.png"))
    big_endian = PIL.Image.frombytes("I;16B", (64, 48), SIXTEEN.astype(">u2").tobytes())
    _close(image_to_tensor(big_endian))


def test_32_bit_integer_and_float_pictures():
    _close(
        image_to_tensor(PIL.Image.fromarray(SIXTEEN.astype(np.int32)))
    )  # mode I: 16-bit files in old Pillow
    float_picture = PIL.Image.fromarray((EIGHT / 255).astype(np.float32))
    assert float_picture.mode == "F"
    _close(image_to_tensor(float_picture))  # was black: floats truncated to 0 or 1


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "YCbCr", "1", "RGB"])
def test_eight_bit_modes_match_pils_own_rgb(mode):
    rgb = PIL.Image.fromarray(np.stack([EIGHT, EIGHT[:, ::-1], np.full_like(EIGHT, 90)], -1))
    picture = rgb.convert(mode)
    expected = torch.from_numpy(np.asarray(picture.convert("RGB")) / 255).float().permute(2, 0, 1)
    _close(image_to_tensor(picture), expected)


def test_transparency_is_white_for_pictures_and_arrays_alike():
    grey_alpha = np.stack([EIGHT, np.where(EIGHT > 128, 255, 0).astype(np.uint8)], -1)
    expected = torch.from_numpy(np.where(EIGHT > 128, EIGHT / 255, 1.0)).float()[None].expand(3, -1, -1)
    _close(image_to_tensor(PIL.Image.fromarray(grey_alpha, "LA")), expected)
    _close(image_to_tensor(grey_alpha), expected)  # an H×W×2 array was read as a 2×W picture before


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.int64, np.uint16, np.uint32, np.uint64, np.int8])
def test_integer_arrays_of_any_dtype_hold_0_to_255(dtype):
    values = np.minimum(EIGHT, 127) if dtype == np.int8 else EIGHT
    expected = torch.from_numpy(values / 255).float()[None].expand(3, -1, -1)
    _close(image_to_tensor(values.astype(dtype)), expected)  # int64 was all white before
    _close(image_to_tensor(torch.from_numpy(values.astype(np.int64))), expected)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_arrays_hold_0_to_1(dtype):
    values = (EIGHT / 255).astype(dtype)
    torch.testing.assert_close(image_to_tensor(values), EXPECTED, rtol=0, atol=1e-3)
    torch.testing.assert_close(image_to_tensor(torch.from_numpy(values)[None]), EXPECTED, rtol=0, atol=1e-3)


def test_a_batch_array_is_a_list_of_pictures():
    batch = np.stack([EIGHT, 255 - EIGHT])[..., None].repeat(3, -1)  # 2×H×W×3
    pictures = batch_images(batch, 48, 64)
    _close(pictures[0])
    assert pictures.shape == (2, 3, 48, 64)


# --- what must be refused, by name ---------------------------------------------------------------------

RAMP = np.linspace(0, 1, 48 * 64, dtype=np.float32).reshape(48, 64)
BAD_PICTURES = [
    ("0-255 floats", RAMP * 255, ValueError, "floats from 0 to 255.*divide by 255"),  # all white before
    ("-1..1 floats", torch.from_numpy(RAMP * 2 - 1), ValueError, r"floats from -1 to 1.*\(x \+ 1\) / 2"),
    ("NaN", np.where(RAMP > 0.5, np.nan, RAMP), ValueError, "holds NaN or infinite values"),  # black before
    ("inf", np.where(RAMP > 0.5, np.inf, RAMP), ValueError, "holds NaN or infinite values"),
    ("int above 255", (RAMP * 300).astype(np.int64), ValueError, "integers from 0 to 300.*0-255"),
    ("16-bit array", SIXTEEN, ValueError, "integers from 0 to 64764.*16-bit.*divide by 65535"),
    ("negative ints", (RAMP * 20 - 5).astype(np.int8), ValueError, "integers from -5"),
    (
        "mode F 0-255",
        PIL.Image.fromarray(RAMP * 255),
        ValueError,
        "a mode 'F' picture holds floats from 0 to 255",
    ),
    (
        "mode I negative",
        PIL.Image.fromarray((RAMP * 10 - 5).astype(np.int32)),
        ValueError,
        "mode 'I' picture",
    ),
    (
        "five channels",
        np.zeros((5, 48, 64), np.uint8),
        ValueError,
        r"1 to 4 channels\), got shape \(5, 48, 64\)",
    ),
    ("a batch of two", torch.zeros(2, 3, 48, 64), ValueError, r"got shape \(2, 3, 48, 64\)"),
    ("empty", np.zeros((0, 0), np.uint8), ValueError, r"of shape \(0, 0\), dtype uint8\) is empty"),
    ("complex", RAMP.astype(np.complex64), ValueError, "complex numbers"),
    ("strings", np.array([["a", "b"]]), ValueError, "needs numbers, not dtype <U1"),
    ("None", None, TypeError, "a picture must be a file path, a PIL image, .* not NoneType"),
    ("a list of numbers", [[0, 1], [1, 0]], TypeError, "not list"),
]


@pytest.mark.parametrize(
    ("picture", "error", "message"), [c[1:] for c in BAD_PICTURES], ids=[c[0] for c in BAD_PICTURES]
)
def test_bad_pictures_are_refused_with_the_fix(picture, error, message):
    with pytest.raises(error, match=message):
        image_to_tensor(picture)


def test_a_truncated_picture_file_is_named(tmp_path):
    path = tmp_path / "cut.png"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # does not compress
    PIL.Image.fromarray(noise).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(OSError, match=f"{path} cannot be read as a picture.*cut short"):
        image_to_tensor(path)


def test_a_file_that_is_no_picture_is_named(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not a picture")
    with pytest.raises(OSError, match=f"{path} cannot be read as a picture"):
        image_to_tensor(str(path))


def test_a_missing_picture_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        image_to_tensor(tmp_path / "nowhere.png")


# --- through the entry points --------------------------------------------------------------------------


def test_every_entry_point_reads_a_16_bit_picture_as_its_8_bit_twin(tiny_pipeline, tmp_path):
    """image-to-image, variation, ControlNet pictures and masks, reconstruction and training all
    go through image_to_tensor; each gives the 16-bit picture what it gives the same 8-bit one."""
    from cascade_helpers.effnet import encode as effnet_encode

    prior, _ = tiny_pipeline
    eight, sixteen = PIL.Image.fromarray(EIGHT), PIL.Image.fromarray(SIXTEEN)
    torch.testing.assert_close(
        _encode_picture(prior, sixteen, 512, 512), _encode_picture(prior, eight, 512, 512)
    )
    torch.testing.assert_close(_variation_embeddings(prior, sixteen), _variation_embeddings(prior, eight))
    canny = control_input("canny", sixteen, 512, 512).tensor
    assert torch.equal(canny, control_input("canny", eight, 512, 512).tensor)
    black = np.zeros((48, 64, 3), np.uint8)
    masks = [control_input("inpainting", black, 512, 512, mask=m).tensor[:, 3] for m in (sixteen, eight)]
    assert torch.equal(*masks)  # was all True
    PIL.Image.fromarray(SIXTEEN).save(tmp_path / "16.png")  # reconstruction and training read files
    from_file = effnet_encode(prior.effnet, batch_images(tmp_path / "16.png", 512, 512), downscale=True)
    expected = effnet_encode(prior.effnet, batch_images(eight, 512, 512), downscale=True)
    torch.testing.assert_close(from_file, expected)


@pytest.mark.parametrize(
    "call",
    [
        lambda p, d, x: image_to_image(p, d, x, "a cat"),
        lambda p, d, x: image_variation(p, d, x),
        lambda p, d, x: control_input("canny", x),
        lambda p, d, x: control_input("inpainting", np.zeros((48, 64, 3), np.uint8), mask=x),
    ],
    ids=["image_to_image", "image_variation", "controlnet picture", "inpainting mask"],
)
def test_entry_points_refuse_a_0_to_255_float_picture(tiny_pipeline, call):
    with pytest.raises(ValueError, match="float pictures must hold 0-1 .*divide by 255"):
        call(*tiny_pipeline, RAMP * 255)


# --- EXIF orientation: a phone's portrait is stored sideways ---------------------------------------------

UPRIGHT = np.zeros((60, 40, 3), np.uint8)  # a portrait: 60 high, 40 wide
UPRIGHT[:20, :20] = (255, 0, 0)  # red at the top left
UPRIGHT[:, :, 2] = np.linspace(0, 255, 40, dtype=np.uint8)  # blue grows to the right


@pytest.fixture
def sideways(tmp_path):
    """The portrait as a phone stores it: turned a quarter, with EXIF Orientation 6 ("rotate 90° to view")."""
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "portrait" / "phone.png"
    path.parent.mkdir()
    PIL.Image.fromarray(UPRIGHT).transpose(PIL.Image.Transpose.ROTATE_90).save(path, exif=exif)
    assert PIL.Image.open(path).size == (60, 40)  # stored landscape
    return path


def test_a_sideways_picture_enters_upright(sideways):
    expected = torch.from_numpy(UPRIGHT).permute(2, 0, 1).float() / 255
    _close(image_to_tensor(sideways), expected)
    with PIL.Image.open(sideways) as opened:
        _close(image_to_tensor(opened), expected)  # a PIL picture opened by the user too
    _close(batch_images(sideways, 60, 40)[0], expected)


def test_every_entry_point_reads_a_sideways_picture_upright(tiny_pipeline, sideways):
    """image-to-image, ControlNet pictures and masks, reconstruction and training buckets."""
    from cascade_helpers.lora_training.data import find_training_images
    from cascade_helpers.reconstruction import encode

    prior, _ = tiny_pipeline
    torch.testing.assert_close(
        _encode_picture(prior, sideways, 512, 768), _encode_picture(prior, UPRIGHT, 512, 768)
    )
    canny = control_input("canny", sideways, 512, 768).tensor
    assert torch.equal(canny, control_input("canny", UPRIGHT, 512, 768).tensor)
    mask = control_input("inpainting", UPRIGHT, 512, 768, mask=sideways).tensor
    assert torch.equal(mask, control_input("inpainting", UPRIGHT, 512, 768, mask=UPRIGHT).tensor)
    torch.testing.assert_close(
        encode(prior.effnet, sideways, size=(96, 64)), encode(prior.effnet, UPRIGHT, size=(96, 64))
    )
    (found,) = find_training_images(sideways.parent)
    assert found.size == (60, 40)  # (height, width): the bucket of a portrait, from the header alone


# --- memory: cut before scaling ---------------------------------------------------------------------------


class _LargestTensor(TorchDispatchMode):
    """Records the most elements any torch operation returns while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self.numel = max(self.numel, tensor.numel())
        return out


STRIP = np.random.default_rng(0).integers(0, 256, (8, 400, 3), dtype=np.uint8)  # 50:1, like 20000×20


@pytest.mark.parametrize(
    "prepare",
    [
        lambda prior: batch_images(STRIP, 384, 384),
        lambda prior: control_input("canny", STRIP, 512, 512),
        lambda prior: control_input("inpainting", STRIP, 512, 512, mask=STRIP[..., 0] > 127),
        lambda prior: _encode_picture(prior, STRIP, 512, 512),
    ],
    ids=["batch_images", "canny control", "inpainting control and mask", "image-to-image"],
)
def test_a_long_strip_is_cut_before_it_is_scaled(tiny_pipeline, prepare):
    """Scaled to cover 384² first, an 8×400 strip becomes 3×384×19200 (22 M values; a 20000×20 picture
    at 1024² asked for 7 GB); cut first, nothing is larger than the EfficientNet's own activations."""
    with _LargestTensor() as largest:
        prepare(tiny_pipeline[0])
    assert largest.numel < 2_000_000
