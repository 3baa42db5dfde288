"""The autoencoder view: the EfficientNet encoder against the official module, sizes, the round trip
on tiny models, metrics and compression against hand-computed values, resumable folder encoding."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file

from cascade_helpers import files, loading, reconstruction
from cascade_helpers.checkpoints import _TruncatedCheckpointError, _WrongCheckpointError
from cascade_helpers.conditioning import encode_text
from cascade_helpers.effnet import EfficientNetEncoder
from cascade_helpers.effnet import encode as effnet_encode
from cascade_helpers.file_checks import MissingModelFileError
from cascade_helpers.images import batch_images
from cascade_helpers.loading import _load_effnet
from cascade_helpers.quality import Compression, Quality, quality
from cascade_helpers.reconstruction import decode, encode, encode_folder, load_autoencoder, read_latents
from cascade_helpers.sampling import OFFICIAL_DECODER
from cascade_helpers.sizes import _image_size_for_latents as image_size_for_latents
from cascade_helpers.sizes import _stage_c_latent_size as latent_size
from cascade_helpers.tiny import _random_effnet, _write_previewer, _write_unet
from tests.hub_cache import run_against_hub_cache
from tests.recorded_weights import official_weights

OFFICIAL = json.loads((Path(__file__).parent / "fixtures" / "official_effnet.json").read_text())


# --- the encoder against the official module ------------------------------------------------------------


@pytest.fixture(scope="module")
def official_effnet_file(tmp_path_factory) -> Path:
    """A models folder whose effnet_encoder.safetensors has the official keys (our module's key list is
    the official one: test_official_equivalence checks its digest) and the fixture's weights."""
    folder = tmp_path_factory.mktemp("effnet")
    shapes = {k: tuple(v.shape) for k, v in EfficientNetEncoder().state_dict().items()}
    save_file(official_weights(shapes), str(folder / files._FILES["effnet"].path))
    return folder


def test_the_encoder_keeps_the_official_integer_buffers():
    """The released file holds BatchNorm's num_batches_tracked (int64): a strict load needs them."""
    state = EfficientNetEncoder().state_dict()
    integers = sorted(k for k, v in state.items() if not v.is_floating_point())
    assert len(state) == OFFICIAL["state_dict"]["keys"]
    assert integers == OFFICIAL["state_dict"]["integer_keys"]
    assert {str(state[k].dtype) for k in integers} == {OFFICIAL["state_dict"]["integer_dtype"]}


def test_load_effnet_loads_an_official_file_strictly(official_effnet_file, no_network):
    encoder = _load_effnet(official_effnet_file, device="cpu")
    written = load_file(str(official_effnet_file / files._FILES["effnet"].path))
    loaded = encoder.state_dict()
    assert loaded.keys() == written.keys()
    for key, value in written.items():
        assert loaded[key].dtype == (torch.float32 if value.is_floating_point() else torch.int64), key
        torch.testing.assert_close(loaded[key], value, msg=key)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())


def test_load_effnet_from_the_hub_takes_the_official_single_file(monkeypatch, official_effnet_file):
    asked = []

    def fake_download(repo, file):
        asked.append((repo, file.path))
        return official_effnet_file / file.path

    monkeypatch.setattr(loading, "_hub_file", fake_download)
    _load_effnet(files._REPO_DECODER, device="cpu")
    assert asked == [("stabilityai/stable-cascade", "effnet_encoder.safetensors")]


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_a_file_with_other_keys_is_refused(tmp_path, official_effnet_file, change):
    state = load_file(str(official_effnet_file / files._FILES["effnet"].path))
    if change == "missing":
        state.pop("backbone.0.0.weight")
    else:
        state["mapper.2.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / files._FILES["effnet"].path))
    with pytest.raises(RuntimeError, match=f"{change.capitalize()} key"):
        _load_effnet(tmp_path, device="cpu")


@torch.no_grad()
def test_forward_equals_the_official_module(official_effnet_file):
    encoder = _load_effnet(official_effnet_file, device="cpu")
    normalized = torch.randn((2, 3, 64, 96), generator=torch.Generator().manual_seed(103))
    out = encoder(normalized)
    expected = torch.tensor(OFFICIAL["forward"]["values"]).reshape(OFFICIAL["forward"]["shape"])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_preprocessing_and_encoding_equal_the_official_pipeline(official_effnet_file):
    """3/4 nearest downscale floored to multiples of 32, ImageNet normalization, the encoder."""
    encoder = _load_effnet(official_effnet_file, device="cpu")
    pictures = torch.rand((2, 3, 150, 200), generator=torch.Generator().manual_seed(104))
    out = effnet_encode(encoder, pictures)
    expected = torch.tensor(OFFICIAL["preprocessed"]["values"]).reshape(OFFICIAL["preprocessed"]["shape"])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_the_encoder_never_fetches_imagenet_weights(monkeypatch, no_network):
    def refuse(*args, **kwargs):
        raise AssertionError("torchvision tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    EfficientNetEncoder()


def test_load_effnet_says_what_to_do(tmp_path):
    with pytest.raises(MissingModelFileError, match="bash download_models.sh essential"):
        _load_effnet(tmp_path, device="cpu")
    _write_previewer(tmp_path)
    shutil.move(tmp_path / files._FILES["previewer"].path, tmp_path / files._FILES["effnet"].path)
    with pytest.raises(_WrongCheckpointError, match="previewer"):
        _load_effnet(tmp_path, device="cpu")
    path = tmp_path / files._FILES["effnet"].path
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(_TruncatedCheckpointError, match="download_models.sh essential"):
        _load_effnet(tmp_path, device="cpu")


# --- sizes -------------------------------------------------------------------------------------------------

# (picture height, width) → latent (height, width), by hand: side × 3/4, floored to a multiple of 32, / 32
SIZES = {
    (1024, 1024): (24, 24),
    (1024, 1536): (24, 36),
    (1536, 1024): (36, 24),
    (768, 1344): (18, 31),
    (512, 512): (12, 12),
    (512, 768): (12, 18),
    (2048, 2048): (48, 48),
    (1000, 1000): (23, 23),
}


@pytest.mark.parametrize("image,latent", SIZES.items(), ids=lambda s: "x".join(map(str, s)))
def test_latent_sizes(image, latent):
    assert latent_size(*image) == latent


@pytest.mark.parametrize(
    "latent,image",
    [((24, 24), (1024, 1024)), ((24, 36), (1024, 1536)), ((18, 31), (768, 1344)), ((23, 5), (992, 224))],
)
def test_decoding_size_is_the_smallest_that_encodes_to_the_latents(latent, image):
    assert image_size_for_latents(*latent) == image
    assert latent_size(*image) == latent


@pytest.fixture(scope="module")
def encoder() -> EfficientNetEncoder:
    return _random_effnet(0)


@pytest.mark.parametrize("image", [(512, 512), (512, 768), (768, 1344)], ids=lambda s: "x".join(map(str, s)))
def test_the_encoder_gives_these_sizes(encoder, image):
    picture = torch.rand(1, 3, *image)
    assert encode(encoder, picture, size=image).shape == (1, 16, *SIZES[image])


def test_encode_accepts_pil_arrays_tensors_and_folders(tmp_path, encoder):
    PIL.Image.new("RGB", (300, 200), "red").save(tmp_path / "a.png")
    PIL.Image.new("L", (100, 100), 128).save(tmp_path / "b.jpg")
    assert encode(encoder, tmp_path, size=64).shape == (2, 16, 1, 1)
    mixed = [PIL.Image.new("RGBA", (80, 90)), np.zeros((70, 70, 3), np.uint8), torch.rand(3, 64, 64)]
    torch.testing.assert_close(
        encode(encoder, mixed, size=(64, 96)), effnet_encode(encoder, batch_images(mixed, 64, 96))
    )
    assert encode(encoder, torch.rand(4, 3, 128, 128), size=128).shape == (4, 16, 3, 3)


def test_encode_keeps_own_size_cropped_to_multiples_of_32(encoder):
    picture = torch.rand(3, 100, 150)
    encoded = encode(encoder, picture, size=None)
    torch.testing.assert_close(encoded, effnet_encode(encoder, picture[None, :, 2:98, 11:139]))  # the centre
    with pytest.raises(ValueError, match="different sizes"):
        encode(encoder, [torch.rand(3, 64, 64), torch.rand(3, 96, 64)], size=None)


@pytest.mark.parametrize("size", [1000, (64, 100), 32])
def test_sizes_must_be_multiples_of_32(size, encoder):
    with pytest.raises(ValueError, match="multiple of 32"):
        encode(encoder, torch.rand(3, 64, 64), size=size)


# --- the round trip on tiny models ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def autoencoder(tiny_models):
    return load_autoencoder(tiny_models, "big", dtype="fp32", device="cpu", keep_text_encoder=True)


FAST = OFFICIAL_DECODER.with_(steps=2)


def test_round_trip_shapes(autoencoder):
    pictures = [PIL.Image.new("RGB", (200, 150), "blue"), np.full((50, 80, 3), 200, np.uint8)]
    originals = batch_images(pictures, 128, 192)
    latents = encode(autoencoder.effnet, pictures, size=(128, 192))
    assert latents.shape == (2, 16, 3, 4)
    decoded = decode(autoencoder, latents, size=(128, 192), settings=FAST)
    assert decoded.shape == originals.shape == (2, 3, 128, 192)
    assert decoded.min() >= 0 and decoded.max() <= 1
    assert all(math.isfinite(q.psnr) and -1 <= q.ssim <= 1 for q in quality(originals, decoded))
    # latents alone decode to the smallest size that encodes to them: the same here
    assert decode(autoencoder, latents[0], settings=FAST).shape == (1, 3, 128, 192)


def test_decoding_is_seeded(autoencoder):
    latents = torch.randn(1, 16, 2, 2)
    first, again = (decode(autoencoder, latents, settings=FAST, seed=1) for _ in range(2))
    torch.testing.assert_close(first, again)
    assert not torch.equal(first, decode(autoencoder, latents, settings=FAST, seed=2))


def test_stage_b_gets_the_empty_caption_of_text_to_image(autoencoder, tiny_pipeline):
    prior, _ = tiny_pipeline
    torch.testing.assert_close(autoencoder.empty_pooled, encode_text(prior, "").pooled.cpu())


def test_captions_need_the_text_encoder(autoencoder):
    latents = torch.randn(2, 16, 2, 2)
    with pytest.raises(ValueError, match="3 captions for 2 latents"):
        decode(autoencoder, latents, settings=FAST, captions=["a cat", "a dog", "a horse"])
    captioned = decode(autoencoder, latents, settings=FAST, captions="a photo of a cat")
    assert not torch.equal(captioned, decode(autoencoder, latents, settings=FAST))
    without = reconstruction.Autoencoder(autoencoder.effnet, autoencoder.decoder, autoencoder.empty_pooled)
    with pytest.raises(ValueError, match="keep_text_encoder=True"):
        decode(without, latents, settings=FAST, captions="a cat")


def test_official_reconstruction_settings():
    """inference/reconstruct_images.ipynb: cfg 1.1, shift 1, 10 timesteps, t_start 1.0, gdf's cfg_rho 0.7:
    text-to-image's Stage B settings, decode's default."""
    import inspect

    s = inspect.signature(decode).parameters["settings"].default
    assert (s.steps, s.guidance, s.shift, s.t_start, s.guidance_rescale, s.sampler) == (
        10,
        1.1,
        1.0,
        1.0,
        0.7,
        "official",
    )


def test_missing_files_are_listed_in_one_error(tmp_path):
    _write_unet(tmp_path, "stage_b", "lite", "bf16")
    with pytest.raises(MissingModelFileError) as error:
        load_autoencoder(tmp_path, "lite", device="cpu")
    message = str(error.value)
    for file in (
        files._FILES["stage_a"],
        files._FILES["effnet"],
        files._FILES["tokenizer"],
        files._WEIGHTS["text_encoder"]["bf16"],
    ):
        assert file.path in message
    assert "bash download_models.sh essential" in message


HUB_SCRIPT = """
import json, sys, torch
from cascade_helpers import reconstruction
from cascade_helpers.sampling import OFFICIAL_DECODER
autoencoder = reconstruction.load_autoencoder("stabilityai/stable-cascade", "big", dtype="bf16", device="cpu")
latents = reconstruction.encode(autoencoder.effnet, torch.rand(1, 3, 128, 128), size=128)
pictures = reconstruction.decode(autoencoder, latents, settings=OFFICIAL_DECODER.with_(steps=1))
json.dump({"latents": list(latents.shape), "pictures": list(pictures.shape),
           "pooled": autoencoder.empty_pooled.flatten().tolist()}, sys.stdout)
"""


def test_load_autoencoder_from_the_hub_layout_offline(tiny_models, tmp_path, autoencoder):
    """``stabilityai/stable-cascade`` resolved by the real Hub code from a prepared cache (no network):
    Stage B and Stage A from the diffusers folders, the encoder from the single file, the text encoder
    from ``text_encoder/`` — the same empty-caption conditioning as from the models folder."""
    report = run_against_hub_cache(tiny_models, tmp_path, HUB_SCRIPT)
    assert (report["latents"], report["pictures"]) == ([1, 16, 3, 3], [1, 3, 128, 128])
    bf16 = autoencoder.empty_pooled.to(torch.bfloat16).float()  # the cache holds the bf16 text encoder
    torch.testing.assert_close(torch.tensor(report["pooled"]).reshape(bf16.shape), bf16, rtol=0.02, atol=0.02)


def test_available_stage_b(tmp_path):
    assert reconstruction.available_stage_b(tmp_path) == []
    _write_unet(tmp_path, "stage_b", "lite", "fp32")
    assert reconstruction.available_stage_b(tmp_path) == ["lite"]
    _write_unet(tmp_path, "stage_b", "big", "bf16")
    assert reconstruction.available_stage_b(tmp_path) == ["big", "lite"]


# --- metrics and compression, against hand-computed values ----------------------------------------------


def test_psnr_and_ssim():
    picture = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 0.8
    same = quality(picture, picture.clone())[0]
    assert same.psnr == math.inf and same.ssim == pytest.approx(1.0)
    shifted = quality(picture, picture + 0.1)[0]  # MSE 0.01 → 10·log10(1 / 0.01) = 20 dB
    assert shifted.psnr == pytest.approx(20.0, abs=1e-6)
    assert shifted.ssim < 1
    assert Quality.mean([Quality(10, 0.5), Quality(20, 0.7)]) == Quality(15, pytest.approx(0.6))


def test_compression_numbers():
    c = Compression()
    assert c.spatial == pytest.approx(1024 / 24) and round(c.spatial, 2) == 42.67
    assert c.image_bytes == 3 * 1024 * 1024 == 3_145_728
    assert c.latent_bytes == 16 * 24 * 24 * 2 == 18_432
    assert c.bytes == pytest.approx(3_145_728 / 18_432)  # 170.67
    assert c.values == pytest.approx(3 * 1024 * 1024 / (16 * 24 * 24))  # 341.33
    assert Compression(latent_dtype=torch.float32).bytes == pytest.approx(3_145_728 / 36_864)  # 85.33
    assert Compression(1024, 1536).latent_shape == (16, 24, 36)
    assert "42.67×" in str(c)


# --- a folder of pictures to latents on disk -----------------------------------------------------------


class CountingEncoder(torch.nn.Module):
    """Wraps the encoder: counts batches, and can stop the run at a given batch like Ctrl-C."""

    def __init__(self, encoder: EfficientNetEncoder, interrupt_at: int | None = None):
        super().__init__()
        self.encoder, self.calls, self.interrupt_at = encoder, 0, interrupt_at

    def forward(self, x):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        return self.encoder(x)


@pytest.fixture
def picture_folder(tmp_path) -> Path:
    folder = tmp_path / "pictures"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        PIL.Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not a picture")
    return folder


def test_encode_folder_writes_one_file_per_picture(encoder, picture_folder, tmp_path):
    out = tmp_path / "latents"
    written = encode_folder(encoder, picture_folder, out, size=64, batch_size=2, progress=False)
    assert sorted(p.name for p in written) == [f"{i}.png.safetensors" for i in range(5)]
    stored = read_latents(out / "3.png.safetensors")
    assert (stored.image_size, stored.source) == ((64, 64), "3.png")
    assert load_file(str(out / "3.png.safetensors"))["latents"].dtype == torch.float16
    direct, other = encode(encoder, [picture_folder / "3.png", picture_folder / "2.png"], size=64)
    torch.testing.assert_close(stored.latents, direct, rtol=1e-3, atol=1e-3)  # float16 rounding
    assert (stored.latents - other).abs().max() > 0.1, "another picture's latents differ"


def test_encode_folder_resumes_where_it_stopped(encoder, picture_folder, tmp_path):
    out = tmp_path / "latents"
    interrupted = CountingEncoder(encoder, interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):
        encode_folder(interrupted, picture_folder, out, size=64, batch_size=2, progress=False)
    done = sorted(out.glob("*.safetensors"))
    assert [p.name for p in done] == ["0.png.safetensors", "1.png.safetensors"]
    before = {p: p.stat().st_mtime_ns for p in done}

    resumed = CountingEncoder(encoder)
    written = encode_folder(resumed, picture_folder, out, size=64, batch_size=2, progress=False)
    assert resumed.calls == 2  # pictures 2, 3 then 4: the first two are not encoded again
    assert [p.name for p in written] == [f"{i}.png.safetensors" for i in (2, 3, 4)]
    assert {p: p.stat().st_mtime_ns for p in done} == before


def test_an_interrupted_write_leaves_no_latents_file(encoder, picture_folder, tmp_path, monkeypatch):
    out = tmp_path / "latents"
    real_save = safetensors.torch.save_file

    def save_half_then_stop(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", save_half_then_stop)
    with pytest.raises(KeyboardInterrupt):
        encode_folder(encoder, picture_folder, out, size=64, progress=False)
    assert not list(out.iterdir())  # no latents file, and the temporary one was removed
    monkeypatch.undo()
    (out / "4.png.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")  # damaged elsewhere
    assert len(encode_folder(encoder, picture_folder, out, size=64, progress=False)) == 5


def test_latents_from_elsewhere_decode_at_their_size(tmp_path):
    save_file({"x": torch.randn(1, 16, 24, 36)}, str(tmp_path / "foreign.safetensors"))
    stored = read_latents(tmp_path / "foreign.safetensors")
    assert stored.latents.shape == (16, 24, 36) and stored.image_size == (1024, 1536)
    save_file({"a": torch.randn(16, 2, 2), "b": torch.randn(16, 2, 2)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ValueError, match="expected one tensor"):
        read_latents(tmp_path / "two.safetensors")


def test_latents_files_keep_the_pictures_suffix(encoder, tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    for suffix in ("png", "jpg"):
        PIL.Image.new("RGB", (64, 64), "red").save(folder / f"cat.{suffix}")
    written = encode_folder(encoder, folder, tmp_path / "latents", size=64, progress=False)
    assert sorted(p.name for p in written) == ["cat.jpg.safetensors", "cat.png.safetensors"]


@pytest.mark.parametrize("size", [(1024.9, 1024), 1024.0, "64", (64,), (64, 64, 3)])
def test_a_size_that_is_no_whole_number_pair_is_refused(size):
    with pytest.raises(ValueError, match="size must be|height=|width="):
        encode(_random_effnet(0), np.zeros((96, 96, 3), np.uint8), size=size)


def test_compression_of_a_size_the_encoder_cannot_take_is_refused():
    with pytest.raises(ValueError, match="height=40"):
        Compression(40, 40)


def test_a_new_size_or_an_edited_picture_is_encoded_again(encoder, picture_folder, tmp_path):
    """What decides "already done" is the settings and the picture's bytes, not its name: latents of
    another size, or of the picture before an edit, are never kept as if they were current."""
    out = tmp_path / "latents"
    encode_folder(encoder, picture_folder, out, size=64, progress=False)
    encode_folder(encoder, picture_folder, out, size=96, progress=False)
    assert read_latents(out / "0.png.safetensors").latents.shape == (16, 2, 2)  # 96 → 72 → 64: 2×2
    edited = picture_folder / "3.png"
    PIL.Image.fromarray(np.full((70, 90, 3), 250, np.uint8)).save(edited)  # the same name, other pixels
    encode_folder(encoder, picture_folder, out, size=96, progress=False)
    expected = encode(encoder, edited, size=96)[0]
    torch.testing.assert_close(
        read_latents(out / "3.png.safetensors").latents, expected, rtol=1e-3, atol=1e-3
    )
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert not encode_folder(encoder, picture_folder, out, size=(96, 96), progress=False)  # the same size
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


@pytest.mark.parametrize("batch_size", [-1, 0, 2.0, True])
def test_a_batch_size_that_encodes_nothing_is_refused(encoder, picture_folder, tmp_path, batch_size):
    with pytest.raises(ValueError, match="batch_size must be a whole number ≥ 1"):
        encode_folder(encoder, picture_folder, tmp_path / "latents", size=64, batch_size=batch_size)
    assert not (tmp_path / "latents").exists()
    with pytest.raises(ValueError, match="batch_size must be a whole number ≥ 1"):
        encode(encoder, picture_folder, size=64, batch_size=batch_size)


def test_integer_or_nan_latents_are_refused(autoencoder, tmp_path):
    """An int8 tensor would decode as its integer values, NaN latents as a black picture."""
    for latents, message in (
        (torch.ones(1, 16, 2, 2, dtype=torch.int8), "a float tensor, not torch.int8"),
        (torch.full((16, 2, 2), float("nan")), "NaN or infinite"),
    ):
        with pytest.raises(ValueError, match=message):
            decode(autoencoder, latents, settings=FAST)
        save_file({"latents": latents}, str(tmp_path / "bad.safetensors"))
        with pytest.raises(ValueError, match=message):
            read_latents(tmp_path / "bad.safetensors")


def test_a_damaged_latents_file_is_named(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"latents": torch.randn(16, 4, 4)}, str(path))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="cut.safetensors is not a complete safetensors file"):
        read_latents(path)
