"""Hostile input to download_models.sh / cascade_helpers.download, against the fake hub
(tests/fakehub.py): an unusable --models-dir, a file whose bytes changed after it was verified
(--verify), and what HF_TOKEN is sent with. Every error is one line naming the input, with the
exit code the README promises."""

from __future__ import annotations

import os
import subprocess

from test_download import ESSENTIAL, ROOT, SCRIPT, assert_fetched, local_files, script_env

from cascade_helpers.download import main


def _one_line_error(capsys, code: int, *argv: str) -> str:
    assert main(list(argv)) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    return err


# --- --models-dir that cannot hold the files ---------------------------------------------------------


def test_models_dir_that_is_a_file(tmp_path, no_network, capsys):
    target = tmp_path / "models"
    target.write_text("not a folder")
    err = _one_line_error(capsys, 1, "essential", "--models-dir", str(target))
    assert f"--models-dir {target} is a file, not a folder" in err and target.read_text() == "not a folder"


def test_models_dir_inside_a_file(tmp_path, no_network, capsys):
    (tmp_path / "file").write_text("x")
    err = _one_line_error(capsys, 1, "lora", "--models-dir", str(tmp_path / "file" / "models"))
    assert f"is inside {tmp_path / 'file'}, which is a file" in err


def test_dry_run_into_a_file_is_refused_too(tmp_path, no_network, capsys):
    (tmp_path / "file").write_text("x")
    err = _one_line_error(capsys, 1, "lora", "--dry-run", "--models-dir", str(tmp_path / "file"))
    assert "is a file, not a folder" in err


def test_read_only_models_dir(tmp_path, no_network, capsys, monkeypatch):
    """A read-only folder: chmod for ordinary users; root writes anywhere, so there the refusal the
    file system would give (EACCES) is simulated where the folder is first written to."""
    import errno
    import tempfile

    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        real = tempfile.TemporaryFile

        def refuse(*args, dir=None, **kwargs):
            if dir is not None and os.fspath(dir).startswith(os.fspath(folder)):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(dir))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    try:
        err = _one_line_error(capsys, 1, "essential", "--models-dir", str(folder / "models"))
    finally:
        folder.chmod(0o755)
    assert f"--models-dir {folder / 'models'} cannot be written to" in err and "Permission denied" in err


def test_bash_script_one_line_error_for_a_file(tmp_path):
    (tmp_path / "models").write_text("x")
    result = subprocess.run(
        ["bash", str(SCRIPT), "essential", "--models-dir", str(tmp_path / "models")],
        cwd=tmp_path,
        env=script_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: --models-dir {tmp_path / 'models'} is a file, not a folder: choose a folder"
    ]


def test_usage_errors_still_exit_2(no_network, capsys):
    assert main(["essential", "--verfy"]) == 2
    assert "did you mean '--verify'" in capsys.readouterr().err


# --- a complete file whose bytes changed: --verify ---------------------------------------------------


def _corrupt_same_size(path):
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))


def test_plain_rerun_keeps_a_right_size_file_and_verify_replaces_it(hub, tmp_path, capsys):
    """What the README says: a plain re-run checks the size only; --verify re-hashes and re-fetches."""
    models = tmp_path / "m"
    assert main(["essential", "--models-dir", str(models)]) == 0
    for path in ("text_encoder/model.bf16.safetensors", "tokenizer/vocab.json"):  # sha256 and git sha1
        _corrupt_same_size(models / path)
    capsys.readouterr()

    hub.seen.clear()
    assert main(["essential", "--models-dir", str(models)]) == 0
    assert hub.fetched_paths() == []  # size only: the changed bytes stay
    assert (models / "tokenizer/vocab.json").read_bytes() != hub.content(
        "tokenizer/vocab.json", "stabilityai/stable-cascade"
    )
    assert "its size matches" in capsys.readouterr().out

    hub.seen.clear()
    assert main(["essential", "--verify", "--models-dir", str(models)]) == 0
    assert sorted(hub.fetched_paths()) == ["text_encoder/model.bf16.safetensors", "tokenizer/vocab.json"]
    assert_fetched(hub, models, ESSENTIAL["bfloat16"])
    out = capsys.readouterr().out
    assert "differs from the Hub's checksum" in out and "verified against the Hub's checksum, kept" in out


def test_verify_on_an_intact_folder_fetches_nothing(hub, tmp_path):
    models = tmp_path / "m"
    assert main(["lora", "big-small", "--models-dir", str(models)]) == 0
    stamps = {p: (models / p).stat().st_mtime_ns for p in local_files(models)}
    hub.seen.clear()
    assert main(["lora", "big-small", "--verify", "--models-dir", str(models)]) == 0
    assert hub.fetched_paths() == []
    assert {p: (models / p).stat().st_mtime_ns for p in local_files(models)} == stamps


# --- HF_TOKEN: what the README says -------------------------------------------------------------------


def test_hf_token_goes_with_every_hub_request_and_never_to_the_cdn(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_every_request")
    assert main(["lora", "essential", "--models-dir", str(tmp_path / "m")]) == 0
    to_hub = {s.authorization for s in hub.seen if s.origin == "hub"}
    to_cdn = {s.authorization for s in hub.seen if s.origin == "cdn"}
    assert to_hub == {"Bearer hf_every_request"} and to_cdn == {None}
    assert any(s.method == "HEAD" for s in hub.seen if s.origin == "hub")  # the metadata requests too


def test_hf_hub_disable_implicit_token_keeps_it_home(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", "hf_every_request")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True)
    assert main(["lora", "--models-dir", str(tmp_path / "m")]) == 0
    assert {s.authorization for s in hub.seen} == {None}


def test_the_readme_says_what_a_rerun_checks_and_when_the_token_is_sent():
    readme = (ROOT / "README.md").read_text()
    assert "`--verify` re-hashes every file" in readme and "kept when **its size** matches" in readme
    assert "with **every request to the Hub endpoint**" in readme
    assert "if the Hub asks for a token" not in readme


# --- issue 21: an empty --models-dir, a --verify whose re-fetch fails ---------------------------------


def test_an_empty_models_dir_is_refused_not_the_working_folder(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["lora", "--models-dir", ""]) == 2
    assert "--models-dir is empty" in capsys.readouterr().err
    assert not (tmp_path / "lora_fernando_10k.safetensors").exists() and not (tmp_path / ".cache").exists()
    assert hub.fetched_paths() == []


def test_bash_script_refuses_an_empty_models_dir(hub, tmp_path):
    """The script passes its own --models-dir first; an empty one from the user must not win as '.'."""
    result = subprocess.run(
        ["bash", str(SCRIPT), "lora", "--models-dir", ""],
        cwd=tmp_path,
        env=script_env(tmp_path, hub),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "--models-dir is empty" in result.stderr
    assert not (tmp_path / "lora_fernando_10k.safetensors").exists() and hub.fetched_paths() == []


def test_verify_whose_refetch_fails_leaves_no_damaged_file_under_its_name(hub, tmp_path, capsys):
    """--verify finds a changed file, the re-fetch fails its checksum too: the message says nothing is kept
    under that name, so nothing may be, and the next plain run fetches it instead of keeping it."""
    models, path = tmp_path / "m", "stage_a.safetensors"
    assert main(["essential", "--models-dir", str(models)]) == 0
    _corrupt_same_size(models / path)
    hub.corrupt.add(path)
    capsys.readouterr()
    assert main(["essential", "--verify", "--models-dir", str(models)]) == 1
    err = capsys.readouterr().err
    assert path in err and "checksum" in err
    assert not (models / path).exists()

    hub.corrupt.clear()
    hub.seen.clear()
    assert main(["essential", "--models-dir", str(models)]) == 0
    assert hub.fetched_paths() == [path]
    assert_fetched(hub, models, ESSENTIAL["bfloat16"])
