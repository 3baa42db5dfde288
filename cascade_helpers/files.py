"""The one registry of model files: where each lives on the Hub, where it lands locally, how big it is
and what needs it.

``download_models.sh``, the loader, the README table and every "file missing" error read this
module, so a file name is written exactly once. Local paths mirror the Hub paths, which is what
``huggingface_hub`` leaves in ``--models-dir`` and what the official configs expect for the
top-level single files (``models/stage_c_bf16.safetensors`` ...).

Sizes are the published ones (decimal units); downloads verify files against the Hub's checksums
(sha256 for LFS files, the git blob sha1 for small ones), these numbers are only for ``--dry-run``
totals and the free-disk check.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Size = Literal["big", "lite"]
Precision = Literal["bf16", "fp32"]
#: the model sizes of Stage B and Stage C (the download script's "small" is lite)
SIZES: tuple[Size, ...] = ("big", "lite")
#: the precisions the weights are published in (the download script's words: bfloat16, float32)
PRECISIONS: tuple[Precision, ...] = ("bf16", "fp32")

REPO_DECODER = "stabilityai/stable-cascade"
REPO_PRIOR = "stabilityai/stable-cascade-prior"
REPO_LORA = "dome272/stable-cascade"

LICENSE_NOTE = (
    "The Stable Cascade weights are released under Stability AI's non-commercial research licence "
    "(https://huggingface.co/stabilityai/stable-cascade/blob/main/LICENSE): read it before you use them."
)

MB = 1_000_000
GB = 1_000_000_000


@dataclass(frozen=True)
class ModelFile:
    """One file (or, for ``folder=True``, one folder of small files) of the released weights."""

    path: str  # relative to the models folder, identical to the path inside ``repo``
    repo: str
    size: int  # published size in bytes
    needed_by: str
    group: Literal["essential", "stage_b", "stage_c", "controlnet", "lora"]
    stage_size: Size | None = None  # big / lite for Stage B and C files
    precision: Precision | None = None  # for files that exist in bf16 and fp32 forms
    folder: bool = False

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]


def _single(size: Size, precision: Precision, stage: Literal["b", "c"], nbytes: int) -> ModelFile:
    lite = "_lite" if size == "lite" else ""
    bf16 = "_bf16" if precision == "bf16" else ""
    needed_by = (
        "text-to-image (Stage C, the prior)"
        if stage == "c"
        else "decoding Stage C latents (Stage B, the decoder)"
    )
    return ModelFile(
        path=f"stage_{stage}{lite}{bf16}.safetensors",
        repo=REPO_DECODER,
        size=nbytes,
        needed_by=needed_by,
        group=f"stage_{stage}",
        stage_size=size,
        precision=precision,
    )


def _stage(stage: Literal["b", "c"], gigabytes: dict[Size, dict[Precision, float]]) -> dict:
    """One stage's single files by size, then precision, from their published sizes."""
    return {
        size: {precision: _single(size, precision, stage, int(gb * GB)) for precision, gb in by.items()}
        for size, by in gigabytes.items()
    }


def _transformers_weights(folder: str, repo: str, sizes: dict[Precision, int], needed_by: str) -> dict:
    """A transformers model's weights in both forms: ``model.safetensors`` (float32) and the
    ``bf16`` variant ``model.bf16.safetensors``, as the Hub repos keep them."""
    names = {"bf16": "model.bf16.safetensors", "fp32": "model.safetensors"}
    return {
        precision: ModelFile(
            f"{folder}/{names[precision]}", repo, nbytes, needed_by, "essential", precision=precision
        )
        for precision, nbytes in sizes.items()
    }


#: Stage C / Stage B single files by size, then precision: ``STAGE_C["lite"]["bf16"]``
STAGE_C: dict[Size, dict[Precision, ModelFile]] = _stage(
    "c", {"big": {"fp32": 14.4, "bf16": 7.18}, "lite": {"fp32": 4.12, "bf16": 2.06}}
)
STAGE_B: dict[Size, dict[Precision, ModelFile]] = _stage(
    "b", {"big": {"fp32": 6.25, "bf16": 3.13}, "lite": {"fp32": 2.8, "bf16": 1.4}}
)

STAGE_A = ModelFile(
    "stage_a.safetensors", REPO_DECODER, int(73.7 * MB), "decoding to pixels (Stage A)", "essential"
)
EFFNET = ModelFile(
    "effnet_encoder.safetensors",
    REPO_DECODER,
    int(81.5 * MB),
    "encoding images to Stage C latents (image-to-image, reconstruction, LoRA training, super-resolution)",
    "essential",
)
PREVIEWER = ModelFile(
    "previewer.safetensors", REPO_DECODER, int(16 * MB), "live previews of Stage C latents", "essential"
)
TOKENIZER = ModelFile(
    "tokenizer", REPO_DECODER, int(4 * MB), "text conditioning (CLIP tokenizer)", "essential", folder=True
)
TEXT_ENCODER_CONFIG = ModelFile(
    "text_encoder/config.json", REPO_DECODER, 1_000, "text conditioning", "essential"
)
#: the CLIP towers in both forms, by precision: ``TEXT_ENCODER["bf16"]``
TEXT_ENCODER: dict[Precision, ModelFile]
IMAGE_ENCODER: dict[Precision, ModelFile]
TEXT_ENCODER, IMAGE_ENCODER = (
    _transformers_weights(folder, repo, {"bf16": int(bf16), "fp32": int(fp32)}, needed_by)
    for folder, repo, bf16, fp32, needed_by in (
        ("text_encoder", REPO_DECODER, 1.39 * GB, 2.78 * GB, "text conditioning (CLIP ViT-bigG/14 text)"),
        ("image_encoder", REPO_PRIOR, 608 * MB, 1.22 * GB, "image variation (CLIP ViT-L/14 vision)"),
    )
)
IMAGE_ENCODER_CONFIG = ModelFile(
    "image_encoder/config.json", REPO_PRIOR, 1_000, "image variation", "essential"
)
FEATURE_EXTRACTOR = ModelFile(
    "feature_extractor/preprocessor_config.json",
    REPO_PRIOR,
    1_000,
    "image variation (CLIP image preprocessing: size, crop, mean, std)",
    "essential",
)

CONTROLNETS: dict[str, ModelFile] = {
    "canny": ModelFile(
        "controlnet/canny.safetensors", REPO_DECODER, int(218 * MB), "ControlNet: canny edges", "controlnet"
    ),
    "inpainting": ModelFile(
        "controlnet/inpainting.safetensors",
        REPO_DECODER,
        int(218 * MB),
        "ControlNet: inpainting / outpainting",
        "controlnet",
    ),
    "super_resolution": ModelFile(
        "controlnet/super_resolution.safetensors",
        REPO_DECODER,
        int(814 * MB),
        "ControlNet: super-resolution",
        "controlnet",
    ),
}
LORA_FERNANDO = ModelFile(
    "lora_fernando_10k.safetensors",
    REPO_LORA,
    int(12.6 * MB),
    "the official example LoRA ([fernando], a dog) for the big Stage C",
    "lora",
)


def essential_files(precision: Precision) -> list[ModelFile]:
    """What ``essential`` fetches: the official three plus the CLIP parts our notebooks need offline."""
    return [
        EFFNET,
        STAGE_A,
        PREVIEWER,
        TEXT_ENCODER_CONFIG,
        TEXT_ENCODER[precision],
        TOKENIZER,
        IMAGE_ENCODER_CONFIG,
        IMAGE_ENCODER[precision],
        FEATURE_EXTRACTOR,
    ]


def all_files() -> list[ModelFile]:
    """Every file in the registry, each once (the tests check names and sizes over all of them)."""
    files = [
        f for stage in (STAGE_C, STAGE_B) for by_precision in stage.values() for f in by_precision.values()
    ]
    for precision in ("bf16", "fp32"):
        files += [f for f in essential_files(precision) if f not in files]
    return files + [*CONTROLNETS.values(), LORA_FERNANDO]


# --- the command that fetches a set of files -------------------------------------------------------

PRECISION_WORDS: dict[Precision, str] = {"bf16": "bfloat16", "fp32": "float32"}
#: the download script's precision words → precisions: ``"bfloat16"`` → ``"bf16"``
PRECISIONS_BY_WORD: dict[str, Precision] = {word: precision for precision, word in PRECISION_WORDS.items()}
_SIZE_WORD: dict[Size, str] = {"big": "big", "lite": "small"}


def variant_word(stage_b: Size, stage_c: Size) -> str:
    """The official variant word: Stage B size first, then Stage C size (``lite`` is called small).

    Args:
        stage_b, stage_c: the stages' sizes, "big" or "lite".

    Returns:
        One of :data:`VARIANT_WORDS`, e.g. ``"big-small"`` for a big Stage B and a lite Stage C.
    """
    return f"{_SIZE_WORD[stage_b]}-{_SIZE_WORD[stage_c]}"


#: the official variant words → (Stage B size, Stage C size): ``"big-small"`` → ``("big", "lite")``
VARIANTS: dict[str, tuple[Size, Size]] = {variant_word(b, c): (b, c) for b in SIZES for c in SIZES}
VARIANT_WORDS = tuple(VARIANTS)


def download_command(
    files: Iterable[ModelFile], stage_b: Size | None = None, stage_c: Size | None = None
) -> str:
    """The shortest ``bash download_models.sh ...`` line that fetches ``files``.

    Args:
        files: the files to fetch (from this registry).
        stage_b, stage_c: the sizes the caller uses ("big" or "lite"), for the stage the files do
            not name, so a missing Stage C file suggests a variant word that keeps the user's Stage B.
            Without them the other stage gets the same size as the named one.

    Returns:
        The command line: ``essential``, a variant word, ``controlnet``, ``lora`` as the files need,
        then ``float32`` when every file with a precision is fp32, else ``bfloat16`` (none if no file
        has a precision).
    """
    files = list(files)
    words: list[str] = []
    if any(f.group == "essential" for f in files):
        words.append("essential")
    b_sizes = {f.stage_size for f in files if f.group == "stage_b"}
    c_sizes = {f.stage_size for f in files if f.group == "stage_c"}
    if b_sizes or c_sizes:
        b = next(iter(b_sizes)) if b_sizes else (stage_b or next(iter(c_sizes)))
        c = next(iter(c_sizes)) if c_sizes else (stage_c or b)
        words.append(variant_word(b, c))
    if any(f.group == "controlnet" for f in files):
        words.append("controlnet")
    if any(f.group == "lora" for f in files):
        words.append("lora")
    precisions = {f.precision for f in files if f.precision}
    if precisions == {"fp32"}:
        words.append(PRECISION_WORDS["fp32"])
    elif precisions:
        words.append(PRECISION_WORDS["bf16"])
    return "bash download_models.sh " + " ".join(words)


def check_size_word(size: object, what: str = "variant") -> Size:
    """``size`` if it names a model size ('big' or 'lite'), else a ValueError that says so.

    Args:
        size: what the caller passed.
        what: the argument's name, for the message.

    Returns:
        ``size``, unchanged.

    Raises:
        ValueError: ``size`` is neither "big" nor "lite".
    """
    if size not in SIZES:
        raise ValueError(f"{what} must be 'big' or 'lite', not {size!r}")
    return size  # type: ignore[return-value]


def check_precision(precision: object) -> Precision:
    """``precision`` if it names a published precision ('bf16' or 'fp32'), else a ValueError that says
    which words mean what.

    Args:
        precision: what the caller passed.

    Returns:
        ``precision``.
    """
    if precision not in PRECISIONS:
        words = ", ".join(f"{p!r} ({PRECISION_WORDS[p]})" for p in PRECISIONS)
        raise ValueError(f"precision must be one of {words}, not {precision!r}")
    return precision  # type: ignore[return-value]


def human_size(nbytes: int) -> str:
    if nbytes >= GB:
        return f"{nbytes / GB:.2f} GB"
    return f"{nbytes / MB:.1f} MB" if nbytes >= MB else f"{nbytes / 1000:.0f} kB"
