"""LoRA formats: the official one reproduces the official model, ComfyUI/kohya and ours round-trip,
bad input fails clearly.

``fixtures/official_lora_tiny.json`` was recorded with the official modules (``modules/lora.py``:
``apply_lora(filters=['.attn'], rank=4)``, the ``LoRA`` modules collected in ``generator.modules()``
order and loaded from the state dict below; the token insertion of ``train/train_c_lora.py`` and
``ReToken``, its width set to the tiny 32) on the official tiny Stage C loaded with the weights of
``tests.recorded_weights.official_weights``, for the inputs built here.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cascade_helpers import files
from cascade_helpers.checkpoints import _official_shapes
from cascade_helpers.loading import _load_unet, load_prior
from cascade_helpers.lora.adapters import LoraError, _lora_factors, inject_lora, set_lora_strength
from cascade_helpers.lora.formats import (
    _comfyui_state_dict,
    _official_factors,
    _official_lora_layout,
    _save_comfyui,
    _save_lora,
)
from cascade_helpers.lora.load import load_comfyui_embedding, load_lora
from cascade_helpers.tiny import _write_text_encoder, _write_tokenizer
from tests.recorded_weights import official_weights, seeded_inputs

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "official_lora_tiny.json").read_text())
WIDTH = 32
NEW_TOKENS = [("[fernando]", "^dog</w>")]


def official_lora(token_ids: list[int], blocks: int = 8, width: int = WIDTH, rank: int = 4) -> dict:
    """The LoRA the fixture was recorded with: per attention block the out_proj factors, then the
    stacked q/k/v in_proj factors (3·width rows), in the official order."""
    generator = torch.Generator().manual_seed(1234)
    state = {}
    for b in range(blocks):
        for j, rows in enumerate((width, 3 * width)):
            state[f"weights.{2 * b + j}.lora_down"] = torch.randn(rank, width, generator=generator) * 0.1
            state[f"weights.{2 * b + j}.lora_up"] = torch.randn(rows, rank, generator=generator)
    state["embeddings.embeddings"] = torch.randn(len(token_ids), WIDTH, generator=generator) * 0.1
    state["embeddings.indices"] = torch.tensor(token_ids)
    return state


@pytest.fixture
def official_unet(tmp_path):
    path = tmp_path / "stage_c.safetensors"
    save_file(official_weights(_official_shapes("stage_c", "tiny")), str(path))
    return _load_unet(path, "stage_c", "tiny", torch.float32)


@pytest.fixture
def text_side(tmp_path):
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(_write_tokenizer(tmp_path))
    encoder = CLIPTextModelWithProjection.from_pretrained(_write_text_encoder(tmp_path, "fp32", seed=5))
    return encoder.eval(), tokenizer


def _prior(unet, text_side) -> types.SimpleNamespace:
    """The parts of a prior ``load_lora`` uses, around the official UNet and the tiny text side."""
    encoder, tokenizer = text_side
    return types.SimpleNamespace(unet=unet, text_encoder=encoder, tokenizer=tokenizer)


def _fixture_lora(tokenizer) -> dict:
    # [fernando] (new: id = vocabulary size) and the existing dogs</w>, as train_tokens
    # [['[fernando]', '^dog</w>'], ['^dogs</w>', None]] give them
    return official_lora([len(tokenizer), tokenizer.convert_tokens_to_ids("dogs</w>")])


def _unet_inputs():
    x, clip_text, clip_pooled, clip_img = seeded_inputs(
        200, (2, 16, 6, 6), (2, 77, 32), (2, 1, 32), (2, 1, 24)
    )
    return (
        x,
        torch.tensor([0.9, 0.3]),
        dict(clip_text_pooled=clip_pooled, clip_text=clip_text, clip_img=clip_img),
    )


@torch.no_grad()
def _run(unet) -> torch.Tensor:
    x, r, cond = _unet_inputs()
    return unet(x, r, **cond).sample


@torch.no_grad()
def _encode(encoder, tokenizer, prompts):
    tokens = tokenizer(prompts, truncation=True, padding="max_length", max_length=77, return_tensors="pt")
    output = encoder(**tokens, output_hidden_states=True)
    return tokens.input_ids, output.hidden_states[-1], output.text_embeds


def test_the_official_order_is_out_proj_then_in_proj_per_block(official_unet):
    layout = _official_lora_layout(official_unet)
    assert len(layout) == 16  # 8 attention blocks in the tiny Stage C
    assert layout[:3] == [
        ("down_blocks.0.2.attention.to_out.0",),
        (
            "down_blocks.0.2.attention.to_q",
            "down_blocks.0.2.attention.to_k",
            "down_blocks.0.2.attention.to_v",
        ),
        ("down_blocks.0.5.attention.to_out.0",),
    ]
    assert layout[-1][0] == "up_blocks.1.5.attention.to_q"


def test_official_lora_reproduces_the_official_model(official_unet, text_side):
    encoder, tokenizer = text_side
    lora = _fixture_lora(tokenizer)
    without = _run(official_unet)
    load_lora(_prior(official_unet, text_side), lora, new_tokens=NEW_TOKENS)

    out = _run(official_unet)
    expected = torch.tensor(FIXTURE["unet_output"]).reshape(out.shape)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert (without - expected).abs().max() > 0.1  # the LoRA does change the output

    ids, hidden, pooled = _encode(encoder, tokenizer, FIXTURE["prompts"])
    assert (
        ids[:, :10].tolist() == FIXTURE["input_ids"]
    )  # [fernando] is one new token, id = old vocabulary size
    torch.testing.assert_close(hidden[:, :10].flatten(), torch.tensor(FIXTURE["hidden_first_10"]))
    torch.testing.assert_close(pooled.flatten(), torch.tensor(FIXTURE["pooled"]))


def test_strength_scales_the_lora(official_unet, text_side):
    encoder, tokenizer = text_side
    base = _run(official_unet)
    load_lora(_prior(official_unet, text_side), _fixture_lora(tokenizer), new_tokens=NEW_TOKENS)
    full = _run(official_unet)
    set_lora_strength(official_unet, 0.0)
    torch.testing.assert_close(_run(official_unet), base)
    set_lora_strength(official_unet, 0.5)
    half = _run(official_unet)
    assert 0 < (half - base).abs().max() < (full - base).abs().max()


def test_a_lora_for_another_size_is_refused_clearly(official_unet, text_side):
    big = {f"weights.{i}.lora_down": torch.zeros(4, 2048) for i in range(128)}
    big |= {f"weights.{i}.lora_up": torch.zeros(2048 * (1 + i % 2 * 2), 4) for i in range(128)}
    with pytest.raises(LoraError, match="made for Stage C big .* loaded model is Stage C tiny"):
        load_lora(_prior(official_unet, text_side), big)


def test_the_official_example_lora_does_not_load_into_lite():
    """LORA_FERNANDO is for the big Stage C: the lite one (built empty, no weights) refuses it."""
    from accelerate import init_empty_weights

    from cascade_helpers.checkpoints import config_dir
    from cascade_helpers.upstream import StableCascadeUNet

    with init_empty_weights():
        lite = StableCascadeUNet.from_config(StableCascadeUNet.load_config(config_dir("stage_c", "lite")))
    layout = _official_lora_layout(lite)
    assert len(layout) == 64
    fernando_shapes = {f"weights.{i}.lora_down": torch.zeros(4, 2048) for i in range(128)}
    fernando_shapes |= {
        f"weights.{i}.lora_up": torch.zeros(2048 * (3 if i % 2 else 1), 4) for i in range(128)
    }
    with pytest.raises(LoraError, match="128 layers of width 2048 .* 32 attention blocks of width 1536"):
        _official_factors(lite, fernando_shapes)  # load_lora refuses the empty ("meta") weights first


def test_a_missing_new_token_is_a_clear_error(official_unet, text_side):
    tokenizer = text_side[1]
    with pytest.raises(LoraError, match=r"new_tokens=\[\('\[fernando\]', '\^dog</w>'\)\]"):
        load_lora(_prior(official_unet, text_side), _fixture_lora(tokenizer))
    with pytest.raises(LoraError, match="1280 wide"):
        lora = _fixture_lora(tokenizer) | {"embeddings.embeddings": torch.zeros(2, 1280)}
        load_lora(_prior(official_unet, text_side), lora, new_tokens=NEW_TOKENS)


def test_comfyui_keys_hold_the_official_factors(official_unet, text_side):
    """ComfyUI computes W + alpha / rank · up @ down per module; with our export that equals the
    official in_proj / out_proj weight with its LoRA merged (W + up @ down / rank), third by third."""
    lora = _fixture_lora(text_side[1])
    load_lora(_prior(official_unet, text_side), lora, new_tokens=NEW_TOKENS)
    comfy = _comfyui_state_dict(_lora_factors(official_unet))
    assert len(comfy) == 8 * 4 * 3  # 8 blocks × (q, k, v, out) × (down, up, alpha)
    official = official_weights(_official_shapes("stage_c", "tiny"))
    in_proj = official["down_blocks.0.2.attention.attn.in_proj_weight"]
    merged = in_proj + lora["weights.1.lora_up"] @ lora["weights.1.lora_down"] / 4
    for third, p in enumerate("qkv"):
        base = f"lora_prior_unet_down_blocks_0_2_attention_attn_to_{p}"
        delta = comfy[f"{base}.alpha"] / comfy[f"{base}.lora_down.weight"].shape[0]
        delta = delta * comfy[f"{base}.lora_up.weight"] @ comfy[f"{base}.lora_down.weight"]
        torch.testing.assert_close(
            in_proj[third * WIDTH : (third + 1) * WIDTH] + delta, merged[third * WIDTH : (third + 1) * WIDTH]
        )
    out = "lora_prior_unet_down_blocks_0_2_attention_attn_out_proj"
    torch.testing.assert_close(comfy[f"{out}.lora_up.weight"], lora["weights.0.lora_up"])
    torch.testing.assert_close(comfy[f"{out}.lora_down.weight"], lora["weights.0.lora_down"])


@pytest.fixture
def fresh_prior(tiny_models):
    return lambda: load_prior(
        tiny_models, "big", dtype="fp32", device="cpu", image_encoder=False, effnet=False, previewer=False
    )


def _prior_outputs(prior, prompt="a photo of [fernando]"):
    ids, hidden, pooled = _encode(prior.text_encoder, prior.tokenizer, [prompt])
    x, r, cond = _unet_inputs()
    with torch.no_grad():
        out = prior.unet(
            x[:1], r[:1], clip_text_pooled=pooled[:, None], clip_text=hidden, clip_img=cond["clip_img"][:1]
        ).sample
    return ids, out


@pytest.mark.parametrize("prefix", ["lora_prior_unet_", "lora_unet_"])
def test_comfyui_and_kohya_files_load_back_to_the_same_model(fresh_prior, tmp_path, prefix):
    source = fresh_prior()
    lora = official_lora([len(source.tokenizer)])
    load_lora(source, lora, new_tokens=NEW_TOKENS)
    row = source.text_encoder.get_input_embeddings().weight[-1].detach()
    written = _save_comfyui(
        tmp_path / "comfy.safetensors", _lora_factors(source.unet), {"[fernando]": row}, prefix
    )
    assert written[1].name == "fernando.safetensors" and load_file(written[1])["clip_g"].shape == (1, WIDTH)
    assert all(k.startswith(prefix) for k in load_file(written[0]))

    target = fresh_prior()
    info = load_lora(target, written[0])
    assert info.format == "comfyui" and info.unet_modules == 32
    load_comfyui_embedding(target, written[1], "[fernando]")
    ids_a, out_a = _prior_outputs(source)
    ids_b, out_b = _prior_outputs(target)
    assert ids_a.tolist() == ids_b.tolist()
    torch.testing.assert_close(out_a, out_b)


def test_our_format_round_trips_with_its_tokens(fresh_prior, tmp_path):
    source = fresh_prior()
    load_lora(source, official_lora([len(source.tokenizer)]), new_tokens=NEW_TOKENS)
    row = source.text_encoder.get_input_embeddings().weight[-1].detach()
    path = _save_lora(tmp_path / "ours.safetensors", _lora_factors(source.unet), {"[fernando]": row})
    target = fresh_prior()
    info = load_lora(target, path, strength=1.0)
    assert (info.format, info.tokens) == ("cascade_helpers", ("[fernando]",))
    ids_a, out_a = _prior_outputs(source)
    ids_b, out_b = _prior_outputs(target)
    assert ids_a.tolist() == ids_b.tolist()
    torch.testing.assert_close(out_a, out_b)
    with pytest.raises(LoraError, match="already carries a LoRA"):
        load_lora(target, path)


def test_text_encoder_entries_of_a_comfyui_file_are_applied(fresh_prior):
    """A ComfyUI text-encoder entry changes q_proj by alpha / rank · up @ down (merged by hand here)."""
    prior = fresh_prior()
    generator = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, WIDTH, generator=generator), torch.randn(WIDTH, 2, generator=generator)
    key = "lora_prior_te_text_model_encoder_layers_0_self_attn_q_proj"
    attention = prior.text_encoder.text_model.encoder.layers[0].self_attn
    weight, bias = attention.q_proj.weight.detach().clone(), attention.q_proj.bias.detach().clone()
    info = load_lora(
        prior,
        {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(0.5)},
    )
    assert info.text_encoder_modules == 1
    x = torch.randn(3, WIDTH, generator=generator)
    merged = weight + 0.5 / 2 * up @ down
    torch.testing.assert_close(attention.q_proj(x), torch.nn.functional.linear(x, merged, bias))


def test_foreign_and_damaged_files_are_named(fresh_prior, tmp_path):
    prior = fresh_prior()
    sdxl = {
        "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 32),
        "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(32, 4),
    }
    with pytest.raises(LoraError, match="made for another model"):
        load_lora(prior, sdxl)
    bigger = {
        "lora_prior_unet_down_blocks_1_40_attention_attn_to_q.lora_down.weight": torch.zeros(4, 32),
        "lora_prior_unet_down_blocks_1_40_attention_attn_to_q.lora_up.weight": torch.zeros(32, 4),
    }
    with pytest.raises(LoraError, match="Stage C of another size"):
        load_lora(prior, bigger)
    with pytest.raises(LoraError, match="LoHa"):
        load_lora(prior, {"lora_prior_unet_clf_1.hada_w1_a": torch.zeros(1)})
    with pytest.raises(LoraError, match="not a Stable Cascade LoRA"):
        load_lora(prior, {"something.else": torch.zeros(1)})

    path = tmp_path / "cut.safetensors"
    save_file(official_lora([1000]), str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(LoraError, match="incomplete.*cut short"):
        load_lora(prior, path)
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(LoraError, match="safetensors"):
        load_lora(prior, tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="download_models.sh lora"):
        load_lora(prior, tmp_path / files.LORA_FERNANDO.path)


def test_the_tiny_writer_makes_an_official_lora_for_the_tiny_stage_c(fresh_prior, tmp_path):
    from cascade_helpers.tiny import _write_official_lora

    _write_tokenizer(tmp_path)
    path = _write_official_lora(tmp_path)
    assert path.name == files.LORA_FERNANDO.name
    state = load_file(path)
    prior = fresh_prior()
    assert state["embeddings.indices"].tolist() == [len(prior.tokenizer)]
    info = load_lora(prior, path, new_tokens=NEW_TOKENS)
    assert (info.format, info.unet_modules, info.tokens) == ("official", 32, ("[fernando]",))


def test_factors_keep_their_own_rank_and_alpha(fresh_prior):
    prior = fresh_prior()
    name = "down_blocks.0.2.attention.to_q"
    load_lora(
        prior,
        {
            f"unet.{name}.lora_A.weight": torch.ones(2, WIDTH),
            f"unet.{name}.lora_B.weight": torch.ones(WIDTH, 2),
            f"unet.{name}.alpha": torch.tensor(8.0),
        },
    )
    (back,) = _lora_factors(prior.unet).values()
    assert (back.rank, back.alpha) == (2, 8.0)


@pytest.mark.parametrize("to_disk", [False, True], ids=["group_offload", "disk_offload"])
def test_a_group_offloaded_prior_is_refused_before_anything_changes(fresh_prior, tmp_path, to_disk):
    """memory='group_offload' / 'disk_offload' (diffusers' group offloading, here onto the CPU): its hooks
    move the weights they found at load, so a LoRA's would be left behind; refused by name, for
    loading a LoRA file and for a fresh one (training)."""
    from cascade_helpers.devices import _group_offload
    from cascade_helpers.tiny import _write_official_lora

    _write_tokenizer(tmp_path)
    path = _write_official_lora(tmp_path)
    prior = fresh_prior()
    vocabulary = len(prior.tokenizer)
    _group_offload(prior.unet, torch.device("cpu"), to_disk=to_disk)
    with pytest.raises(LoraError, match="group_offload' or 'disk_offload'.*model_offload"):
        load_lora(prior, path, new_tokens=NEW_TOKENS)
    with pytest.raises(LoraError, match="group_offload"):
        inject_lora(prior.unet)
    assert len(prior.tokenizer) == vocabulary and not _lora_factors(prior.unet)


def test_a_sequentially_offloaded_prior_is_refused_before_anything_changes(fresh_prior, tmp_path):
    """memory='sequential_offload' leaves the weights on 'meta' and streams them in (accelerate's
    cpu_offload, here with the CPU as execution device): LoRA layers and new tokens cannot join."""
    from accelerate import cpu_offload

    from cascade_helpers.tiny import _write_official_lora

    _write_tokenizer(tmp_path)
    path = _write_official_lora(tmp_path)
    prior = fresh_prior()
    vocabulary = len(prior.tokenizer)
    for model in (prior.unet, prior.text_encoder):
        cpu_offload(model, execution_device=torch.device("cpu"))
    with pytest.raises(LoraError, match="sequential_offload.*model_offload"):
        load_lora(prior, path, new_tokens=NEW_TOKENS)
    assert len(prior.tokenizer) == vocabulary and not _lora_factors(prior.unet)
