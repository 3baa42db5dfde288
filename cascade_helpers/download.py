"""Fetch the released Stable Cascade weights into a models folder: what ``download_models.sh`` runs.

The words are the official script's, ``[essential] <variant> [bfloat16|float32]``, plus
``controlnet``, ``lora`` and ``all``, in any order, options anywhere. Which files a word means is
written once, in ``cascade_helpers.files``; this module turns words into those files and moves bytes.

Why not ``hf_hub_download(local_dir=...)``: the installed huggingface_hub (2.4) downloads into a
process-unique temporary file that it deletes on failure (``_download_to_tmp_and_move``, PR #4228),
so an interrupted 7 GB transfer restarts from zero on the next run, and it checks the size, not the
sha256. So each file goes through huggingface_hub's own pieces instead: the ``HEAD`` that resolves the
Hub's redirect, checksum (ETag) and size, with ``HF_TOKEN`` and ``HF_ENDPOINT`` honoured; and
``http_get``, with its ``Range`` resume, retries and progress bar. The bytes land in a partial file
that outlives the run (``<models>/.cache/cascade-download/``) and take their final name only once
their checksum matches the Hub's: sha256 for LFS files, the git blob sha1 for small ones.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from . import files
from .files import ModelFile

ESSENTIAL, CONTROLNET, LORA, ALL = "essential", "controlnet", "lora", "all"
VARIANTS = files._VARIANTS
PRECISIONS = files._PRECISIONS_BY_WORD
WORDS = (ESSENTIAL, *VARIANTS, *PRECISIONS, CONTROLNET, LORA, ALL)
OPTIONS = ("--models-dir", "--dry-run", "--verify", "--help")
# Partial files live inside the models folder: same disk, so the final move is a rename.
PARTIAL_DIR = Path(".cache") / "cascade-download"

USAGE = """\
usage: bash download_models.sh [essential] [VARIANT] [bfloat16|float32] [controlnet] [lora] [all]
                               [--models-dir DIR] [--dry-run] [--verify] [--help]"""

HELP = f"""{USAGE}

Fetch the released Stable Cascade weights from the Hugging Face Hub. Words, in any order:

  essential    EfficientNet encoder, Stage A and previewer (as the official script), plus what the
               notebooks need to run offline: the CLIP text encoder and tokenizer (text prompts) and
               the CLIP image encoder with its preprocessing config (image variation), in the
               bfloat16 or float32 form that matches the precision word
  big-big      Stage B big  + Stage C big      (VARIANT = Stage B size - Stage C size;
  big-small    Stage B big  + Stage C lite      small means the lite models)
  small-big    Stage B lite + Stage C big
  small-small  Stage B lite + Stage C lite
  bfloat16     half-size files (the default); float32: full precision
  controlnet   the Stage C ControlNets: canny, inpainting, super_resolution
  lora         the official example LoRA (lora_fernando_10k: [fernando], a dog)
  all          essential + controlnet + lora (+ the variant, if you name one)

Options:
  --models-dir DIR  where the files go (download_models.sh: models/ beside it; python -m: ./models)
  --dry-run         list what would be fetched, with the published sizes and the total; fetch nothing
  --verify          re-hash the files already there against the Hub's checksums and fetch again
                    those that differ (a plain run keeps a file whose size matches: every file was
                    verified when it got its name, but one changed since would not be noticed)
  --help            this text

Examples: bash download_models.sh essential big-big bfloat16
          bash download_models.sh big-small controlnet --dry-run

Interrupted? Run the same command again: finished files are kept, the current one resumes.
Exit codes: 0 all fetched, 1 transfer, checksum, disk or folder failure (named), 2 usage error.
HF_TOKEN: a Hugging Face token (else the one saved by `hf auth login`), sent with every request to
the Hub (HF_ENDPOINT), never to the servers the file bytes come from. HF_ENDPOINT: a Hub mirror.
{files._LICENSE_NOTE}"""


class UsageError(ValueError):
    """The words do not say what to fetch (exit code 2)."""


class DownloadError(RuntimeError):
    """A transfer, checksum or disk failure (exit code 1). The message names the file and what to do."""


# --- words -> files --------------------------------------------------------------------------------------


def files_for_words(words: Sequence[str]) -> list[ModelFile]:
    """The files ``words`` ask for, in the official script's order: essentials, Stage B, Stage C."""
    words = [word.lower() for word in words]
    for word in words:
        if word not in WORDS:
            raise UsageError(f"unknown word {word!r}{_did_you_mean(word, WORDS)}")
    variants = list(dict.fromkeys(w for w in words if w in VARIANTS))
    precisions = list(dict.fromkeys(w for w in words if w in PRECISIONS))
    if len(variants) > 1:
        raise UsageError(f"one variant per run, not {' and '.join(variants)}: run the script once for each")
    if len(precisions) > 1:
        raise UsageError("one precision per run: bfloat16 or float32")
    everything = ALL in words
    essential, controlnet, lora = (everything or w in words for w in (ESSENTIAL, CONTROLNET, LORA))
    if not (essential or variants or controlnet or lora):
        precision_hint = f"{precisions[0]!r} only says in which precision. " if precisions else ""
        raise UsageError(f"{precision_hint}Say what to fetch: essential, a variant, controlnet, lora or all")
    precision = PRECISIONS[precisions[0]] if precisions else "bf16"
    selected = files._essential_files(precision) if essential else []
    if variants:
        stage_b, stage_c = VARIANTS[variants[0]]
        selected += [files.STAGE_B[stage_b][precision], files.STAGE_C[stage_c][precision]]
    selected += list(files._CONTROLNETS.values()) if controlnet else []
    return selected + ([files.LORA_FERNANDO] if lora else [])


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- the download ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFile:
    """One file as the Hub describes it now (a folder entry of the registry expands into several)."""

    repo: str
    path: str  # in the repo, and under the models folder
    resolve_url: str  # the Hub address that was asked
    url: str  # where the bytes are: the CDN for LFS files
    size: int
    checksum: str  # the Hub's ETag: sha256 for LFS files, git blob sha1 for the others


def download(
    *words: str,
    models_dir: str | Path = "models",
    dry_run: bool = False,
    verify: bool = False,
    endpoint: str | None = None,
    token: str | None = None,
) -> list[Path]:
    """Fetch what ``words`` name into ``models_dir``: the words of ``download_models.sh``, e.g.
    ``download("essential", "big-big", "bfloat16")``.

    Args:
        *words: the script's words.
        models_dir: where the files go (created if needed).
        dry_run: list the files and sizes; fetch nothing.
        verify: re-hash the files already there against the Hub's checksums and fetch again those
            that differ. Without it a file whose size matches the Hub's is kept unread: files get
            their name only once verified, so only a change made since would go unnoticed.
        endpoint: the Hub; defaults to ``HF_ENDPOINT``, else huggingface.co.
        token: defaults to ``HF_TOKEN``, else the token saved by ``hf auth login``. huggingface_hub
            sends it with every request to the endpoint; the file bytes come from a CDN without it.

    Returns:
        The local paths of the registry entries.

    Raises:
        UsageError: the words name nothing valid.
        DownloadError: the models folder cannot be used, or a transfer, checksum or the disk fails;
            running again resumes.
    """
    selected = files_for_words(words)
    models_dir = Path(models_dir).expanduser().resolve()
    check_models_dir(models_dir, write=not dry_run)
    print(files._LICENSE_NOTE, flush=True)
    if dry_run:
        print(dry_run_report(selected, models_dir), flush=True)
    else:
        _fetch_all(selected, models_dir, endpoint, token, verify)
    return [models_dir / file.path for file in selected]


def check_models_dir(models_dir: Path, write: bool = True) -> None:
    """Refuse a models folder that is a file, lies inside a file, or (``write``) cannot be written
    to, in one sentence that names it, before anything is fetched.

    Args:
        models_dir: the folder (it need not exist yet).
        write: True also creates it and writes a temporary file there (a dry run passes False).

    Raises:
        DownloadError: the folder cannot be used, named with what to do.
    """
    existing = next(path for path in (models_dir, *models_dir.parents) if path.exists())
    if not existing.is_dir():
        where = "is a file" if existing == models_dir else f"is inside {existing}, which is a file"
        raise DownloadError(f"--models-dir {models_dir} {where}, not a folder: choose a folder")
    if not write:
        return
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=models_dir):
            pass
    except OSError as error:
        raise DownloadError(
            f"--models-dir {models_dir} cannot be written to ({error.strerror or error}): choose a folder you "
            "can write to, or change its permissions"
        ) from None


def dry_run_report(selected: Sequence[ModelFile], models_dir: Path) -> str:
    """What a run would fetch, with the published sizes; no network.

    Args:
        selected: the registry entries (:func:`files_for_words`).
        models_dir: the folder, to mark what is already present there.

    Returns:
        The report: one line per entry (path, published size, "present" or its repo), then the total.
    """
    lines = [f"Dry run, nothing is fetched. Into {models_dir}/:"]
    present = 0
    for file in selected:
        here = (models_dir / file.path).exists()
        present += file.size if here else 0
        name = f"{file.path}/ (folder)" if file.folder else file.path
        note = "present: kept if its size matches" if here else file.repo
        lines.append(f"  {name:<45} {files._human_size(file.size):>9}  {note}")
    total = sum(file.size for file in selected)
    entries = f"{len(selected)} entr" + ("y" if len(selected) == 1 else "ies")
    lines.append(f"Total: {files._human_size(total)} in {entries} (published sizes)")
    if present:
        lines[-1] += f"; {files._human_size(present)} of it already in {models_dir}/"
    return "\n".join(lines)


def _fetch_all(
    selected: Sequence[ModelFile], models_dir: Path, endpoint: str | None, token: str | None, verify: bool
) -> None:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise DownloadError(
            "HF_HUB_OFFLINE is set, so huggingface_hub refuses to download: unset it and re-run."
        )
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    remote = [entry for file in selected for entry in _describe(file, endpoint, token)]
    kept = {
        entry: "already complete (its size matches), kept" for entry in remote if _complete(models_dir, entry)
    }
    if verify:
        for number, entry in enumerate(kept, 1):
            print(f"verifying {entry.path} ({number}/{len(kept)}) against the Hub's checksum", flush=True)
            if _digest(models_dir / entry.path, entry.checksum) == entry.checksum:
                kept[entry] = "verified against the Hub's checksum, kept"
        kept = {entry: note for entry, note in kept.items() if note.startswith("verified")}
    todo = [entry for entry in remote if entry not in kept]
    _check_free_space(
        models_dir, sum(max(entry.size - _partial_size(models_dir, entry), 0) for entry in todo)
    )
    print(f"{_count(remote)} into {models_dir}/, {len(kept)} already complete", flush=True)
    for number, entry in enumerate(remote, 1):
        if entry in kept:
            print(f"[{number}/{len(remote)}] {entry.path}: {kept[entry]}", flush=True)
            continue
        differs = (
            " (the copy there differs from the Hub's checksum)" if (models_dir / entry.path).exists() else ""
        )
        print(
            f"[{number}/{len(remote)}] {entry.path} ({files._human_size(entry.size)}) from {entry.repo}{differs}",
            flush=True,
        )
        _fetch(entry, models_dir, endpoint, token)
    print(f"Done: {_count(remote)} in {models_dir}/", flush=True)


def _count(entries: Sequence[RemoteFile]) -> str:
    return f"{len(entries)} file" + ("" if len(entries) == 1 else "s")


def _describe(file: ModelFile, endpoint: str, token: str | None) -> list[RemoteFile]:
    """Ask the Hub for the size, checksum and address of ``file`` (each file of a folder entry)."""
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.hf_api import RepoFile

    paths = [file.path]
    try:
        if file.folder:
            tree = HfApi(endpoint=endpoint, token=token).list_repo_tree(file.repo, file.path, recursive=True)
            paths = sorted(entry.path for entry in tree if isinstance(entry, RepoFile))
        described = []
        for path in paths:
            url = hf_hub_url(file.repo, path, endpoint=endpoint)
            metadata = get_hf_file_metadata(url, token=token)
            if metadata.etag is None or metadata.size is None:
                raise DownloadError(
                    f"{url} answered without a checksum (ETag) or size: is HF_ENDPOINT a Hub?"
                )
            described.append(
                RemoteFile(file.repo, path, url, metadata.location, metadata.size, metadata.etag)
            )
        return described
    except DownloadError:
        raise
    except Exception as error:  # the HTTP library under huggingface_hub changed across versions
        raise _failure(file.path, file.repo, error, endpoint, token) from error


def _fetch(entry: RemoteFile, models_dir: Path, endpoint: str, token: str | None) -> None:
    """Transfer ``entry`` into its partial file (resuming it), verify, then give it its final name."""
    from huggingface_hub.utils import build_hf_headers

    partial = _partial_path(models_dir, entry)
    partial.parent.mkdir(parents=True, exist_ok=True)
    for stale in partial.parent.glob(f"{Path(entry.path).name}.*.partial"):
        if stale != partial:  # left by an older version of the file on the Hub
            stale.unlink()
    if _partial_size(models_dir, entry) > entry.size:
        partial.unlink()
    headers = build_hf_headers(token=token)
    headers["Accept-Encoding"] = "identity"  # byte ranges of the file itself, not of a compressed stream
    if _origin(entry.url) != _origin(entry.resolve_url):
        headers.pop("authorization", None)  # a signed CDN address: the token stays with the Hub
    try:
        _transfer(entry, partial, headers)
    except Exception as error:  # the HTTP library under huggingface_hub changed across versions
        raise _failure(
            entry.path, entry.repo, error, endpoint, token, _partial_size(models_dir, entry), entry.size
        ) from error
    if _digest(partial, entry.checksum) != entry.checksum:
        partial.unlink()
        raise DownloadError(
            f"{entry.path}: the bytes received do not match the Hub's checksum ({entry.checksum}); the corrupt copy "
            "was deleted, nothing is kept under that name. Run the same command again to fetch it afresh."
        )
    final = models_dir / entry.path
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, final)
    except OSError as error:
        raise DownloadError(
            f"{entry.path}: verified, but it cannot get its name {final} ({error.strerror or error}). The verified "
            f"copy waits in {partial.parent}; fix the folder and run the same command again."
        ) from None


def _transfer(entry: RemoteFile, partial: Path, headers: dict[str, str]) -> None:
    """``http_get`` into ``partial`` from where it ends, and again while each attempt adds bytes:
    huggingface_hub up to 1.0 at least gives up on a connection closed mid-body (newer ones resume)."""
    from huggingface_hub.file_download import http_get

    while (done := _file_size(partial)) < entry.size:
        try:
            with partial.open("ab") as out:
                http_get(
                    entry.url,
                    out,
                    resume_size=done,
                    headers=headers,
                    expected_size=entry.size,
                    displayed_filename=entry.path,
                )
            return  # http_get checked the size; the caller checks the checksum
        except Exception:
            if _file_size(partial) <= done:
                raise  # no progress: the caller says what failed and that running again resumes


def _failure(
    path: str, repo: str, error: Exception, endpoint: str, token: str | None, done: int = 0, size: int = 0
) -> DownloadError:
    """Say which file failed, why, and what to do next."""
    from huggingface_hub import get_token

    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    if status in (401, 403):
        sent = (
            "The token you gave (HF_TOKEN or hf auth login) was refused"
            if (token or get_token())
            else "No token was sent"
        )
        return DownloadError(
            f"{path}: {endpoint}/{repo} answered {status} (access refused). {sent}: set HF_TOKEN to a token of an "
            f"account that accepted the licence on {endpoint}/{repo} (Colab: Secrets panel, HF_TOKEN), then re-run."
        )
    if status == 404:
        return DownloadError(
            f"{path} is not in {repo} at {endpoint} (404). If HF_ENDPOINT points to a mirror, check that it mirrors "
            f"{repo}; otherwise the file was moved on the Hub: please report it."
        )
    progress = f" after {files._human_size(done)} of {files._human_size(size)}" if size else ""
    return DownloadError(
        f"{path}: transfer from {endpoint}/{repo} failed{progress} ({type(error).__name__}: {error}). "
        "Run the same command again: finished files are kept and this one resumes."
    )


# --- local state -------------------------------------------------------------------------------------------


def _complete(models_dir: Path, entry: RemoteFile) -> bool:
    """A file gets its final name only after verification, so the right size there means complete
    (unless it changed since: ``--verify`` re-hashes it)."""
    final = models_dir / entry.path
    return final.is_file() and final.stat().st_size == entry.size


def _partial_path(models_dir: Path, entry: RemoteFile) -> Path:
    """The checksum in the name: a file updated on the Hub never resumes onto the old bytes."""
    return models_dir / PARTIAL_DIR / f"{entry.path}.{entry.checksum}.partial"


def _partial_size(models_dir: Path, entry: RemoteFile) -> int:
    return _file_size(_partial_path(models_dir, entry))


def _file_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _check_free_space(models_dir: Path, needed: int) -> None:
    existing = next(path for path in (models_dir, *models_dir.parents) if path.exists())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise DownloadError(
            f"Not enough disk space: {files._human_size(needed)} still to fetch into {models_dir}/, but only "
            f"{files._human_size(free)} free there. Free {files._human_size(needed - free)} or choose a larger "
            "disk with --models-dir DIR; nothing was fetched."
        )


def _digest(path: Path, checksum: str) -> str:
    """The digest of ``path`` in the algorithm the Hub's checksum uses: sha256 (64 hex digits, LFS
    files) or the git blob sha1 (40, files stored in git)."""
    if len(checksum) == 64:
        digest = hashlib.sha256()
    elif len(checksum) == 40:
        digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    else:
        raise DownloadError(
            f"{path.name}: the server's checksum {checksum!r} is neither a sha256 nor a git sha1"
        )
    with path.open("rb") as stream:
        while block := stream.read(8 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


# --- command line ------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would exit with its own usage text
        raise UsageError(message)


def main(argv: Sequence[str] | None = None) -> int:
    """``download_models.sh`` / ``cascade-download``: returns the exit code (0, 1 failure, 2 usage,
    130 interrupted)."""
    parser = _Parser(add_help=False)
    parser.add_argument("words", nargs="*")
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--verify", action="store_true")
    parser.add_argument("--help", "-h", action="store_true")
    try:
        args, unknown = parser.parse_known_intermixed_args(argv)
        if args.help:
            print(HELP)
            return 0
        if unknown:
            raise UsageError(
                f"unknown option {unknown[0]!r}{_did_you_mean(unknown[0].split('=')[0], OPTIONS)}"
            )
        if not args.words:
            raise UsageError("say what to fetch (--help lists the words)")
        download(*args.words, models_dir=args.models_dir, dry_run=args.dry_run, verify=args.verify)
    except UsageError as error:
        print(f"{USAGE}\nerror: {error}", file=sys.stderr)
        return 2
    except (DownloadError, OSError) as error:  # an OSError here is the disk's: say it in one line
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
