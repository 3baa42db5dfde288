"""LoRA training on the tiny models: the official objective, loss going down, save → load, resume,
Ctrl-C, caches.

``fixtures/official_training_objective.json`` was recorded with the official ``gdf`` built as
``train/train_c_lora.py`` builds it (see its ``about``).
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import shutil
import signal
import types
from pathlib import Path
from unittest import mock

import PIL.ExifTags
import PIL.Image
import pytest
import torch
from training_setup import make_config

from cascade_helpers.conditioning import encode_text
from cascade_helpers.images import resize_and_crop
from cascade_helpers.lora.load import load_comfyui_embedding, load_lora
from cascade_helpers.lora_training.cache import CacheReport, _cache_images
from cascade_helpers.lora_training.cli import main
from cascade_helpers.lora_training.config import LoraTrainingConfig, TrainingError
from cascade_helpers.lora_training.data import (
    _caption_for,
    _crop_position,
    _read_picture,
    _scaled_size,
    bucket_sizes,
    closest_bucket,
    find_training_images,
    write_example_images,
)
from cascade_helpers.lora_training.objective import stage_c_loss
from cascade_helpers.lora_training.trainer import LoraTrainer
from cascade_helpers.sampling import diffuse, log_snr, noise_condition, p2_loss_weight, training_times

OBJECTIVE = json.loads((Path(__file__).parent / "fixtures" / "official_training_objective.json").read_text())


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
    assert _caption_for(tmp_path / "x.png") == "a photo of [chelsea]"
    assert (
        _caption_for(tmp_path / "a_photo_of_[chelsea]_on_a_sofa_02.png") == "a photo of [chelsea] on a sofa"
    )
    assert _caption_for(tmp_path / "portrait (3).jpg") == "portrait"


# --- training on the tiny models ---------------------------------------------------------------------


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
    trainer = LoraTrainer(fresh_prior(), make_config(pictures, tmp_path, shared_cache, **changes))
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
    trainer = LoraTrainer(fresh_prior(), make_config(pictures, tmp_path, shared_cache, steps=2))
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
    config = make_config(pictures, tmp_path / "straight", shared_cache, ema_decay=0.5)
    straight = LoraTrainer(fresh_prior(), config)
    straight.train()

    def press_ctrl_c(step, loss):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    interrupted = LoraTrainer(
        fresh_prior(),
        make_config(pictures, tmp_path / "stopped", shared_cache, ema_decay=0.5, checkpoint_every=100),
    )
    first = interrupted.train(on_step=press_ctrl_c)
    assert (first.interrupted, first.step, first.lora) == (True, 1, None)
    assert first.checkpoint.name == "step-000001" and first.checkpoint.is_dir()

    rerun = LoraTrainer(
        fresh_prior(),
        make_config(pictures, tmp_path / "stopped", shared_cache, ema_decay=0.5, checkpoint_every=100),
    )
    assert rerun.resume() == 1
    second = rerun.train()
    assert (second.interrupted, second.step) == (False, 3)
    assert [s for s, _ in second.losses] == [1, 2, 3]
    for a, b in zip(_trained_state(straight), _trained_state(rerun), strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(straight.ema.shadow_params, rerun.ema.shadow_params, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close([loss for _, loss in second.losses], [loss for _, loss in straight.losses])


def test_a_checkpoint_with_other_settings_is_not_resumed(fresh_prior, pictures, shared_cache, tmp_path):
    LoraTrainer(fresh_prior(), make_config(pictures, tmp_path, shared_cache, steps=1)).train()
    with pytest.raises(TrainingError, match="rank=4"):
        LoraTrainer(fresh_prior(), make_config(pictures, tmp_path, shared_cache, steps=2, rank=8)).train()


def test_caches_are_reused_and_the_encoders_not_called_again(fresh_prior, pictures, tmp_path):
    calls = {"effnet": 0, "text_encoder": 0, "image_encoder": 0}

    def count(name):
        def hook(module, args, output):
            calls[name] += 1

        return hook

    config = make_config(
        pictures, tmp_path / "a", tmp_path / "cache", new_tokens=[], steps=1, image_embed_probability=1.0
    )
    first = LoraTrainer(fresh_prior(image_encoder=True), config)
    assert (first.prepare().latents_computed, first.report.texts_computed) == (2, 3)  # two captions and ""

    prior = fresh_prior(image_encoder=True)
    for name in calls:
        getattr(prior, name).register_forward_hook(count(name))
    second = LoraTrainer(
        prior,
        make_config(
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
        fresh_prior(), make_config(pictures, tmp_path, shared_cache, new_tokens=[("[rex]", "^dog</w>")])
    )
    with pytest.raises(TrainingError, match=r"no caption mentions \[rex\]"):
        trainer.prepare()


def test_the_parts_the_run_uses_are_required_before_anything_is_encoded(
    fresh_prior, tiny_models, pictures, tmp_path
):
    from cascade_helpers.loading import load_prior

    config = make_config(pictures, tmp_path, tmp_path / "cache", image_embed_probability=0.5)
    with pytest.raises(
        TrainingError,
        match=r"image_embed_probability=0\.5 .*needs the CLIP image encoder.*image_encoder=True",
    ):
        LoraTrainer(fresh_prior(image_encoder=False), config).prepare()
    no_previewer = load_prior(
        tiny_models, "big", dtype="fp32", device="cpu", image_encoder=False, previewer=False
    )
    config = make_config(pictures, tmp_path, tmp_path / "cache", resolution=512, validation_prompts=["a cat"])
    with pytest.raises(
        TrainingError, match="validation without a decoder .*needs the previewer.*previewer=True"
    ):
        LoraTrainer(no_previewer, config).prepare()
    assert not (tmp_path / "cache").exists()  # refused before any picture was encoded


def test_the_command_line_trains_from_a_saved_config(tiny_models, pictures, shared_cache, tmp_path):
    """What ``accelerate launch -m cascade_helpers.lora_training --config ...`` runs, on one process."""
    config = make_config(pictures, tmp_path, shared_cache, steps=1, models_dir=str(tiny_models), dtype="fp32")
    assert main(["--config", str(config.save(tmp_path / "run.json"))]) == 0
    assert (tmp_path / "lora.safetensors").is_file()
    # the training state (safetensors and JSON only), the settings, and the manifest that lists them
    checkpoint = tmp_path / "checkpoints" / "step-000001"
    manifest = json.loads((checkpoint / "manifest.json").read_text())["files"]
    assert set(manifest) == {"state.safetensors", "progress.json", "config.json"}
    assert {p.name for p in checkpoint.iterdir()} == set(manifest) | {"manifest.json"}


# --- accelerate's and diffusers' parts ---------------------------------------------------------------


def test_the_loop_runs_on_accelerate_and_diffusers_parts(
    fresh_prior, pictures, shared_cache, tmp_path, monkeypatch
):
    """Updates go through ``Accelerator.accumulate``/``backward``, the schedule comes from
    ``get_scheduler``, EMA is ``EMAModel``; checkpoints hold no pickle (nothing that can run code)."""
    import diffusers.optimization
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    calls = {"accumulate": 0, "backward": 0, "get_scheduler": 0}

    def spy(owner, name):
        real = getattr(owner, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)

    for name in ("accumulate", "backward"):
        spy(Accelerator, name)
    spy(diffusers.optimization, "get_scheduler")
    config = make_config(pictures, tmp_path, shared_cache, steps=1, gradient_accumulation=2, ema_decay=0.9)
    first = LoraTrainer(fresh_prior(), config)
    first.train()
    assert isinstance(first.ema, EMAModel)
    assert LoraTrainer(fresh_prior(), config).resume() == 1
    assert calls == {"accumulate": 2, "backward": 2, "get_scheduler": 1}
    (checkpoint,) = first.checkpoints()
    assert {p.suffix for p in checkpoint.iterdir()} == {".safetensors", ".json"}


def test_a_diverging_loss_stops_at_its_update_and_keeps_the_last_good_checkpoint(
    fresh_prior, pictures, shared_cache, tmp_path
):
    """learning_rate=1e30 makes the second loss NaN: the run stops there (before that update), saves
    no LoRA under the final name and keeps the checkpoint of the first update."""
    config = make_config(pictures, tmp_path, shared_cache, learning_rate=1e30, checkpoint_every=1)
    trainer = LoraTrainer(fresh_prior(), config)
    with pytest.raises(
        TrainingError, match=r"diverged at update 2 .*step-000001, is kept. Lower learning_rate"
    ):
        trainer.train()
    assert trainer.step == 1 and [p.name for p in trainer.checkpoints()] == ["step-000001"]
    assert not (tmp_path / "lora.safetensors").exists()


def test_a_resume_trains_with_the_schedule_the_config_says(fresh_prior, pictures, shared_cache, tmp_path):
    """A changed learning rate and schedule are honoured on resume (the schedule is rebuilt at the
    checkpoint's step); a checkpoint beyond ``steps`` is refused by name."""
    LoraTrainer(fresh_prior(), make_config(pictures, tmp_path, shared_cache, steps=1)).train()  # 1e-2
    config = make_config(pictures, tmp_path, shared_cache, steps=4, learning_rate=1e-3, lr_scheduler="linear")
    trainer, rates = LoraTrainer(fresh_prior(), config), []
    trainer.train(on_step=lambda step, loss: rates.append(trainer.optimizer.param_groups[0]["lr"]))
    # diffusers' linear decay to 0 over 4 updates, from 1e-3: the rate for the next update
    assert rates == pytest.approx([1e-3 * (4 - step) / 4 for step in (2, 3, 4)])
    with pytest.raises(TrainingError, match=r"step-000004 is at step 4, beyond this run's steps=3"):
        LoraTrainer(fresh_prior(), make_config(pictures, tmp_path, shared_cache, steps=3)).resume()


def test_a_second_run_on_the_same_output_dir_is_refused_by_name(
    fresh_prior, pictures, shared_cache, tmp_path
):
    """The first run holds a lock on its folder: a second one there is refused before it touches
    anything, the first one's checkpoint in progress included."""
    config = make_config(pictures, tmp_path, shared_cache, steps=1)
    in_progress = tmp_path / "checkpoints" / ".step-000001.0123abcd.tmp"
    refusals = []

    def start_a_second_run(step, loss):
        in_progress.mkdir(parents=True)  # as the first run's checkpoint save would be writing it
        with pytest.raises(
            TrainingError, match=f"another training run is writing into {tmp_path}"
        ) as refused:
            LoraTrainer(fresh_prior(), config).train()
        refusals.append(refused.value)
        assert in_progress.is_dir()
        in_progress.rmdir()

    assert LoraTrainer(fresh_prior(), config).train(on_step=start_a_second_run).lora.is_file()
    assert len(refusals) == 1


def test_ema_is_diffusers_ema_with_its_warm_up(fresh_prior, pictures, shared_cache, tmp_path):
    """The saved weights average the trained ones with diffusers' decay min((1+n)/(10+n), ema_decay)."""
    config = make_config(pictures, tmp_path, shared_cache, steps=3, ema_decay=0.5, checkpoint_every=100)
    trainer = LoraTrainer(fresh_prior(), config)
    after_each_update = []
    trainer.train(
        on_step=lambda step, loss: after_each_update.append([p.detach().clone() for p in trainer.trainable])
    )
    expected = after_each_update[0]  # decay 0 at the first update: the weights themselves
    for update, weights in enumerate(after_each_update[1:], start=2):
        decay = min(update / (update + 9), 0.5)
        expected = [decay * e + (1 - decay) * w for e, w in zip(expected, weights, strict=True)]
    for got, want in zip(trainer.ema.shadow_params, expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("keep", [0, 1])
def test_keep_checkpoints_keeps_the_latest_or_all_at_a_constant_rate(
    fresh_prior, pictures, shared_cache, tmp_path, keep
):
    config = make_config(pictures, tmp_path, shared_cache, checkpoint_every=1, keep_checkpoints=keep)
    trainer = LoraTrainer(fresh_prior(), config)
    rates = []
    trainer.train(on_step=lambda step, loss: rates.append(trainer.optimizer.param_groups[0]["lr"]))
    assert [p.name for p in trainer.checkpoints()] == (
        ["step-000003"] if keep else ["step-000001", "step-000002", "step-000003"]
    )
    assert rates == [1e-2] * 3  # the default schedule: constant, no warm-up (the official one)


def test_the_learning_rate_follows_the_cosine_schedule_after_warm_up(
    fresh_prior, pictures, shared_cache, tmp_path
):
    config = make_config(
        pictures, tmp_path, shared_cache, steps=4, lr_scheduler="cosine", warmup_steps=1, checkpoint_every=100
    )
    trainer = LoraTrainer(fresh_prior(), config)
    initial = [p.detach().clone() for p in trainer.prepare() and trainer.trainable]
    rates, moved = [], []

    def record(step, loss):
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        moved.append(any(not torch.equal(p, q) for p, q in zip(trainer.trainable, initial, strict=True)))

    trainer.train(on_step=record)
    # the rate for the next update: warm-up from 0 over 1 update, then half a cosine to 0 over 3
    assert rates == pytest.approx([1e-2 * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in (0, 1, 2, 3)])
    assert moved[0] is False and moved[1] is True  # the first update ran at rate 0


# --- settings, checked when made ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("keep_checkpoints", -1),
        ("new_tokens", [("[rex]", "(dog")]),
        ("new_tokens", ["ab"]),  # a string of two letters is no (token, regex) pair
        ("new_tokens", [5]),
        ("new_tokens", [("", "^dog</w>")]),
        ("new_tokens", "[rex]"),
        ("targets", []),
        ("stage_c", "huge"),
        ("lr_scheduler", "cosine_annealing"),
        ("lr_num_cycles", 0),
        ("lr_power", float("nan")),
        ("warmup_steps", -2),
        ("crop", "top"),
        ("repeats", {"elsewhere": 2}),
        ("min_image_size", -1),
        ("max_image_size", 0),
        ("precision", "fp16"),
        ("dtype", "fp16"),
        ("ema_decay", 1.5),
        ("caption_dropout", 2.0),
        ("learning_rate", float("inf")),
        ("validation_prompts", {"a/b": "a cat"}),
        ("validation_prior_guidance", float("nan")),
        ("validation_decoder_steps", 0),
        ("aspect_ratios", ["1/0"]),
        ("resolution", 100),
        # issue 21: values the config took and training could not use
        ("output_dir", ""),  # the working folder
        ("seed", 2**64),  # beyond torch's generators
        ("seed", -1),  # validation pictures refuse it after the last step
        ("aspect_ratios", ["100/1"]),  # a 32 px (0 px at resolution 256) bucket side
        ("validation_prompts", {"x" * 300: "a cat"}),  # "File name too long" after the last step
    ],
)
def test_a_bad_setting_is_refused_and_named(pictures, tmp_path, option, value):
    with pytest.raises(TrainingError, match=f"^LoraTrainingConfig {option}="):
        make_config(pictures, tmp_path, tmp_path, **{"resolution": 512, option: value})


def test_settings_that_contradict_each_other_or_the_prior_are_refused(
    fresh_prior, pictures, tmp_path, tiny_models
):
    with pytest.raises(TrainingError, match="repeats=.*whole number"):
        make_config(pictures, tmp_path, tmp_path, repeats={str(pictures): -1})
    with pytest.raises(TrainingError, match="^LoraTrainingConfig dtype='bf16': precision='fp32'"):
        make_config(pictures, tmp_path, tmp_path, precision="fp32", dtype="bf16")
    from cascade_helpers.loading import load_prior

    bf16_prior = load_prior(tiny_models, "big", dtype="bf16", device="cpu", image_encoder=False)
    with pytest.raises(
        TrainingError, match="precision='fp32' trains in float32, but the prior was loaded in torch.bfloat16"
    ):
        LoraTrainer(bf16_prior, make_config(pictures, tmp_path, tmp_path, precision="fp32"))


def test_a_config_file_without_a_required_setting_is_named(pictures, tmp_path):
    settings = json.loads(make_config(pictures, tmp_path, tmp_path).save(tmp_path / "run.json").read_text())
    del settings["images"]
    (tmp_path / "no_images.json").write_text(json.dumps(settings))
    with pytest.raises(TrainingError, match=r"no_images\.json: the setting\(s\) \['images'\] are missing"):
        LoraTrainingConfig.load(tmp_path / "no_images.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(TrainingError, match=r"list\.json: the settings must be a JSON object"):
        LoraTrainingConfig.load(tmp_path / "list.json")


def test_a_saved_config_reads_back_and_an_unknown_setting_is_named(pictures, tmp_path):
    config = make_config(
        pictures,
        tmp_path,
        tmp_path,
        resolution=512,
        repeats=[(str(pictures), 2)],
        validation_prompts={"sofa": "x"},
    )
    assert LoraTrainingConfig.load(config.save(tmp_path / "run.json")) == config
    (tmp_path / "bad.json").write_text(json.dumps({"images": "x", "output_dir": "y", "lr": 1}))
    with pytest.raises(TrainingError, match=r"unknown setting\(s\) \['lr'\]"):
        LoraTrainingConfig.load(tmp_path / "bad.json")


# --- the pictures: repeats, sizes, crops ------------------------------------------------------------


def test_repeats_show_a_folders_pictures_more_often(fresh_prior, pictures, shared_cache, tmp_path):
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(pictures / "chelsea_face.png", extra / "extra_face.png")
    (extra / "extra_face.txt").write_text("a close-up photo of [chelsea]")
    config = make_config(
        pictures,
        tmp_path,
        shared_cache,
        images=[str(pictures), str(extra)],
        repeats={str(extra): 2},
        batch_size=1,
    )
    trainer = LoraTrainer(fresh_prior(), config)
    trainer.prepare()
    epoch = list(itertools.islice(trainer._batches(), 5))  # 1 + 1 + (1 + 2) pictures per epoch
    seen = collections.Counter(trainer.images[i].path.name for (i,) in epoch)
    assert seen == {"chelsea_face.png": 1, "chelsea_mirrored.png": 1, "extra_face.png": 3}


def test_small_pictures_are_skipped_by_name_and_large_ones_scaled_down(tmp_path):
    PIL.Image.new("RGB", (40, 30)).save(tmp_path / "tiny_cat.png")
    PIL.Image.new("RGB", (200, 100)).save(tmp_path / "wide_cat.png")
    with pytest.warns(UserWarning, match=r"tiny_cat\.png \(40×30\)"):
        found = find_training_images(tmp_path, min_image_size=64)
    assert [i.path.name for i in found] == ["wide_cat.png"]
    with pytest.raises(TrainingError, match="no pictures at least 300 px"), pytest.warns(UserWarning):
        find_training_images(tmp_path, min_image_size=300)
    assert _read_picture(tmp_path / "wide_cat.png", max_side=50).shape == (3, 50, 100)
    assert _read_picture(tmp_path / "wide_cat.png", max_side=500).shape == (3, 100, 200)


@pytest.mark.parametrize(("height", "width"), [(101, 333), (333, 101), (77, 77), (50, 300), (299, 300)])
def test_the_size_from_the_header_is_the_size_read_picture_gives(tmp_path, height, width):
    PIL.Image.new("RGB", (width, height)).save(tmp_path / "cat.png")
    (image,) = find_training_images(tmp_path)
    assert image.size == (height, width)
    for max_side in (None, 50, 64, 100, 500):
        decoded = _read_picture(tmp_path / "cat.png", max_side).shape[-2:]
        assert _scaled_size(*image.size, max_side) == tuple(decoded), max_side


def test_a_phone_portrait_gets_a_portrait_bucket(tmp_path):
    """EXIF orientation 6 (a phone held upright): stored 60 wide, 40 high, shown 40 wide, 60 high."""
    exif = PIL.Image.Exif()
    exif[PIL.ExifTags.Base.Orientation] = 6
    PIL.Image.new("RGB", (60, 40)).save(tmp_path / "portrait.jpg", exif=exif)
    (image,) = find_training_images(tmp_path)
    assert image.size == (60, 40)  # (height, width) as shown
    assert closest_bucket(*image.size, bucket_sizes(1024, ["1/1", "2/3"])) == (928, 608)  # portrait


def test_a_cached_picture_is_not_decoded_again(fresh_prior, pictures, tmp_path, monkeypatch):
    from cascade_helpers.lora_training import data

    config = make_config(pictures, tmp_path / "a", tmp_path / "cache", max_image_size=64)
    assert LoraTrainer(fresh_prior(), config).prepare().latents_computed == 2
    decode = mock.Mock(wraps=data.image_to_tensor)
    monkeypatch.setattr(data, "image_to_tensor", decode)
    config = make_config(pictures, tmp_path / "b", tmp_path / "cache", max_image_size=64)
    second = LoraTrainer(fresh_prior(), config)
    assert second.prepare().latents_cached == 2
    assert decode.call_count == 0
    assert {item.bucket for item in second.items} == {(192, 192)}


def test_a_cache_entry_keyed_without_crop_and_size_is_not_read(fresh_prior, pictures, tmp_path):
    """Crop and maximum size change the latents: they are always part of the key, the defaults too."""
    import hashlib

    from safetensors.torch import save_file

    from cascade_helpers.lora_training.cache import _cache_file, _fingerprint

    prior, config = fresh_prior(), make_config(pictures, tmp_path, tmp_path, aspect_ratios=["1/1"])
    images = find_training_images(pictures)[:1]
    digest = hashlib.sha1(images[0].path.read_bytes()).hexdigest()
    keyless = _cache_file(tmp_path / "latents", digest, str((192, 192)), _fingerprint(prior.effnet), "-")
    keyless.parent.mkdir()
    save_file({"latents": torch.zeros(16, 6, 6)}, str(keyless))
    report = CacheReport()
    (item,) = _cache_images(prior, images, config, tmp_path, report)
    assert (report.latents_computed, report.latents_cached) == (1, 0)
    assert item.latents.abs().sum() > 0


def test_a_random_crop_is_a_window_of_the_scaled_picture_chosen_once_per_picture():
    picture = torch.rand(3, 10, 20)
    torch.testing.assert_close(resize_and_crop(picture, 10, 10, (0.0, 0.0)), picture[:, :, :10])
    torch.testing.assert_close(resize_and_crop(picture, 10, 10, (0.0, 1.0)), picture[:, :, 10:])
    torch.testing.assert_close(resize_and_crop(picture, 10, 10, (0.0, 0.5)), resize_and_crop(picture, 10, 10))
    assert _crop_position("center", b"picture", 0) is None
    position = _crop_position("random", b"picture", 0)
    assert position == _crop_position("random", b"picture", 0) != _crop_position("random", b"picture", 1)
    assert all(0 <= v <= 1 for v in position)


def test_random_crops_change_the_cached_latents(fresh_prior, tmp_path):
    folder = write_example_images(tmp_path / "pictures")  # landscape and portrait shots: crops differ
    prior = fresh_prior()
    images = [i for i in find_training_images(folder) if i.path.stem == "chelsea_sofa"]  # 451 × 300
    report, cache = CacheReport(), tmp_path / "cache"
    centre = _cache_images(
        prior, images, make_config(folder, tmp_path, cache, aspect_ratios=["1/1"]), cache, report
    )
    config = make_config(folder, tmp_path, cache, aspect_ratios=["1/1"], crop="random", seed=3)
    random = _cache_images(prior, images, config, cache, report)
    assert (report.latents_computed, report.latents_cached) == (2, 0)  # its own cache entry
    assert not torch.equal(centre[0].latents, random[0].latents)


# --- validation --------------------------------------------------------------------------------------


def test_validation_uses_its_negative_prompt_guidance_steps_and_prompt_names(
    fresh_prior, pictures, shared_cache, tmp_path, monkeypatch
):
    from cascade_helpers.lora_training import validation

    library = {"sofa": "a photo of [chelsea] on a sofa", "grass": "a photo of [chelsea] on the grass"}
    config = make_config(
        pictures, tmp_path, shared_cache, resolution=512, validation_prompts=library, validation_negative_prompt="blurry",
        validation_prior_steps=1, validation_prior_guidance=3.0, validation_decoder_steps=2, validation_decoder_guidance=0.5,
    )  # fmt: skip
    trainer = LoraTrainer(fresh_prior(), config)  # no LoRA needed to check what validation passes on
    seen = []
    real = validation.generate_stage_c
    monkeypatch.setattr(
        validation, "generate_stage_c", lambda *args, **kw: seen.append(args) or real(*args, **kw)
    )
    pictures_made = trainer.validate()
    assert len(pictures_made) == 2 and all(p.size == (96, 96) for p in pictures_made)  # the previewer's
    negative, settings = seen[0][2], seen[0][4]
    torch.testing.assert_close(negative.hidden, encode_text(trainer.prior, "blurry").hidden)
    assert (settings.steps, settings.guidance) == (1, 3.0)
    names = {p.name for p in (tmp_path / "validation").iterdir()}
    assert names == {"step-000000.png", "step-000000-sofa.png", "step-000000-grass.png"}

    decoded = []

    def text_to_image(prior, decoder, prompt, negative, **options):
        decoded.append((prompt, negative, options))
        return types.SimpleNamespace(images=[PIL.Image.new("RGB", (8, 8))])

    monkeypatch.setattr(validation, "text_to_image", text_to_image)
    trainer.decoder = object()
    trainer.validate()
    prompt, negative, options = decoded[1]
    assert (prompt, negative) == (library["grass"], "blurry")
    assert (options["decoder_settings"].steps, options["decoder_settings"].guidance) == (2, 0.5)
    assert (options["prior_settings"].steps, options["prior_settings"].guidance) == (1, 3.0)
