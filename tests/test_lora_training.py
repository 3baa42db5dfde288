"""LoRA training on the tiny models: the official objective, loss going down, save → load, resume,
Ctrl-C, caches.

``fixtures/official_training_objective.json`` was recorded with the official ``gdf`` built as
``train/train_c_lora.py`` builds it (see its ``about``).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import PIL.Image
import pytest
import torch

from cascade_helpers.conditioning import encode_text
from cascade_helpers.loading import load_prior
from cascade_helpers.lora import load_lora
from cascade_helpers.lora_training import (
    LoraTrainer,
    LoraTrainingConfig,
    TrainingError,
    bucket_sizes,
    caption_for,
    closest_bucket,
    main,
    stage_c_loss,
    write_example_images,
)
from cascade_helpers.sampling import diffuse, log_snr, noise_condition, p2_loss_weight, training_times

OBJECTIVE = json.loads((Path(__file__).parent / "fixtures" / "official_training_objective.json").read_text())
TOKEN = [("[chelsea]", "^cat</w>")]


# --- the objective -----------------------------------------------------------------------------------


def _fixture_batch():
    generator = torch.Generator().manual_seed(5)
    return torch.randn(4, 16, 3, 3, generator=generator), torch.randn(4, 16, 3, 3, generator=generator)


def test_training_times_and_schedule_are_the_official_ones():
    torch.manual_seed(0)  # the official schedule draws its t from the global generator
    snr = log_snr(training_times(4))
    torch.testing.assert_close(snr, torch.tensor(OBJECTIVE["log_snr"]))
    torch.testing.assert_close(noise_condition(snr), torch.tensor(OBJECTIVE["noise_cond"]))
    torch.testing.assert_close(p2_loss_weight(snr), torch.tensor(OBJECTIVE["loss_weight"]))
    edges = torch.tensor(OBJECTIVE["edge_t"])
    torch.testing.assert_close(log_snr(edges), torch.tensor(OBJECTIVE["edge_log_snr"]))
    torch.testing.assert_close(noise_condition(log_snr(edges)), torch.tensor(OBJECTIVE["edge_noise_cond"]))
    assert p2_loss_weight(torch.tensor(0.0)) == 0.5  # 1 / (1 + SNR) at SNR 1


def test_stage_c_loss_is_the_official_loss():
    """A stand-in model predicting 0.5·x_t: noising, conditioning and the weighted loss all match gdf."""
    x0, noise = _fixture_batch()
    torch.manual_seed(0)
    times = training_times(4)
    seen = {}

    class HalfOfInput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, r, return_dict=False, **conditions):
            seen["r"], seen["x"] = r, x
            return (0.5 * x,)

    loss = stage_c_loss(HalfOfInput(), x0, {}, times, noise)
    torch.testing.assert_close(seen["x"].flatten(), torch.tensor(OBJECTIVE["noised"]))
    torch.testing.assert_close(seen["r"], torch.tensor(OBJECTIVE["noise_cond"]))
    torch.testing.assert_close(loss, torch.tensor(OBJECTIVE["loss"]))
    torch.testing.assert_close(diffuse(x0, times, noise).flatten(), torch.tensor(OBJECTIVE["noised"]))


def test_buckets_follow_the_official_bucketeer():
    sizes = bucket_sizes(1024, ["1/1", "9/16", "2/3"])
    # area 768², sides floored to 32: 9/16 → 1024×576 (h×w), its reciprocal 576×1024; 2/3 → 928×608
    assert sizes == [(768, 768), (1024, 576), (928, 608), (576, 1024), (608, 928)]
    assert closest_bucket(300, 451, sizes) == (608, 928)  # 3:2 landscape


def test_captions_come_from_a_sidecar_or_the_file_name(tmp_path):
    (tmp_path / "x.png").touch()
    (tmp_path / "x.txt").write_text("a photo of [chelsea]\n")
    assert caption_for(tmp_path / "x.png") == "a photo of [chelsea]"
    assert caption_for(tmp_path / "a_photo_of_[chelsea]_on_a_sofa_02.png") == "a photo of [chelsea] on a sofa"
    assert caption_for(tmp_path / "portrait (3).jpg") == "portrait"


# --- training on the tiny models ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def pictures(tmp_path_factory) -> Path:
    """Two small pictures of the example cat, one bucket at resolution 256 (192² EfficientNet input)."""
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

    def load(image_encoder: bool = False, effnet: bool = True):
        return load_prior(
            tiny_models, "big", dtype="fp32", device="cpu", image_encoder=image_encoder, effnet=effnet
        )

    return load


def _config(pictures, output, cache, **changes) -> LoraTrainingConfig:
    settings = dict(
        images=str(pictures), output_dir=str(output), cache_dir=str(cache), new_tokens=TOKEN, resolution=256,
        batch_size=2, gradient_accumulation=1, steps=3, precision="fp32", checkpoint_every=2, learning_rate=1e-2,
        gradient_checkpointing=False, image_embed_probability=0.0,
    )  # fmt: skip
    return LoraTrainingConfig(**(settings | changes))


def _fixed_loss(trainer: LoraTrainer) -> float:
    """The loss on the whole (one-bucket) dataset, averaged over four fixed draws of noise and times."""
    state, losses = trainer.generator.get_state(), []
    for seed in range(4):
        trainer.generator.manual_seed(seed)
        with torch.no_grad():
            losses.append(trainer.batch_loss(list(range(len(trainer.items)))).item())
    trainer.generator.set_state(state)
    return sum(losses) / len(losses)


def test_a_few_steps_on_one_batch_lower_the_loss_and_learn_the_token(
    fresh_prior, pictures, shared_cache, tmp_path
):
    # a tiny random model learns slowly through a rank-4 LoRA: a strong learning rate and scale
    changes = dict(steps=5, learning_rate=5e-2, alpha=4.0, caption_dropout=0.0)
    trainer = LoraTrainer(fresh_prior(), _config(pictures, tmp_path, shared_cache, **changes))
    trainer.prepare()
    assert len({item.bucket for item in trainer.items}) == 1 and trainer.config.batch_size == len(
        trainer.items
    )
    initial_row = trainer.tokens.rows.detach().clone()
    before = _fixed_loss(trainer)
    result = trainer.train()
    after = _fixed_loss(trainer)
    assert after < 0.9 * before, (before, after)
    assert not torch.equal(trainer.tokens.rows, initial_row)  # the gradient reached the new token
    assert result.lora == tmp_path / "lora.safetensors" and result.lora.is_file()


def test_saved_lora_reproduces_the_trained_model(fresh_prior, pictures, shared_cache, tmp_path):
    trainer = LoraTrainer(fresh_prior(), _config(pictures, tmp_path, shared_cache, steps=2))
    path = trainer.train().lora
    trainer.config.validation_prompts, trainer.config.validation_prior_steps = (
        ["a photo of [chelsea] the cat"],
        2,
    )
    shown = []
    (picture,) = trainer.validate(
        lambda step, pictures, prompts: shown.append((step, prompts))
    )  # the previewer's
    assert picture.size == (48, 48) and shown == [(2, ["a photo of [chelsea] the cat"])]
    assert (tmp_path / "validation" / "step-000002.png").is_file()
    comfy, embedding = trainer.export_comfyui(tmp_path / "comfy.safetensors")
    for how in ("ours", "comfyui"):
        loaded = fresh_prior(effnet=False)
        if how == "ours":
            load_lora(loaded, path)
        else:
            load_lora(loaded, comfy)
            from cascade_helpers.lora import load_comfyui_embedding

            load_comfyui_embedding(loaded, embedding, "[chelsea]")
        for prompt in ("a photo of [chelsea] the cat", "a red cat"):
            expected, got = encode_text(trainer.prior, prompt), encode_text(loaded, prompt)
            torch.testing.assert_close(got.hidden, expected.hidden)
            torch.testing.assert_close(got.pooled, expected.pooled)
        x = torch.randn(1, 16, 12, 12, generator=torch.Generator().manual_seed(0))
        cond = encode_text(loaded, "a photo of [chelsea] the cat")
        inputs = dict(clip_text_pooled=cond.pooled, clip_text=cond.hidden, clip_img=torch.zeros(1, 1, 24))
        with torch.no_grad():
            torch.testing.assert_close(
                loaded.unet(x, torch.tensor([0.5]), **inputs).sample,
                trainer.prior.unet(x, torch.tensor([0.5]), **inputs).sample,
            )


def _trained_state(trainer: LoraTrainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.trainable]


def test_ctrl_c_saves_a_checkpoint_and_a_rerun_continues_exactly(
    fresh_prior, pictures, shared_cache, tmp_path
):
    config = _config(pictures, tmp_path / "straight", shared_cache, ema_decay=0.5)
    straight = LoraTrainer(fresh_prior(), config)
    straight.train()

    def press_ctrl_c(step, loss):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    interrupted = LoraTrainer(
        fresh_prior(),
        _config(pictures, tmp_path / "stopped", shared_cache, ema_decay=0.5, checkpoint_every=100),
    )
    first = interrupted.train(on_step=press_ctrl_c)
    assert (first.interrupted, first.step, first.lora) == (True, 1, None)
    assert first.checkpoint.name == "step-000001" and first.checkpoint.is_dir()

    rerun = LoraTrainer(
        fresh_prior(),
        _config(pictures, tmp_path / "stopped", shared_cache, ema_decay=0.5, checkpoint_every=100),
    )
    assert rerun.resume() == 1
    second = rerun.train()
    assert (second.interrupted, second.step) == (False, 3)
    assert [s for s, _ in second.losses] == [1, 2, 3]
    for a, b in zip(_trained_state(straight), _trained_state(rerun), strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(straight.ema, rerun.ema, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close([loss for _, loss in second.losses], [loss for _, loss in straight.losses])


def test_a_checkpoint_with_other_settings_is_not_resumed(fresh_prior, pictures, shared_cache, tmp_path):
    LoraTrainer(fresh_prior(), _config(pictures, tmp_path, shared_cache, steps=1)).train()
    with pytest.raises(TrainingError, match="rank=4"):
        LoraTrainer(fresh_prior(), _config(pictures, tmp_path, shared_cache, steps=2, rank=8)).train()


def test_caches_are_reused_and_the_encoders_not_called_again(fresh_prior, pictures, tmp_path):
    calls = {"effnet": 0, "text_encoder": 0, "image_encoder": 0}

    def count(name):
        def hook(module, args, output):
            calls[name] += 1

        return hook

    config = _config(
        pictures, tmp_path / "a", tmp_path / "cache", new_tokens=[], steps=1, image_embed_probability=1.0
    )
    first = LoraTrainer(fresh_prior(image_encoder=True), config)
    assert (first.prepare().latents_computed, first.report.texts_computed) == (2, 3)  # two captions and ""

    prior = fresh_prior(image_encoder=True)
    for name in calls:
        getattr(prior, name).register_forward_hook(count(name))
    second = LoraTrainer(
        prior,
        _config(
            pictures, tmp_path / "b", tmp_path / "cache", new_tokens=[], steps=2, image_embed_probability=1.0
        ),
    )
    report = second.prepare()
    assert (report.latents_computed, report.latents_cached, report.texts_computed, report.texts_cached) == (
        0,
        2,
        0,
        3,
    )
    second.train()
    assert calls == {"effnet": 0, "text_encoder": 0, "image_encoder": 0}
    assert all(item.image_embeds is not None for item in second.items)


def test_a_token_missing_from_the_captions_is_refused(fresh_prior, pictures, shared_cache, tmp_path):
    trainer = LoraTrainer(
        fresh_prior(), _config(pictures, tmp_path, shared_cache, new_tokens=[("[rex]", "^dog</w>")])
    )
    with pytest.raises(TrainingError, match=r"no caption mentions \[rex\]"):
        trainer.prepare()


def test_the_command_line_trains_from_a_saved_config(tiny_models, pictures, shared_cache, tmp_path):
    """What ``accelerate launch -m cascade_helpers.lora_training --config ...`` runs, on one process."""
    config = _config(pictures, tmp_path, shared_cache, steps=1, models_dir=str(tiny_models), dtype="fp32")
    main(["--config", str(config.save(tmp_path / "run.json"))])
    assert (tmp_path / "lora.safetensors").is_file()
    assert (tmp_path / "checkpoints" / "step-000001" / "state.pt").is_file()
