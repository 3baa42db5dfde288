"""One generation request, what all four entry points take, checked once before any model runs."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from . import values
from .sampling import OFFICIAL_DECODER, OFFICIAL_PRIOR, StageSettings, _StepCallback
from .sizes import _GENERATION, check_size

_MAX_IMAGES = 16
_MAX_SEED = 2**63 - 1  # torch's generators take 64 bits; image-to-image also uses seed + 1


def _prompt_tuple(value: object, name: str) -> tuple[str, ...]:
    """A prompt or a list of prompts → a tuple of strings, refusing anything else by name."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and value and all(isinstance(p, str) for p in value):
        return tuple(value)
    raise TypeError(f"{name} must be a string or a non-empty list of strings, not {value!r}")


def _per_picture(prompts: Sequence[str], count: int) -> list[str]:
    """One rule for the request and the PNGs: equal shares in order (cat, cat, dog, dog), as diffusers."""
    return [prompts[i * len(prompts) // count] for i in range(count)]


def _picture_count(num_images: object, prompts: int) -> int:
    """Each prompt must get the same number of pictures."""
    count = prompts if num_images is None else num_images
    if not (values._is_whole(count) and 1 <= count <= _MAX_IMAGES):
        raise ValueError(f"num_images must be from 1 to {_MAX_IMAGES} (a whole number), not {count!r}")
    if count % prompts:
        raise ValueError(
            f"num_images={count} cannot be shared among {prompts} prompts: use a multiple of "
            f"{prompts} (each prompt gets the same number of pictures)"
        )
    return int(count)


@dataclass(frozen=True)
class GenerationRequest:
    """What every generation shares, validated on construction so a bad value fails before any model runs.

    Args:
        prompt: the prompt, or a list of prompts, each in turn for ``num_images / len(prompt)`` pictures.
        negative_prompt: what guidance steers away from; one for all pictures, or one per prompt.
        height, width: picture size in pixels, multiples of 128 from 512 to 2048.
        num_images: how many pictures, 1 to 16, a multiple of the prompts' count (default: one each).
        seed: fixes all the noise: the same request gives the same pictures.
        prior_settings, decoder_settings: Stage C's and Stage B's sampler settings.
        long_prompts: read prompts beyond CLIP's 77 tokens in 77-token windows instead of cutting them.
    """

    prompt: str | tuple[str, ...] = ""
    negative_prompt: str | tuple[str, ...] = ""
    height: int = 1024
    width: int = 1024
    num_images: int | None = None
    seed: int = 0
    prior_settings: StageSettings = OFFICIAL_PRIOR
    decoder_settings: StageSettings = OFFICIAL_DECODER
    long_prompts: bool = False

    def __post_init__(self) -> None:
        prompts = _prompt_tuple(self.prompt, "prompt")
        negatives = _prompt_tuple(self.negative_prompt, "negative_prompt")
        if not isinstance(self.negative_prompt, str) and len(negatives) != len(prompts):
            raise ValueError(
                f"{len(negatives)} negative prompts for {len(prompts)} prompt(s): give one negative prompt "
                "for all pictures, or one per prompt"
            )
        if not (values._is_whole(self.seed) and 0 <= self.seed <= _MAX_SEED):
            raise ValueError(f"seed must be a whole number from 0 to 2**63 - 1, not {self.seed!r}")
        for name in ("prior_settings", "decoder_settings"):
            if not isinstance(getattr(self, name), StageSettings):
                raise TypeError(
                    f"{name} must be a StageSettings (e.g. OFFICIAL_PRIOR), not {getattr(self, name)!r}"
                )
        if not isinstance(self.long_prompts, bool):
            raise TypeError(f"long_prompts must be True or False, not {self.long_prompts!r}")
        set_ = object.__setattr__  # a frozen dataclass normalizing its own fields
        for name, given in (("prompt", prompts), ("negative_prompt", negatives)):
            if not isinstance(getattr(self, name), str):
                set_(self, name, given)
        set_(self, "num_images", _picture_count(self.num_images, len(prompts)))
        height, width = check_size(self.height, self.width, _GENERATION)
        set_(self, "height", height)
        set_(self, "width", width)
        set_(self, "seed", int(self.seed))

    @property
    def prompts(self) -> list[str]:
        """The prompt of each picture, in order."""
        return _per_picture(_prompt_tuple(self.prompt, "prompt"), self.num_images)

    @property
    def negative_prompts(self) -> list[str]:
        """The negative prompt of each picture, in order."""
        return _per_picture(_prompt_tuple(self.negative_prompt, "negative_prompt"), self.num_images)

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
        """The request saved in ``Generation.settings`` or a PNG's (``display.read_settings``): the same
        pictures again. Other keys are ignored; a missing or edited field is named with its type."""
        if not isinstance(settings, dict):
            raise TypeError(
                f"settings must be a dict (what read_settings returns), not {type(settings).__name__}"
            )
        fields = {
            name: _saved(settings, name) for name in _SAVED if name in settings or name not in _OPTIONAL
        }
        return cls(
            prior_settings=_saved_stage(fields.pop("prior"), "prior"),
            decoder_settings=_saved_stage(fields.pop("decoder"), "decoder"),
            **fields,
        )


#: what a saved request holds (JSON types), named in messages; newer fields are optional (old PNGs)
_SAVED: dict[str, tuple[type | tuple[type, ...], str]] = {
    "prompt": ((str, list), "a string or a list of strings"),
    "negative_prompt": ((str, list), "a string or a list of strings"),
    "height": (int, "a whole number of pixels"),
    "width": (int, "a whole number of pixels"),
    "num_images": (int, "a whole number"),
    "seed": (int, "a whole number"),
    "prior": (dict, "a dict of Stage C's sampler settings"),
    "decoder": (dict, "a dict of Stage B's sampler settings"),
    "long_prompts": (bool, "true or false"),
}
_OPTIONAL = {"long_prompts"}


def _saved(settings: dict, name: str) -> Any:
    """One field of saved settings, refused by name when missing or of another type (an edited PNG)."""
    kinds, wanted = _SAVED[name]
    if name not in settings:
        raise ValueError(
            f"the settings have no {name!r} ({wanted}): they were not saved by a generation, or edited"
        )
    value = settings[name]
    if not isinstance(value, kinds) or (kinds is int and isinstance(value, bool)):
        raise TypeError(f"the settings' {name!r} must be {wanted}, not {value!r} ({type(value).__name__})")
    return value


def _saved_stage(saved: dict, name: str) -> StageSettings:
    """StageSettings' own TypeError does not say which stage's saved settings, nor the known keys."""
    try:
        return StageSettings(**saved)
    except TypeError as error:  # an unexpected or a missing keyword argument
        known = ", ".join(f.name for f in dataclasses.fields(StageSettings))
        raise ValueError(f"the settings' {name!r}: {error} (sampler settings have {known})") from None


_REQUEST_FIELDS = tuple(f.name for f in dataclasses.fields(GenerationRequest))


class _Watch(TypedDict):
    """How a caller watches the run (never saved): one typed value through the layers, not three."""

    callback: _StepCallback | None
    decoder_callback: _StepCallback | None
    progress: bool


_WATCH_OPTIONS: _Watch = {"callback": None, "decoder_callback": None, "progress": True}


def _check_options(options: dict[str, Any], known: tuple[str, ...] = _REQUEST_FIELDS) -> dict[str, Any]:
    """Refuse an unknown option by name, with the closest known one."""
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"unknown option {name!r}{hint}: a generation takes {', '.join(known)}")
    return options


def _make_request(
    prompt: str | Sequence[str] | GenerationRequest, negative_prompt: str | Sequence[str] = "", **options: Any
) -> tuple[GenerationRequest, _Watch]:
    """One place turns a prompt, or a ready request whose fields options replace, into a checked request."""
    _check_options(options, _REQUEST_FIELDS + tuple(_WATCH_OPTIONS))
    watch = _Watch(**{name: options.pop(name, default) for name, default in _WATCH_OPTIONS.items()})
    if isinstance(prompt, GenerationRequest):
        if negative_prompt != "":
            options["negative_prompt"] = negative_prompt
        return prompt.replace(**options), watch
    return GenerationRequest(prompt, negative_prompt, **options), watch
