"""Hostile input to LoRA loading: every bad file, token or strength is refused with a message naming
it, and leaves the prior exactly as it was — no LoRA layers, the same tokenizer and embedding — so
the correct retry works. One prior serves every refusal below: any change a failed load left
behind shows up in the next check.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from cascade_helpers.loading import load_prior
from cascade_helpers.lora.adapters import LoraError, _lora_factors, set_lora_strength
from cascade_helpers.lora.formats import _comfyui_state_dict, _official_factors, _save_lora
from cascade_helpers.lora.load import load_comfyui_embedding, load_lora
from cascade_helpers.tiny import _write_official_lora, _write_tokenizer

FERNANDO = [("[fernando]", "^dog</w>")]
NAN = float("nan")


def _fresh(tiny_models):
    return load_prior(
        tiny_models, "big", dtype="fp32", device="cpu", image_encoder=False, effnet=False, previewer=False
    )


@pytest.fixture(scope="module")
def prior(tiny_models):
    return _fresh(tiny_models)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    _write_tokenizer(folder)
    return load_file(_write_official_lora(folder))


@pytest.fixture(scope="module")
def ours(tmp_path_factory, tiny_models, official):
    """Our format of the same LoRA, with its token: factors and row read off a loaded prior."""
    source = _fresh(tiny_models)
    load_lora(source, official, new_tokens=FERNANDO)
    row = source.text_encoder.get_input_embeddings().weight[-1].detach().clone()
    path = _save_lora(
        tmp_path_factory.mktemp("ours") / "ours.safetensors", _lora_factors(source.unet), {"[fernando]": row}
    )
    return load_file(path), {"format": "cascade_helpers.lora", "tokens": json.dumps(["[fernando]"])}


def _state(prior) -> tuple:
    from peft.tuners.lora import LoraLayer

    layers = sum(isinstance(m, LoraLayer) for m in (*prior.unet.modules(), *prior.text_encoder.modules()))
    embedding = prior.text_encoder.get_input_embeddings().weight.detach().clone()
    return layers, len(prior.tokenizer), prior.tokenizer.tokenize("a category of [fernando]"), embedding


def _assert_unchanged(prior, before: tuple) -> None:
    after = _state(prior)
    assert after[:3] == before[:3], "a failed load changed the prior"
    assert torch.equal(after[3], before[3])


def _our_file(ours, tmp_path, tensors=None, metadata=None):
    state, meta = ours
    path = tmp_path / "lora.safetensors"
    save_file({**state, **(tensors or {})}, str(path), metadata={**meta, **(metadata or {})})
    return path


def _comfy_with_bad_text_encoder_entry(prior, official):
    """Valid UNet entries (those of the official LoRA, as ComfyUI keys) and one text-encoder entry of
    the wrong width: the second half of the load fails after the first half could have changed things."""
    state = _comfyui_state_dict(_official_factors(prior.unet, official))
    key = "lora_prior_te_text_model_encoder_layers_0_self_attn_q_proj"
    state |= {f"{key}.lora_down.weight": torch.zeros(2, 7), f"{key}.lora_up.weight": torch.zeros(32, 2)}
    return state


BAD_LOADS = [
    # official files: the tokens the caller gives
    ("existing word as token", lambda p, o, u, t: load_lora(p, o, new_tokens=[("cat", "^dog</w>")]),
     "the new token 'cat' is already a word of the tokenizer.*allow_existing_tokens=True"),
    ("invalid regex", lambda p, o, u, t: load_lora(p, o, new_tokens=[("[fernando]", "^dog(")]),
     r"the regex '\^dog\(' of the new token '\[fernando\]' is not valid"),
    ("token without regex", lambda p, o, u, t: load_lora(p, o, new_tokens=["[fernando]"]),
     r"new_tokens entries are \(token, regex\) pairs .* not '\[fernando\]'"),
    ("token twice", lambda p, o, u, t: load_lora(p, o, new_tokens=FERNANDO * 2),
     r"the new token '\[fernando\]' is given twice"),
    ("token not a string", lambda p, o, u, t: load_lora(p, o, new_tokens=[(3, None)]),
     "a new token must be a non-empty string .* not 3"),
    ("no new_tokens", lambda p, o, u, t: load_lora(p, o),
     r"beyond this tokenizer's .* new_tokens=\[\('\[fernando\]', '\^dog</w>'\)\]"),
    # official files: damaged contents
    ("deltas for too few ids", lambda p, o, u, t: load_lora(p, o | {"embeddings.indices": torch.tensor([0, 1])}, new_tokens=FERNANDO),
     r"names 2 token ids but holds \(1, 32\) embedding deltas: the file is damaged"),
    ("NaN deltas", lambda p, o, u, t: load_lora(p, o | {"embeddings.embeddings": torch.full((1, 32), NAN)}, new_tokens=FERNANDO),
     "token embedding deltas hold NaN"),
    ("negative token id", lambda p, o, u, t: load_lora(p, o | {"embeddings.indices": torch.tensor([-3])}, new_tokens=FERNANDO),
     r"trained token id\(s\) \[-3\]"),
    ("cut official file", lambda p, o, u, t: load_lora(p, _first_layers(o, 10), new_tokens=FERNANDO),
     r"holds 10 layers, Stage C tiny \(width 32\) needs 16 .*cut short"),
    ("NaN factors", lambda p, o, u, t: load_lora(p, o | {"weights.3.lora_up": torch.full_like(o["weights.3.lora_up"], NAN)}, new_tokens=FERNANDO),
     "factors for .* hold NaN or infinite values: the file is damaged"),
    # strengths
    ("NaN strength", lambda p, o, u, t: load_lora(p, o, new_tokens=FERNANDO, strength=NAN),
     "strength must be a finite number .*not nan"),
    ("infinite strength", lambda p, o, u, t: load_lora(p, o, new_tokens=FERNANDO, strength=float("inf")),
     "strength must be a finite number"),
    ("string strength", lambda p, o, u, t: load_lora(p, o, new_tokens=FERNANDO, strength="1"),
     "strength must be a finite number .*not '1'"),
    ("set_lora_strength NaN", lambda p, o, u, t: set_lora_strength(p, NAN), "strength must be a finite number"),
    # our format
    ("our token is an existing word", lambda p, o, u, t: load_lora(p, _our_file(u, t, metadata={"tokens": '["cat"]'})),
     "the new token 'cat' is already a word"),
    ("our token names vs rows", lambda p, o, u, t: load_lora(p, _our_file(u, t, metadata={"tokens": '["[a]", "[b]"]'})),
     "names the tokens .* but it holds 1 token embeddings: it is damaged"),
    ("our token metadata not JSON", lambda p, o, u, t: load_lora(p, _our_file(u, t, metadata={"tokens": "[fernando"})),
     "it is damaged"),
    ("our token width", lambda p, o, u, t: load_lora(p, _our_file(u, t, {"tokens.embeddings": torch.zeros(1, 1280)})),
     "token embeddings are 1280 wide, this text encoder's are 32"),
    ("our NaN token row", lambda p, o, u, t: load_lora(p, _our_file(u, t, {"tokens.embeddings": torch.full((1, 32), NAN)})),
     "token embeddings hold NaN"),
    ("new_tokens for our format", lambda p, o, u, t: load_lora(p, _our_file(u, t), new_tokens=FERNANDO),
     "new_tokens is for official-format files"),
    ("our factors of two ranks", lambda p, o, u, t: load_lora(p, _our_file(u, t, _wider_up(u))),
     r"factors for down_blocks\.0\.2\.attention\.to_k have ranks 4 and 5: damaged"),
    # ComfyUI: the text-encoder half fails after the UNet half
    ("comfy text-encoder entry of another width", lambda p, o, u, t: load_lora(p, _comfy_with_bad_text_encoder_entry(p, o)),
     "maps 7 → 32 features, the module 32 → 32"),
    ("embedding for an existing word", lambda p, o, u, t: load_comfyui_embedding(p, _our_embedding(t), "dog"),
     "the new token 'dog' is already a word"),
]  # fmt: skip


def _first_layers(official, count):
    """An official file cut after its first ``count`` layers (an interrupted copy, say)."""
    index = {k: re.match(r"weights\.(\d+)\.", k) for k in official}
    return {k: v for k, v in official.items() if not index[k] or int(index[k].group(1)) < count}


def _wider_up(ours):
    """One module's up factor with a column more than its down factor has rows (issue 21: this was
    named as a LoRA "made for Stage C tiny (width 32)" on a Stage C tiny of width 32)."""
    key = next(k for k in ours[0] if k.endswith(".lora_B.weight"))
    return {key: torch.zeros(ours[0][key].shape[0], ours[0][key].shape[1] + 1)}


def _our_embedding(tmp_path):
    path = tmp_path / "dog.safetensors"
    save_file({"clip_g": torch.zeros(1, 32)}, str(path))
    return path


@pytest.mark.parametrize(("call", "message"), [c[1:] for c in BAD_LOADS], ids=[c[0] for c in BAD_LOADS])
def test_a_bad_lora_is_refused_and_leaves_the_prior_as_it_was(prior, official, ours, tmp_path, call, message):
    before = _state(prior)
    with pytest.raises((LoraError, ValueError), match=message):
        call(prior, official, ours, tmp_path)
    _assert_unchanged(prior, before)


def test_a_failure_midway_is_undone_and_the_retry_works(tiny_models, official, monkeypatch):
    """An error after the UNet got its LoRA layers and the text encoder its new row (here the device
    running out of memory while the token rows are added): everything is taken off again."""
    import cascade_helpers.lora.load as load

    prior = _fresh(tiny_models)
    before = _state(prior)
    real = load._append_token_rows

    def out_of_memory(text_encoder, rows):
        real(text_encoder, rows)
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(load, "_append_token_rows", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        load_lora(prior, official, new_tokens=FERNANDO)
    _assert_unchanged(prior, before)

    monkeypatch.undo()
    info = load_lora(prior, official, new_tokens=FERNANDO)  # was "already carries a LoRA"
    reference = _fresh(tiny_models)
    load_lora(reference, official, new_tokens=FERNANDO)
    assert info.unet_modules == 32 and prior.tokenizer.tokenize("[fernando]") == ["[fernando]"]
    for a, b in zip(prior.unet.state_dict().values(), reference.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(
        prior.text_encoder.get_input_embeddings().weight, reference.text_encoder.get_input_embeddings().weight
    )


def test_the_correct_retry_after_refusals_works(prior, official):
    """The shared prior went through every refusal above; the right call still works on it."""
    info = load_lora(prior, official, new_tokens=FERNANDO)
    assert (info.unet_modules, info.tokens) == (32, ("[fernando]",))
    assert prior.tokenizer.tokenize("a cat") == ["a</w>", "cat</w>"]


def test_taking_over_an_existing_word_needs_the_keyword(tiny_models, ours, tmp_path):
    prior = _fresh(tiny_models)
    info = load_lora(
        prior, _our_file(ours, tmp_path, metadata={"tokens": '["cat"]'}), allow_existing_tokens=True
    )
    assert info.tokens == ("cat",)
    assert prior.tokenizer.tokenize("cat")[0] == "cat"  # the added token, no longer the word cat</w>


def test_a_load_checks_each_thing_once(tiny_models, official, ours, tmp_path, monkeypatch):
    """``load_lora`` checks everything before it changes anything, then applies without checking the
    same factors (a pass over every weight) and tokens again."""
    import collections

    from cascade_helpers.lora import load, tokens

    calls = collections.Counter()

    def counted(module, name):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: calls.update([name]) or real(*a, **k))

    for module, names in (
        (load, ("_check_factors", "_check_token_rows")),
        (tokens, ("_check_new_tokens", "_check_token_rows")),
    ):
        for name in names:
            counted(module, name)
    load_lora(_fresh(tiny_models), official, new_tokens=FERNANDO)
    assert calls == {"_check_factors": 1, "_check_new_tokens": 1, "_check_token_rows": 1}
    calls.clear()
    load_lora(_fresh(tiny_models), _our_file(ours, tmp_path))  # UNet and (no) text-encoder factors
    assert calls == {"_check_factors": 2, "_check_new_tokens": 1, "_check_token_rows": 1}
