"""The one request type of the four generation entry points: prompts per picture, validation before any
model runs, and a round trip through the settings a generation (and its PNGs) records."""

from __future__ import annotations

import copy

import pytest

from cascade_helpers.request import GenerationRequest, _make_request
from cascade_helpers.sampling import DIFFUSERS_PRIOR, OFFICIAL_DECODER, OFFICIAL_PRIOR


def test_one_prompt_serves_every_picture():
    request = GenerationRequest("a cat", "blurry", num_images=3)
    assert request.prompts == ["a cat"] * 3 and request.negative_prompts == ["blurry"] * 3


def test_a_list_of_prompts_gives_each_prompt_its_share_in_order():
    request = GenerationRequest(["a cat", "a dog"], ["", "red"], num_images=4)
    assert request.prompts == ["a cat", "a cat", "a dog", "a dog"]
    assert request.negative_prompts == ["", "", "red", "red"]


def test_a_list_of_prompts_defaults_to_one_picture_each():
    request = GenerationRequest(["a cat", "a dog", "a horse"])
    assert request.num_images == 3 and request.prompt == ("a cat", "a dog", "a horse")


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"prompt": ["a", "b"], "negative_prompt": ["x", "y", "z"]}, ValueError, "3 negative prompts for 2"),
        ({"prompt": ["a", "b"], "num_images": 3}, ValueError, "num_images=3 cannot be shared among 2"),
        ({"prompt": []}, TypeError, "prompt must be a string or a non-empty list"),
        ({"prompt": ["a", 3]}, TypeError, "prompt must be a string"),
        ({"prompt": None}, TypeError, "prompt must be a string"),
        ({"negative_prompt": 0}, TypeError, "negative_prompt must be a string"),
        ({"num_images": 17}, ValueError, "num_images must be from 1 to 16"),
        ({"num_images": 2.0}, ValueError, "num_images must be from 1 to 16"),
        ({"seed": -1}, ValueError, "seed must be a whole number"),
        ({"seed": 1.5}, ValueError, "seed must be a whole number"),
        ({"height": 1000}, ValueError, "height=1000"),
        ({"prior_settings": {"steps": 20}}, TypeError, "prior_settings must be a StageSettings"),
    ],
)
def test_bad_requests_are_refused_by_name(kwargs, error, message):
    with pytest.raises(error, match=message):
        GenerationRequest(**kwargs)


def test_an_unknown_option_is_refused_with_the_closest_name():
    with pytest.raises(TypeError, match=r"unknown option 'num_image' \(did you mean 'num_images'\?\)"):
        _make_request("a cat", num_image=2)
    with pytest.raises(
        TypeError, match=r"unknown option 'callbak' \(did you mean 'callback'\?\).*, progress$"
    ):
        _make_request("a cat", callbak=print)
    with pytest.raises(TypeError, match="unknown option 'guidance'"):
        GenerationRequest("a cat").replace(guidance=4)


def test_a_ready_request_takes_options_that_replace_its_fields():
    base = GenerationRequest("a cat", seed=3)
    changed, watch = _make_request(base, "blurry", num_images=2, progress=False)
    assert watch == {"callback": None, "decoder_callback": None, "progress": False}
    assert (changed.prompt, changed.negative_prompt, changed.num_images, changed.seed) == (
        "a cat",
        "blurry",
        2,
        3,
    )
    assert base.num_images == 1  # the original is untouched


def test_the_recorded_settings_rebuild_the_same_request():
    request = GenerationRequest(
        ["a cat", "a dog"],
        height=640,
        width=1536,
        num_images=4,
        seed=7,
        prior_settings=DIFFUSERS_PRIOR.with_(steps=3),
        decoder_settings=OFFICIAL_DECODER.with_(steps=2, sampler="ddim", eta=0.3),
        long_prompts=True,
    )
    recorded = {**request.as_dict(), "prior_variant": "big", "index": 1}  # what PNGs hold besides
    assert GenerationRequest.from_dict(recorded) == request
    assert recorded["prompt"] == ["a cat", "a dog"]  # JSON-ready: a list, not a tuple
    assert recorded["prior"] == {**OFFICIAL_PRIOR.as_dict(), **recorded["prior"]}  # every field written


def test_settings_saved_before_long_prompts_and_eta_make_the_same_request():
    """Settings written before these fields existed ran without them: their defaults are what ran."""
    recorded = GenerationRequest("a cat").as_dict()
    del recorded["long_prompts"], recorded["prior"]["eta"]
    assert GenerationRequest.from_dict(recorded) == GenerationRequest("a cat")


SAVED = GenerationRequest("a cat", num_images=2).as_dict()


@pytest.mark.parametrize(
    "edit,error,message",
    [
        # issue 21: bare KeyError: 'prior'
        (lambda d: d.pop("prior"), ValueError, "the settings have no 'prior' \\(a dict of Stage C's sampler"),
        # issue 21: 'list' object has no attribute 'items'
        (
            lambda d: d.update(decoder=[10, 1.1]),
            TypeError,
            "the settings' 'decoder' must be a dict .*not \\[10, 1.1\\] \\(list\\)",
        ),
        # issue 21: "height='512': use a multiple of 128 from 512" for a string
        (
            lambda d: d.update(height="512"),
            TypeError,
            "the settings' 'height' must be a whole number of pixels, not '512' \\(str\\)",
        ),
        (lambda d: d.update(seed=True), TypeError, "the settings' 'seed' must be a whole number, not True"),
        (
            lambda d: d.update(prompt=None),
            TypeError,
            "the settings' 'prompt' must be a string or a list of strings",
        ),
        (
            lambda d: d.update(long_prompts="yes"),
            TypeError,
            "the settings' 'long_prompts' must be true or false",
        ),
        (
            lambda d: d["prior"].update(sampler_name="ddim"),
            ValueError,
            "the settings' 'prior': .*unexpected keyword argument 'sampler_name'",
        ),
        (
            lambda d: d["prior"].pop("guidance"),
            ValueError,
            "the settings' 'prior': .*missing 1 required positional argument: 'guidance'",
        ),
        (lambda d: d["prior"].update(sampler="euler"), ValueError, "unknown sampler 'euler'"),
    ],
    ids=[
        "no-prior",
        "decoder-list",
        "height-string",
        "seed-bool",
        "prompt-none",
        "long-prompts-string",
        "unknown-key",
        "no-guidance",
        "unknown-sampler",
    ],
)
def test_edited_settings_name_the_field_and_the_type_it_wants(edit, error, message):

    settings = copy.deepcopy(SAVED)
    edit(settings)
    with pytest.raises(error, match=message):
        GenerationRequest.from_dict(settings)


def test_settings_that_are_not_a_dict_are_named():
    with pytest.raises(TypeError, match="settings must be a dict .*not list"):
        GenerationRequest.from_dict([SAVED])
