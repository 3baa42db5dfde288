"""Fetch the released Stable Cascade weights into a models folder: what ``download_models.sh`` runs.

Why not ``hf_hub_download(local_dir=...)``: it (2.4) deletes its temporary file on failure, so a cut 7 GB
transfer restarts from zero, and checks the size, not the sha256. So huggingface_hub's pieces (``HEAD``:
redirect, checksum, size; ``http_get``: ``Range`` resume, retries, progress bar) fill a partial file that
outlives the run (``<models>/.cache/cascade-download/``) and is named only once its checksum is the Hub's.
"""

from __future__ import annotations

import argparse
import collections
import difflib
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from huggingface_hub import HfApi, constants, get_hf_file_metadata, get_token, hf_hub_url
from huggingface_hub.file_download import http_get
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import build_hf_headers
from huggingface_hub.utils.sha import git_hash, sha_fileobj

from . import files
from .files import ModelFile

_GROUPS = ("essential", "controlnet", "lora")
_WORDS = (*_GROUPS, *files._VARIANTS, *files._PRECISIONS_BY_WORD, "all")
_OPTIONS = ("--models-dir", "--dry-run", "--verify", "--help")
_PARTIAL_DIR = Path(".cache") / "cascade-download"  # in the models folder: same disk, the final move renames
# One file as the Hub describes it now: ``url`` where its bytes are (the CDN for LFS files), ``checksum`` its ETag
_Remote = collections.namedtuple("_Remote", "repo path url size checksum")
_USAGE = """\
usage: bash download_models.sh [essential] [VARIANT] [bfloat16|float32] [controlnet] [lora] [all]
                               [--models-dir DIR] [--dry-run] [--verify] [--help]"""
_HELP = f"""{_USAGE}

Fetch the released Stable Cascade weights from the Hugging Face Hub. Words, in any order, and options:
  essential    EfficientNet encoder, Stage A, previewer (as the official script) and what the notebooks
               read offline: CLIP text encoder, tokenizer, CLIP image encoder and its preprocessing config
  VARIANT      big-big, big-small, small-big or small-small: Stage B size - Stage C size (small = lite)
  bfloat16     half-size files (the default); float32: full precision
  controlnet   the Stage C ControlNets: canny, inpainting, super_resolution
  lora         the official example LoRA (lora_fernando_10k: [fernando], a dog)
  all          essential + controlnet + lora (+ the variant, if you name one)
  --models-dir DIR  where the files go (download_models.sh: models/ beside it; python -m: ./models)
  --dry-run    list what would be fetched, with the published sizes and the total; fetch nothing
  --verify     re-hash the files already there; one that differs from the Hub's checksum is fetched
               again (a plain run keeps a file whose size matches)
Interrupted? Run the same command again: finished files are kept, the current one resumes. Exit codes:
0 done, 1 a failure (named: transfer, checksum, disk, folder), 2 usage. HF_TOKEN (else the token of `hf
auth login`) goes with every request to the Hub (HF_ENDPOINT), never to the servers of the file bytes.
{files._LICENSE_NOTE}"""


class UsageError(ValueError):
    """The words do not say what to fetch, or the folder is unnamed (exit code 2)."""


class DownloadError(RuntimeError):
    """A transfer, checksum, disk or folder failure (exit code 1): the message names the file and what to do."""


def _selected(wanted: Sequence[object]) -> list[ModelFile]:
    """Words through the script's grammar, registry entries as they are: a notebook names what it reads."""
    words, entries = [], []
    for item in wanted:
        if not isinstance(item, str | ModelFile):
            raise UsageError(f"{item!r}: pass words or files entries, each as its own argument")
        (words if isinstance(item, str) else entries).append(item)
    return list(dict.fromkeys((_files_for_words(words) if words or not entries else []) + entries))


def _files_for_words(words: Sequence[str]) -> list[ModelFile]:
    """The files the words ask for, in the official script's order: essentials, Stage B, Stage C."""
    groups, variant, precision = _read_words([word.lower() for word in words])
    selected = files._essential_files(precision) if "essential" in groups else []
    if variant:
        stage_b, stage_c = files._VARIANTS[variant]
        selected += [files.STAGE_B[stage_b][precision], files.STAGE_C[stage_c][precision]]
    selected += list(files._CONTROLNETS.values()) if "controlnet" in groups else []
    return selected + ([files.LORA_FERNANDO] if "lora" in groups else [])


def _read_words(words: list[str]) -> tuple[set[str], str | None, files._Precision]:
    """The groups, variant and precision the words name: every usage error is found before the network."""
    if unknown := [word for word in words if word not in _WORDS]:
        raise UsageError(f"unknown word {unknown[0]!r}{_did_you_mean(unknown[0], _WORDS)}")
    variant = _at_most_one(
        words, files._VARIANTS, "one variant per run, not {}: run the script once for each"
    )
    precision = _at_most_one(words, files._PRECISIONS_BY_WORD, "one precision per run, not {}")
    groups = set(_GROUPS) if "all" in words else set(words) & set(_GROUPS)
    if not (groups or variant):
        hint = f"{precision!r} only says in which precision; " if precision else ""
        raise UsageError(f"{hint}say what to fetch: essential, a variant, controlnet, lora or all (--help)")
    return groups, variant, files._PRECISIONS_BY_WORD.get(precision, "bf16")


def _at_most_one(words: list[str], choices: Sequence[str], message: str) -> str | None:
    """Two variants (or precisions) in one run would be a guess at which one was meant: refused."""
    found = list(dict.fromkeys(word for word in words if word in choices))
    if len(found) > 1:
        raise UsageError(message.format(" and ".join(found)))
    return found[0] if found else None


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    """A typo's closest valid word, so a usage error says what to type."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def download(
    *wanted: str | ModelFile, models_dir: str | Path = "models", dry_run: bool = False, verify: bool = False
) -> list[Path]:
    """Fetch the words of ``download_models.sh`` (``download("essential", "big-big")``) or entries of
    :mod:`cascade_helpers.files` (exactly what a notebook reads), with progress bars; again resumes.

    Args:
        *wanted: the script's words and/or registry entries.
        models_dir: where the files go (created if needed); an empty name is refused.
        dry_run: list the files and their published sizes; fetch nothing.
        verify: re-hash the files there, fetching again one that differs (else one of the Hub's size is kept).

    Returns:
        The local paths of the registry entries.

    Raises:
        UsageError: ``wanted`` names nothing valid, or ``models_dir`` is empty (exit code 2).
        DownloadError: the folder cannot be used, or a transfer, checksum or the disk fails (exit code 1).
    """
    selected = _selected(wanted)
    if not str(models_dir).strip():  # Path("") would be the working folder
        raise UsageError("--models-dir is empty: name the folder the files go to, e.g. --models-dir models")
    models_dir = Path(models_dir).expanduser().resolve()
    _check_models_dir(models_dir, write=not dry_run)
    print(files._LICENSE_NOTE, flush=True)
    if dry_run:
        print(_dry_run_report(selected, models_dir), flush=True)
    elif constants.HF_HUB_OFFLINE:
        raise DownloadError("HF_HUB_OFFLINE is set: huggingface_hub refuses to download. Unset it, re-run.")
    else:
        _fetch_all(selected, models_dir, verify)
    return [models_dir / file.path for file in selected]


def _check_models_dir(models_dir: Path, write: bool) -> None:
    """A folder that is a file, lies in a file or cannot be written is named before anything is fetched."""
    existing = next(path for path in (models_dir, *models_dir.parents) if path.exists())
    if not existing.is_dir():
        where = "is a file" if existing == models_dir else f"is inside {existing}, which is a file"
        raise DownloadError(f"--models-dir {models_dir} {where}, not a folder: choose a folder")
    try:
        if write:
            models_dir.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=models_dir).close()
    except OSError as error:
        why = f"cannot be written to ({error.strerror or error}): choose a folder you can write to"
        raise DownloadError(f"--models-dir {models_dir} {why}, or change its permissions") from None


def _dry_run_report(selected: Sequence[ModelFile], models_dir: Path) -> str:
    """What a run would fetch, from the published sizes: no network, so it answers before a download."""
    lines = [f"Dry run, nothing is fetched. Into {models_dir}/:"]
    present = [file for file in selected if (models_dir / file.path).exists()]
    for file in selected:
        name = f"{file.path}/ (folder)" if file.folder else file.path
        note = "present: kept if its size matches" if file in present else file.repo
        lines.append(f"  {name:<45} {files._human_size(file.size):>9}  {note}")
    total = f"{files._human_size(sum(f.size for f in selected))} in {len(selected)} entr"
    total += ("y" if len(selected) == 1 else "ies") + " (published sizes)"
    here = f"; {files._human_size(sum(f.size for f in present))} of it already in {models_dir}/"
    return "\n".join([*lines, f"Total: {total}{here if present else ''}"])


def _fetch_all(selected: Sequence[ModelFile], models_dir: Path, verify: bool) -> None:
    """Every file is described first, so a 404 or a refused token stops the run before any transfer."""
    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")  # read now, not at import
    remote = [entry for file in selected for entry in _describe(file, endpoint)]
    kept = _kept(remote, models_dir, verify)
    todo = [entry for entry in remote if entry not in kept]  # a full disk is found before the first byte
    needed = sum(max(entry.size - _file_size(_partial_path(models_dir, entry)), 0) for entry in todo)
    if needed > (free := shutil.disk_usage(models_dir).free):
        need, have = files._human_size(needed), files._human_size(free)
        short = f"{need} to fetch into {models_dir}/, {have} free there"
        more = f"Free {files._human_size(needed - free)} or choose a larger disk with --models-dir DIR"
        raise DownloadError(f"Not enough disk space: {short}. {more}; nothing was fetched.")
    print(f"{len(remote)} file(s) into {models_dir}/, {len(kept)} already complete", flush=True)
    for number, entry in enumerate(remote, 1):
        line = f"[{number}/{len(remote)}] {entry.path}"
        if entry in kept:
            print(f"{line}: {kept[entry]}", flush=True)
        else:
            print(f"{line} ({files._human_size(entry.size)}) from {entry.repo}", flush=True)
            _fetch(entry, models_dir, endpoint)
    print(f"Done: {len(remote)} file(s) in {models_dir}/", flush=True)


def _kept(remote: Sequence[_Remote], models_dir: Path, verify: bool) -> dict[_Remote, str]:
    """The complete files and why; with ``verify`` one that differs loses its name now, not after a re-fetch."""
    kept = {}
    for entry in remote:
        final = models_dir / entry.path
        if _file_size(final) != entry.size:
            continue
        if not verify:
            kept[entry] = "already complete (its size matches), kept"
        elif _digest(final, entry) == entry.checksum:
            kept[entry] = "verified against the Hub's checksum, kept"
        else:
            print(f"  {entry.path} differs from the Hub's checksum: removed, fetched again below", flush=True)
            final.unlink()
    return kept


def _describe(file: ModelFile, endpoint: str) -> list[_Remote]:
    """The Hub's size, checksum and address of ``file`` (of each file of a folder entry)."""
    try:
        paths = [file.path]
        if file.folder:
            tree = HfApi(endpoint=endpoint).list_repo_tree(file.repo, file.path, recursive=True)
            paths = sorted(entry.path for entry in tree if isinstance(entry, RepoFile))
        found = {path: get_hf_file_metadata(hf_hub_url(file.repo, path, endpoint=endpoint)) for path in paths}
    except Exception as error:  # the HTTP library under huggingface_hub changed across versions
        raise _failure(file.path, file.repo, error, endpoint) from error
    if any(None in (meta.etag, meta.size) for meta in found.values()):
        raise DownloadError(f"{endpoint} gave {file.path} no checksum (ETag) or size: is HF_ENDPOINT a Hub?")
    return [_Remote(file.repo, path, meta.location, meta.size, meta.etag) for path, meta in found.items()]


def _fetch(entry: _Remote, models_dir: Path, endpoint: str) -> None:
    """Transfer ``entry`` into its partial file (resuming it), verify it, then give it its final name."""
    final, partial = models_dir / entry.path, _partial_path(models_dir, entry)
    partial.parent.mkdir(parents=True, exist_ok=True)
    for stale in partial.parent.glob(f"{Path(entry.path).name}.*.partial"):
        if stale != partial or _file_size(partial) > entry.size:  # an older version's, or too long
            stale.unlink()
    headers = build_hf_headers()
    headers["Accept-Encoding"] = "identity"  # byte ranges of the file itself, not of a compressed stream
    if urlsplit(entry.url)[:2] != urlsplit(endpoint)[:2]:
        headers.pop("authorization", None)  # a signed CDN address: the token stays with the Hub
    try:
        _transfer(entry, partial, headers)
    except Exception as error:  # the HTTP library under huggingface_hub changed across versions
        raise _failure(entry.path, entry.repo, error, endpoint, _file_size(partial), entry.size) from error
    if _digest(partial, entry) != entry.checksum:
        partial.unlink()
        why = f"the bytes received do not match the Hub's checksum ({entry.checksum}) and were deleted"
        raise DownloadError(f"{entry.path}: {why}. Run it again to fetch it afresh.")
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, final)  # a rename: the folder was found writable; an OSError here names both paths


def _transfer(entry: _Remote, partial: Path, headers: dict[str, str]) -> None:
    """``http_get`` from where ``partial`` ends, again while that adds bytes: huggingface_hub up to 1.2 at
    least gives up on a connection closed mid-body (2.4 resumes itself)."""
    sizes = {"expected_size": entry.size, "displayed_filename": entry.path}
    while (done := _file_size(partial)) < entry.size:
        try:
            with partial.open("ab") as out:
                http_get(entry.url, out, resume_size=done, headers=headers, **sizes)
            return  # http_get checked the size; the caller checks the checksum
        except Exception:
            if _file_size(partial) <= done:
                raise  # no progress: the caller says what failed and that running again resumes


def _failure(path: str, repo: str, error: Exception, endpoint: str, done=0, size=0) -> DownloadError:
    """Which file failed, why, and what to do next, from the HTTP status when there is one."""
    status, where = getattr(getattr(error, "response", None), "status_code", None), f"{endpoint}/{repo}"
    if status in (401, 403):
        sent = "The token (HF_TOKEN or hf auth login) was refused" if get_token() else "No token was sent"
        why = f"{where} answered {status} (access refused). {sent}: set HF_TOKEN to a token of an account"
        why += f" that accepted the licence on {where} (Colab: Secrets panel, HF_TOKEN), then re-run"
    elif status == 404:
        why = f"not in {repo} at {endpoint} (404). If HF_ENDPOINT points to a mirror, check that it"
        why += f" mirrors {repo}; otherwise the file was moved on the Hub: please report it"
    else:
        got = f" after {files._human_size(done)} of {files._human_size(size)}" if size else ""
        why = f"transfer from {where} failed{got} ({type(error).__name__}: {error}). Run it again (the same"
        why += " command or notebook cell): finished files are kept and this one resumes"
    return DownloadError(f"{path}: {why}.")


def _partial_path(models_dir: Path, entry: _Remote) -> Path:
    """The checksum in the name: a file updated on the Hub never resumes onto the old bytes."""
    return models_dir / _PARTIAL_DIR / f"{entry.path}.{entry.checksum}.partial"


def _file_size(path: Path) -> int:
    """0 for a file not there yet: a partial file that was never started."""
    return path.stat().st_size if path.exists() else 0


def _digest(path: Path, entry: _Remote) -> str:
    """The Hub's checksum is a sha256 (64 hex digits, LFS files) or a git blob sha1 (40: small files)."""
    if entry.size > 100 * files._MB:  # seconds to minutes: say what the pause is
        print(f"  checking {entry.path} against the Hub's checksum", flush=True)
    if len(entry.checksum) == 40:
        return git_hash(path.read_bytes())
    if len(entry.checksum) != 64:
        raise DownloadError(f"{entry.path}: the Hub's checksum {entry.checksum!r} is no sha256 nor git sha1")
    with path.open("rb") as stream:
        return sha_fileobj(stream).hex()


def main(argv: Sequence[str] | None = None) -> int:
    """``download_models.sh`` / ``cascade-download``: the exit code (0, 1 failure, 2 usage, 130 interrupted)."""
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)  # our usage text, not argparse's
    parser.add_argument("words", nargs="*")
    parser.add_argument("--models-dir", default="models")  # a string: "" must stay empty to be refused
    for flags in (["--dry-run"], ["--verify"], ["--help", "-h"]):
        parser.add_argument(*flags, action="store_true")
    try:
        args, unknown = parser.parse_known_intermixed_args(argv)
        if args.help:
            print(_HELP)
            return 0
        if unknown:
            option = unknown[0]
            raise UsageError(f"unknown option {option!r}{_did_you_mean(option.split('=')[0], _OPTIONS)}")
        download(*args.words, models_dir=args.models_dir, dry_run=args.dry_run, verify=args.verify)
    except (UsageError, argparse.ArgumentError) as error:
        print(f"{_USAGE}\nerror: {error}", file=sys.stderr)
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
