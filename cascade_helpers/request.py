"""One generation request: the prompts, the picture size and count, the seed and both stages'
sampler settings — what text-to-image, image variation, image-to-image and ControlNet pictures all
take, checked once, before any model runs."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import values
from .sampling import OFFICIAL_DECODER, OFFICIAL_PRIOR, StageSettings
from .sizes import _GENERATION, check_size

MAX_IMAGES = 16
MAX_SEED = 2**63 - 1  # torch's generators take 64 bits; image-to-image also uses seed + 1

#: a prompt, or one prompt per picture (the diffusers habit)
Prompt = str | Sequence[str]


def _prompt_tuple(value: object, name: str) -> tuple[str, ...]:
    """A prompt or a list of prompts → a tuple of strings, refusing anything else by name."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and value and all(isinstance(p, str) for p in value):
        return tuple(value)
    raise TypeError(f"{name} must be a string or a non-empty list of strings, not {value!r}")


def per_picture(prompts: Sequence[str], count: int) -> list[str]:
    """Each of ``count`` pictures' prompt: the prompts take equal shares of the pictures, in order
    (``["a cat", "a dog"]`` for 4 pictures: cat, cat, dog, dog).

    Args:
        prompts: one prompt or more, in order.
        count: how many pictures.

    Returns:
        ``count`` prompts.
    """
    return [prompts[i * len(prompts) // count] for i in range(count)]


@dataclass(frozen=True)
class GenerationRequest:
    """What every generation shares: the prompts, the picture size and count, the seed and both
    stages' sampler settings. Validated on construction, so a bad value fails before any model runs.

    Args:
        prompt: the prompt, or a list of prompts (diffusers' habit): pictures are made for each
            prompt in turn, ``num_images / len(prompt)`` each.
        negative_prompt: what guidance steers away from; one string for all pictures, or a list as
            long as ``prompt``'s.
        height, width: picture size in pixels, multiples of 128 from 512 to 2048.
        num_images: how many pictures, 1 to 16; with a list of prompts a multiple of its length
            (default: one per prompt).
        seed: fixes all the noise: the same request gives the same pictures.
        prior_settings, decoder_settings: Stage C's and Stage B's sampler settings.
    """

    prompt: str | tuple[str, ...] = ""
    negative_prompt: str | tuple[str, ...] = ""
    height: int = 1024
    width: int = 1024
    num_images: int | None = None
    seed: int = 0
    prior_settings: StageSettings = OFFICIAL_PRIOR
    decoder_settings: StageSettings = OFFICIAL_DECODER

    def __post_init__(self) -> None:
        prompts = _prompt_tuple(self.prompt, "prompt")
        negatives = _prompt_tuple(self.negative_prompt, "negative_prompt")
        set_ = object.__setattr__  # a frozen dataclass normalizing its own fields
        for name in ("prompt", "negative_prompt"):
            value = getattr(self, name)
            set_(self, name, value if isinstance(value, str) else tuple(value))
        if not isinstance(self.negative_prompt, str) and len(negatives) != len(prompts):
            raise ValueError(
                f"{len(negatives)} negative prompts for {len(prompts)} prompt(s): give one negative prompt "
                "for all pictures, or one per prompt"
            )
        count = len(prompts) if self.num_images is None else self.num_images
        if not (values._is_whole(count) and 1 <= count <= MAX_IMAGES):
            raise ValueError(f"num_images must be from 1 to {MAX_IMAGES} (a whole number), not {count!r}")
        if count % len(prompts):
            raise ValueError(
                f"num_images={count} cannot be shared among {len(prompts)} prompts: use a multiple of "
                f"{len(prompts)} (each prompt gets the same number of pictures)"
            )
        set_(self, "num_images", int(count))
        height, width = check_size(self.height, self.width, _GENERATION)
        set_(self, "height", height)
        set_(self, "width", width)
        if not (values._is_whole(self.seed) and 0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be a whole number from 0 to 2**63 - 1, not {self.seed!r}")
        set_(self, "seed", int(self.seed))
        for name in ("prior_settings", "decoder_settings"):
            if not isinstance(getattr(self, name), StageSettings):
                raise TypeError(
                    f"{name} must be a StageSettings (e.g. OFFICIAL_PRIOR), not {getattr(self, name)!r}"
                )

    @property
    def prompts(self) -> list[str]:
        """The prompt of each picture, in order."""
        return per_picture(_prompt_tuple(self.prompt, "prompt"), self.num_images)

    @property
    def negative_prompts(self) -> list[str]:
        """The negative prompt of each picture, in order."""
        return per_picture(_prompt_tuple(self.negative_prompt, "negative_prompt"), self.num_images)

    def replace(self, **changes: Any) -> GenerationRequest:
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **_check_options(changes))

    def as_dict(self) -> dict:
        """The request as JSON-ready values: what PNG metadata stores, and what :meth:`from_dict` reads."""
        value = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("prompt", "negative_prompt"):
            value[name] = value[name] if isinstance(value[name], str) else list(value[name])
        value["prior"] = value.pop("prior_settings").as_dict()
        value["decoder"] = value.pop("decoder_settings").as_dict()
        return value

    @classmethod
    def from_dict(cls, settings: dict) -> GenerationRequest:
        """The request saved in a generation's settings (``Generation.settings``, or a PNG's through
        :func:`cascade_helpers.display.read_settings`): the same request makes the same pictures.
        Where Stage C started from a picture's latents (image-to-image, ControlNet init pictures) it ran
        fewer steps than asked: ``prior`` records what it ran, ``requested_prior`` what was asked, and
        the request takes the latter."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"prior_settings", "decoder_settings"}
        return cls(
            **{k: v for k, v in settings.items() if k in fields},
            prior_settings=StageSettings(**settings.get("requested_prior", settings["prior"])),
            decoder_settings=StageSettings(**settings["decoder"]),
        )


_REQUEST_FIELDS = tuple(f.name for f in dataclasses.fields(GenerationRequest))


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    """Refuse an unknown option by name, with the closest known one."""
    for name in options:
        if name not in _REQUEST_FIELDS:
            close = difflib.get_close_matches(name, _REQUEST_FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"unknown option {name!r}{hint}: a generation takes {', '.join(_REQUEST_FIELDS)}")
    return options


def make_request(
    prompt: Prompt | GenerationRequest, negative_prompt: Prompt = "", **options: Any
) -> GenerationRequest:
    """What the entry points accept, as one :class:`GenerationRequest`: a prompt (or list) with
    options, or a ready request with options that replace some of its fields.

    Args:
        prompt: a prompt, a list of prompts, or a whole :class:`GenerationRequest`.
        negative_prompt: one for all pictures, or one per prompt; with a request, a non-empty value
            replaces the request's.
        **options: other fields of :class:`GenerationRequest` (``height``, ``width``,
            ``num_images``, ``seed``, ``prior_settings``, ``decoder_settings``).

    Returns:
        The request, checked.

    Raises:
        TypeError: an unknown option (with the closest known one), or a prompt that is not text.
        ValueError: a value the request refuses (size, count, seed, negative prompts).
    """
    if isinstance(prompt, GenerationRequest):
        if negative_prompt != "":
            options["negative_prompt"] = negative_prompt
        return prompt.replace(**options)
    return GenerationRequest(prompt, negative_prompt, **_check_options(options))
