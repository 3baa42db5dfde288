"""The one registry of model files: where each lives on the Hub, where it lands locally, how big it is
and what needs it.

``download_models.sh``, the loaders, the memory planner and every "file missing" error read it, so a
file name is written once. Local paths mirror the Hub paths (``models/stage_c_bf16.safetensors`` ...).
Sizes are the published ones, in decimal units: for ``--dry-run`` totals, the free-disk check and the
memory planner (downloads verify the Hub's checksums).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Size = Literal["big", "lite"]
_Precision = Literal["bf16", "fp32"]
_SIZES: tuple[Size, ...] = ("big", "lite")
_PRECISIONS: tuple[_Precision, ...] = ("bf16", "fp32")

_REPO_DECODER = "stabilityai/stable-cascade"
_REPO_PRIOR = "stabilityai/stable-cascade-prior"
_LICENSE_NOTE = (
    "The Stable Cascade weights are released under Stability AI's non-commercial research licence "
    "(https://huggingface.co/stabilityai/stable-cascade/blob/main/LICENSE): read it before you use them."
)
_MB = 1_000_000
_GB = 1_000_000_000


@dataclass(frozen=True)
class ModelFile:
    """One file (or, for ``folder=True``, one folder of small files) of the released weights."""

    path: str  # relative to the models folder, identical to the path inside ``repo``
    repo: str
    size: int  # published size in bytes
    needed_by: str
    group: Literal["essential", "stage_b", "stage_c", "controlnet", "lora"]
    stage_size: Size | None = None  # big / lite for Stage B and C files
    precision: _Precision | None = None  # for files that exist in bf16 and fp32 forms
    folder: bool = False

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]


def _stage(
    stage: Literal["b", "c"], needed_by: str, gigabytes: dict
) -> dict[Size, dict[_Precision, ModelFile]]:
    """One stage's single files by size, then precision (``stage_c_lite_bf16.safetensors`` ...)."""
    return {
        size: {
            precision: ModelFile(
                f"stage_{stage}{'_lite' * (size == 'lite')}{'_bf16' * (precision == 'bf16')}.safetensors",
                _REPO_DECODER,
                int(gb * _GB),
                needed_by,
                f"stage_{stage}",
                size,
                precision,
            )
            for precision, gb in by_precision.items()
        }
        for size, by_precision in gigabytes.items()
    }


#: Stage C / Stage B single files by size, then precision: ``STAGE_C["lite"]["bf16"]``
STAGE_C = _stage(
    "c",
    "text-to-image (Stage C, the prior)",
    {"big": {"fp32": 14.4, "bf16": 7.18}, "lite": {"fp32": 4.12, "bf16": 2.06}},
)
STAGE_B = _stage(
    "b",
    "decoding Stage C latents (Stage B, the decoder)",
    {"big": {"fp32": 6.25, "bf16": 3.13}, "lite": {"fp32": 2.8, "bf16": 1.4}},
)


def _essential(path: str, megabytes: float, needed_by: str, repo: str = _REPO_DECODER, **more) -> ModelFile:
    """Most of the ``essential`` word's files are small and in ``stabilityai/stable-cascade``."""
    return ModelFile(path, repo, int(megabytes * _MB), needed_by, "essential", **more)


#: every other file of ``essential``, by what it is
_FILES: dict[str, ModelFile] = {
    "effnet": _essential(
        "effnet_encoder.safetensors",
        81.5,
        "encoding images to Stage C latents (image-to-image, reconstruction, LoRA training, super-resolution)",
    ),
    "stage_a": _essential("stage_a.safetensors", 73.7, "decoding to pixels (Stage A)"),
    "previewer": _essential("previewer.safetensors", 16, "live previews of Stage C latents"),
    "text_encoder_config": _essential("text_encoder/config.json", 0.001, "text conditioning"),
    "tokenizer": _essential("tokenizer", 4, "text conditioning (CLIP tokenizer)", folder=True),
    "image_encoder_config": _essential("image_encoder/config.json", 0.001, "image variation", _REPO_PRIOR),
    "feature_extractor": _essential(
        "feature_extractor/preprocessor_config.json",
        0.001,
        "image variation (CLIP image preprocessing: size, crop, mean, std)",
        _REPO_PRIOR,
    ),
}
#: the CLIP towers by precision (bf16: transformers' ``bf16`` variant): ``_WEIGHTS["text_encoder"]["bf16"]``
_WEIGHTS: dict[str, dict[_Precision, ModelFile]] = {
    name: {
        "bf16": _essential(f"{name}/model.bf16.safetensors", bf16, needed_by, repo, precision="bf16"),
        "fp32": _essential(f"{name}/model.safetensors", fp32, needed_by, repo, precision="fp32"),
    }
    for name, repo, bf16, fp32, needed_by in (
        ("text_encoder", _REPO_DECODER, 1390, 2780, "text conditioning (CLIP ViT-bigG/14 text)"),
        ("image_encoder", _REPO_PRIOR, 608, 1220, "image variation (CLIP ViT-L/14 vision)"),
    )
}
_CONTROLNETS: dict[str, ModelFile] = {
    name: ModelFile(
        f"controlnet/{name}.safetensors", _REPO_DECODER, megabytes * _MB, f"ControlNet: {what}", "controlnet"
    )
    for name, megabytes, what in (
        ("canny", 218, "canny edges"),
        ("inpainting", 218, "inpainting / outpainting"),
        ("super_resolution", 814, "super-resolution"),
    )
}
LORA_FERNANDO = ModelFile(
    "lora_fernando_10k.safetensors",
    "dome272/stable-cascade",
    int(12.6 * _MB),
    "the official example LoRA ([fernando], a dog) for the big Stage C",
    "lora",
)


def _essential_files(precision: _Precision) -> list[ModelFile]:
    """The official script's three, plus the CLIP parts our notebooks need offline."""
    by_name = _FILES | {name: weights[precision] for name, weights in _WEIGHTS.items()}
    names = ("effnet", "stage_a", "previewer", "text_encoder_config", "text_encoder", "tokenizer")
    return [by_name[name] for name in (*names, "image_encoder_config", "image_encoder", "feature_extractor")]


#: what each notebook reads with its default parameters, by registry name (the stages: at the sizes chosen)
_NOTEBOOK_READS: dict[str, tuple[str, ...]] = {
    "text_to_image": ("essential", "stage_b", "stage_c"),
    "lora": ("essential", "stage_b", "stage_c", "lora"),
    "controlnet": (
        *("text_encoder_config", "text_encoder", "tokenizer", "stage_b", "stage_c"),
        *("stage_a", "effnet", "previewer", "controlnet"),
    ),
    "reconstruct_images": (
        "effnet",
        "stage_b",
        "stage_a",
        "text_encoder_config",
        "text_encoder",
        "tokenizer",
    ),
}


def notebook_files(
    notebook: str, stage_c: Size = "big", stage_b: Size = "big", precision: _Precision = "bf16"
) -> list[ModelFile]:
    """The files a notebook reads, for its download cell: the registry decides, not a list in each notebook.

    Args:
        notebook: the notebook's name without ``.ipynb`` (``"text_to_image"``, ``"controlnet"``, ...).
        stage_c, stage_b: the sizes chosen, ``"big"`` or ``"lite"`` (ignored where a notebook reads none).
        precision: ``"bf16"`` (half the download; the loaders cast) or ``"fp32"``.

    Returns:
        The :class:`ModelFile` entries, each once, in the download script's order.
    """
    if notebook not in _NOTEBOOK_READS:
        raise ValueError(f"unknown notebook {notebook!r}: use one of {', '.join(_NOTEBOOK_READS)}")
    if precision not in _PRECISIONS:
        raise ValueError(f"precision={precision!r}: use 'bf16' or 'fp32'")
    stage_c, stage_b = _check_size(stage_c, "stage_c"), _check_size(stage_b, "stage_b")
    by_name = {
        "essential": _essential_files(precision),
        "stage_c": [STAGE_C[stage_c][precision]],
        "stage_b": [STAGE_B[stage_b][precision]],
        "controlnet": list(_CONTROLNETS.values()),
        "lora": [LORA_FERNANDO],
        **{name: [weights[precision]] for name, weights in _WEIGHTS.items()},
        **{name: [file] for name, file in _FILES.items()},
    }
    return list(dict.fromkeys(f for name in _NOTEBOOK_READS[notebook] for f in by_name[name]))


def _all_files() -> list[ModelFile]:
    """What the tests check names, sizes and commands over."""
    stages = [f for by_precision in [*STAGE_C.values(), *STAGE_B.values()] for f in by_precision.values()]
    clip = [f for by_precision in _WEIGHTS.values() for f in by_precision.values()]
    return [*stages, *_FILES.values(), *clip, *_CONTROLNETS.values(), LORA_FERNANDO]


_PRECISION_WORDS: dict[_Precision, str] = {"bf16": "bfloat16", "fp32": "float32"}
#: the download script's precision words → precisions: ``"bfloat16"`` → ``"bf16"``
_PRECISIONS_BY_WORD: dict[str, _Precision] = {word: precision for precision, word in _PRECISION_WORDS.items()}
_SIZE_WORDS: dict[Size, str] = {"big": "big", "lite": "small"}


def _variant_word(stage_b: Size, stage_c: Size) -> str:
    """The official script says "small" for lite: ``("big", "lite")`` → ``"big-small"``."""
    return f"{_SIZE_WORDS[stage_b]}-{_SIZE_WORDS[stage_c]}"


#: the official variant words (Stage B size, then Stage C size) → (Stage B, Stage C)
_VARIANTS: dict[str, tuple[Size, Size]] = {_variant_word(b, c): (b, c) for b in _SIZES for c in _SIZES}


def _shell_prefix() -> str:
    """In an IPython kernel (Colab, JupyterLab) a shell command is typed with a leading ``!``."""
    ipython = sys.modules.get("IPython")
    return "!" if ipython is not None and ipython.get_ipython() is not None else ""


def _variant_words(files: list[ModelFile], stage_b: Size | None, stage_c: Size | None) -> list[str]:
    """A missing Stage C file keeps the caller's Stage B in the word, else the named stage's size."""
    named = {f.group: f.stage_size for f in reversed(files) if f.stage_size}
    if not named:
        return []
    b = named.get("stage_b") or stage_b or named["stage_c"]
    return [_variant_word(b, named.get("stage_c") or stage_c or b)]


def download_command(
    files: Iterable[ModelFile], stage_b: Size | None = None, stage_c: Size | None = None
) -> str:
    """The shortest ``bash download_models.sh ...`` line that fetches ``files``, as the user types it:
    with a leading ``!`` inside a notebook (Colab, JupyterLab), plain in a terminal.

    Args:
        files: the files to fetch (from this registry).
        stage_b, stage_c: the sizes the caller uses ("big" or "lite"), for the stage the files do not
            name (without them: the named one's size).

    Returns:
        The command line; ``float32`` when every file with a precision is fp32, else ``bfloat16`` (if any).
    """
    files = list(files)
    groups = {f.group for f in files}
    words = ["essential"] if "essential" in groups else []
    words += _variant_words(files, stage_b, stage_c)
    words += [group for group in ("controlnet", "lora") if group in groups]
    precisions = {f.precision for f in files if f.precision}
    words += [_PRECISION_WORDS["fp32" if precisions == {"fp32"} else "bf16"]] if precisions else []
    return f"{_shell_prefix()}bash download_models.sh " + " ".join(words)


def _check_size(size: object, what: str = "variant") -> Size:
    """A ValueError naming the argument ``what``, not a KeyError deep in the registry."""
    if size not in _SIZES:
        raise ValueError(f"{what} must be 'big' or 'lite', not {size!r}")
    return size  # type: ignore[return-value]


def _human_size(nbytes: int) -> str:
    """For messages: 7.18 GB, 81.5 MB, 4 kB."""
    if nbytes >= _GB:
        return f"{nbytes / _GB:.2f} GB"
    return f"{nbytes / _MB:.1f} MB" if nbytes >= _MB else f"{nbytes / 1000:.0f} kB"
