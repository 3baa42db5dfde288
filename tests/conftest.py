"""Fixtures: tiny model folders written by the package, shared across a test session."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from cascade_helpers.tiny import write_tiny_models


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """A complete tiny models/ folder: big-big names, bf16 files (the download script's defaults)."""
    return write_tiny_models(tmp_path_factory.mktemp("tiny") / "models")


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_models):
    """(prior, decoder) loaded from the tiny folder in float32 on the CPU."""
    from cascade_helpers.loading import load_decoder, load_prior

    prior = load_prior(tiny_models, "big", dtype="fp32", device="cpu")
    decoder = load_decoder(tiny_models, "big", dtype="fp32", device="cpu")
    return prior, decoder


@pytest.fixture
def no_network(monkeypatch):
    """Fail any attempt to open a network connection (loopback included) while the test runs."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network connection attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fresh fake Hub (tests/fakehub.py); HF_ENDPOINT points at it, no token anywhere, downloads
    allowed."""
    from fakehub import FakeHub
    from huggingface_hub import constants

    with FakeHub() as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(variable, raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the notebook runs set it for the session
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
        yield fake


# --- LoRA training (tests/test_lora_training*.py) -----------------------------------------------------


@pytest.fixture(scope="session")
def pictures(tmp_path_factory) -> Path:
    """Two small pictures of the example cat, one bucket at resolution 256 (192² EfficientNet input)."""
    import PIL.Image

    from cascade_helpers.lora_training.data import write_example_images

    folder = write_example_images(tmp_path_factory.mktemp("example"))
    chosen = tmp_path_factory.mktemp("pictures")
    for name in ("chelsea_face", "chelsea_mirrored"):
        PIL.Image.open(folder / f"{name}.png").resize((96, 96)).save(chosen / f"{name}.png")
        (chosen / f"{name}.txt").write_text((folder / f"{name}.txt").read_text())
    return chosen


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def fresh_prior(tiny_models):
    """A new tiny prior each call (training changes the one it trains); without its image encoder
    unless asked, as the tests set ``image_embed_probability`` to 0."""
    from cascade_helpers.loading import load_prior

    def load(image_encoder: bool = False, effnet: bool = True):
        return load_prior(
            tiny_models, "big", dtype="fp32", device="cpu", image_encoder=image_encoder, effnet=effnet
        )

    return load
