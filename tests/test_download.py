"""download_models.sh / cascade_helpers.download against a fake hub on 127.0.0.1 (tests/fakehub.py).

What each word fetches is written out here by hand from the issue and the published repositories
(not read from cascade_helpers.files), and the fake hub's catalogue is hand-written too: a wrong
name in the registry shows up as a 404 or a set mismatch.
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
from fakehub import DECODER, LORA, PRIOR, FakeHub

from cascade_helpers import files
from cascade_helpers.download import download, main

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "download_models.sh"
MIB = 1024 * 1024

ESSENTIAL_COMMON = {
    "effnet_encoder.safetensors",
    "stage_a.safetensors",
    "previewer.safetensors",
    "text_encoder/config.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "image_encoder/config.json",
    "feature_extractor/preprocessor_config.json",
}
ESSENTIAL = {
    "bfloat16": ESSENTIAL_COMMON
    | {"text_encoder/model.bf16.safetensors", "image_encoder/model.bf16.safetensors"},
    "float32": ESSENTIAL_COMMON | {"text_encoder/model.safetensors", "image_encoder/model.safetensors"},
}
# Stage B size - Stage C size; "small" is the lite model; bfloat16 files end in _bf16.
VARIANT_STEMS = {
    "big-big": ("stage_b", "stage_c"),
    "big-small": ("stage_b", "stage_c_lite"),
    "small-big": ("stage_b_lite", "stage_c"),
    "small-small": ("stage_b_lite", "stage_c_lite"),
}
CONTROLNETS = {
    "controlnet/canny.safetensors",
    "controlnet/inpainting.safetensors",
    "controlnet/super_resolution.safetensors",
}


def variant_files(variant: str, precision: str) -> set[str]:
    suffix = "_bf16" if precision == "bfloat16" else ""
    return {f"{stem}{suffix}.safetensors" for stem in VARIANT_STEMS[variant]}


def repo_of(path: str) -> str:
    if path.startswith(("image_encoder/", "feature_extractor/")):
        return PRIOR
    return LORA if path.startswith("lora_") else DECODER


def local_files(models_dir: Path) -> set[str]:
    """Every file under the models folder except our partial-download folder."""
    if not models_dir.exists():
        return set()
    return {
        p.relative_to(models_dir).as_posix()
        for p in models_dir.rglob("*")
        if p.is_file() and ".cache" not in p.parts
    }


def assert_fetched(hub: FakeHub, models_dir: Path, expected: set[str]) -> None:
    assert local_files(models_dir) == expected
    for path in expected:  # byte-identical, and from the right repo (the tokenizer is in two)
        assert (models_dir / path).read_bytes() == hub.content(path, repo_of(path)), path


def big_file(hub: FakeHub, path: str) -> bytes:
    """Give ``path`` 12 MiB of content: more than huggingface_hub's 10 MiB write chunk, so an
    interrupted transfer leaves bytes behind."""
    data = random.Random(0).randbytes(12 * MIB)
    hub.files[(DECODER, path)] = data
    return data


def wait_for(condition, limit: float = 300) -> None:
    """Poll a condition another process makes true; the limit only turns a hang into a failure."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "the condition never came true"
        time.sleep(0.05)


def partials(models_dir: Path) -> list[Path]:
    return sorted((models_dir / ".cache").rglob("*.partial")) if (models_dir / ".cache").exists() else []


# --- the official grammar -------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
@pytest.mark.parametrize("variant", list(VARIANT_STEMS))
@pytest.mark.parametrize("essential", [True, False])
def test_every_variant_and_precision(hub, tmp_path, variant, precision, essential):
    words = (["essential"] if essential else []) + [variant, precision]
    assert main([*words, "--models-dir", str(tmp_path / "m")]) == 0
    expected = variant_files(variant, precision) | (ESSENTIAL[precision] if essential else set())
    assert_fetched(hub, tmp_path / "m", expected)
    assert partials(tmp_path / "m") == []


def test_variant_alone_defaults_to_bfloat16_and_options_go_anywhere(hub, tmp_path):
    assert main(["--models-dir", str(tmp_path / "a"), "big-small"]) == 0
    assert_fetched(hub, tmp_path / "a", {"stage_b_bf16.safetensors", "stage_c_lite_bf16.safetensors"})
    assert main(["essential", "--models-dir", str(tmp_path / "b"), "bfloat16"]) == 0
    assert_fetched(hub, tmp_path / "b", ESSENTIAL["bfloat16"])


def test_controlnet_lora_and_all(hub, tmp_path):
    assert main(["controlnet", "--models-dir", str(tmp_path / "c")]) == 0
    assert_fetched(hub, tmp_path / "c", CONTROLNETS)
    assert main(["lora", "--models-dir", str(tmp_path / "l")]) == 0
    assert_fetched(hub, tmp_path / "l", {"lora_fernando_10k.safetensors"})
    assert main(["all", "small-big", "float32", "--models-dir", str(tmp_path / "all")]) == 0
    everything = (
        ESSENTIAL["float32"]
        | variant_files("small-big", "float32")
        | CONTROLNETS
        | {"lora_fernando_10k.safetensors"}
    )
    assert_fetched(hub, tmp_path / "all", everything)


def test_python_function_is_what_the_script_calls(hub, tmp_path, capsys):
    paths = download("small-small", "float32", models_dir=tmp_path / "m")
    assert paths == [tmp_path / "m" / "stage_b_lite.safetensors", tmp_path / "m" / "stage_c_lite.safetensors"]
    assert "non-commercial" in capsys.readouterr().out  # the licence note comes first


# --- dry run and usage errors: no network at all ---------------------------------------------------------


def test_dry_run_lists_sizes_and_total_and_fetches_nothing(tmp_path, no_network, capsys):
    assert main(["essential", "big-big", "--dry-run", "--models-dir", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "m").exists()
    assert (
        "stage_c_bf16.safetensors" in out
        and "7.18 GB" in out
        and "image_encoder/model.bf16.safetensors" in out
    )
    # published sizes: 81.5 + 73.7 + 16 MB, text encoder 1.39 GB, tokenizer 4 MB, image encoder 608 MB,
    # three 1 kB configs, Stage B 3.13 GB, Stage C 7.18 GB = 12,483.2 MB
    assert "Total: 12.48 GB in 11 entries" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "say what to fetch"),
        (["essentials", "big-big"], "did you mean 'essential'"),
        (["big_big"], "did you mean 'big-big'"),
        (["big-big", "fp32"], "did you mean 'float32'"),
        (["big-big", "small-small"], "one variant per run"),
        (["big-big", "bfloat16", "float32"], "one precision per run"),
        (["float32"], "'float32' only says in which precision"),
        (["big-big", "--dryrun"], "did you mean '--dry-run'"),
        (["big-big", "--models-dir"], "expected one argument"),
    ],
)
def test_usage_errors_exit_2_with_usage_and_hint(argv, message, no_network, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: bash download_models.sh") and message in err


def test_help_says_what_essential_includes(no_network, capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for promise in (
        "text encoder",
        "tokenizer",
        "image encoder",
        "HF_TOKEN",
        "HF_ENDPOINT",
        "--dry-run",
        "non-commercial",
    ):
        assert promise in out


def test_every_download_command_line_is_valid_grammar(tmp_path, no_network, capsys):
    """The loader's error messages print files.download_command: each line must fetch its files."""
    sets = [[file] for file in files._all_files()]
    sets += [
        files._essential_files("fp32"),
        [files.STAGE_B["lite"]["bf16"], files._FILES["stage_a"]],
        list(files._CONTROLNETS.values()),
    ]
    for wanted in sets:
        for stage_b, stage_c in [(None, None), ("lite", "big"), ("big", "lite")]:
            line = files.download_command(wanted, stage_b=stage_b, stage_c=stage_c)
            argv = shlex.split(line.removeprefix("!"))  # a notebook's line runs in a shell too
            assert argv[:2] == ["bash", "download_models.sh"]
            assert main([*argv[2:], "--dry-run", "--models-dir", str(tmp_path)]) == 0, line
            listed = {
                row.split()[0].rstrip("/") for row in capsys.readouterr().out.splitlines() if row[:2] == "  "
            }
            assert {file.path for file in wanted} <= listed, line


# --- robustness ------------------------------------------------------------------------------------------


def test_dropped_connection_resumes_within_the_run(hub, tmp_path):
    data = big_file(hub, "stage_c_bf16.safetensors")
    hub.drops["stage_c_bf16.safetensors"] = 11 * MIB
    assert main(["big-big", "--models-dir", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "stage_c_bf16.safetensors").read_bytes() == data
    resumed = [None, f"bytes={10 * MIB}-"]  # huggingface_hub's retry asked for the rest only
    assert [s.range for s in hub.gets()][-2:] == resumed


def test_dropped_connection_then_outage_rerun_resumes(hub, tmp_path, capsys):
    models = tmp_path / "m"
    data = big_file(hub, "stage_c_bf16.safetensors")
    hub.drops["stage_c_bf16.safetensors"] = 11 * MIB
    hub.outage_after_drop = True
    assert main(["big-big", "--models-dir", str(models)]) == 1
    err = capsys.readouterr().err
    assert "stage_c_bf16.safetensors" in err and "resumes" in err
    assert not (models / "stage_c_bf16.safetensors").exists()  # never a partial file under the final name
    assert [p.stat().st_size for p in partials(models)] == [10 * MIB]

    hub.outage = False
    hub.seen.clear()
    assert main(["big-big", "--models-dir", str(models)]) == 0
    assert (models / "stage_c_bf16.safetensors").read_bytes() == data
    assert [s.range for s in hub.gets()] == [f"bytes={10 * MIB}-"]  # the rest of Stage C; Stage B kept
    assert partials(models) == []


def test_interrupted_run_resumes(hub, tmp_path):
    """Ctrl-C in a terminal, the stop button in Colab: SIGINT mid-file, then the same command again."""
    models = tmp_path / "m"
    data = big_file(hub, "stage_c_bf16.safetensors")
    hub.stalls["stage_c_bf16.safetensors"] = 11 * MIB
    command = [sys.executable, "-m", "cascade_helpers.download", "big-big", "--models-dir", str(models)]
    env = script_env(tmp_path, hub)
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    # The hub holds the rest of the file until the test releases it (no timer of its own), so however
    # loaded the machine, the client is still mid-file when it is interrupted.
    assert hub.stalled.wait(timeout=300)
    wait_for(lambda: sum(p.stat().st_size for p in partials(models)) >= 10 * MIB)  # its first 10 MiB chunk
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    hub.release.set()
    assert process.returncode == 130 and "run the same command again to resume" in err
    assert not (models / "stage_c_bf16.safetensors").exists()
    assert [p.stat().st_size for p in partials(models)] == [10 * MIB]

    assert main(["big-big", "--models-dir", str(models)]) == 0
    assert (models / "stage_c_bf16.safetensors").read_bytes() == data
    assert hub.gets()[-1].range == f"bytes={10 * MIB}-"


# an LFS file (checked by sha256) and a file stored in git (checked by git blob sha1)
@pytest.mark.parametrize("path", ["stage_a.safetensors", "text_encoder/config.json"])
def test_corrupted_body_is_detected_and_not_kept(hub, tmp_path, capsys, path):
    models = tmp_path / "m"
    hub.corrupt.add(path)
    assert main(["essential", "--models-dir", str(models)]) == 1
    err = capsys.readouterr().err
    assert path in err and "checksum" in err
    assert not (models / path).exists() and partials(models) == []

    hub.corrupt.clear()
    assert main(["essential", "--models-dir", str(models)]) == 0
    assert_fetched(hub, models, ESSENTIAL["bfloat16"])


def test_missing_file_404_fails_before_any_transfer(hub, tmp_path, capsys):
    hub.missing.add("previewer.safetensors")
    assert main(["essential", "big-big", "--models-dir", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "previewer.safetensors" in err and "404" in err
    assert hub.fetched_paths() == [] and local_files(tmp_path / "m") == set()


def test_401_without_token_then_success_with_hf_token(hub, tmp_path, monkeypatch, capsys):
    hub.token = "hf_fake_token"
    assert main(["lora", "essential", "--models-dir", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "401" in err and "No token was sent" in err and "HF_TOKEN" in err

    monkeypatch.setenv("HF_TOKEN", "hf_fake_token")
    assert main(["lora", "essential", "--models-dir", str(tmp_path / "m")]) == 0
    assert_fetched(hub, tmp_path / "m", ESSENTIAL["bfloat16"] | {"lora_fernando_10k.safetensors"})
    cdn_auth = {s.authorization for s in hub.seen if s.origin == "cdn"}
    assert cdn_auth == {None}  # the token never leaves the Hub


def test_complete_files_are_not_fetched_again(hub, tmp_path):
    models = tmp_path / "m"
    assert main(["essential", "big-small", "--models-dir", str(models)]) == 0
    stamps = {p: (models / p).stat().st_mtime_ns for p in local_files(models)}
    hub.seen.clear()
    assert main(["essential", "big-small", "--models-dir", str(models)]) == 0
    assert hub.fetched_paths() == []
    assert {p: (models / p).stat().st_mtime_ns for p in local_files(models)} == stamps


def test_a_file_of_the_wrong_size_is_replaced(hub, tmp_path):
    """An old interrupted wget of the official script leaves a short file under the final name."""
    models = tmp_path / "m"
    models.mkdir()
    (models / "stage_b_bf16.safetensors").write_bytes(hub.content("stage_b_bf16.safetensors")[:500])
    assert main(["big-big", "--models-dir", str(models)]) == 0
    assert_fetched(hub, models, variant_files("big-big", "bfloat16"))


def test_not_enough_disk_space_stops_before_fetching(hub, tmp_path, monkeypatch, capsys):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 1000, 1000))
    assert main(["big-big", "--models-dir", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "Not enough disk space" in err and "--models-dir" in err
    assert hub.fetched_paths() == []


# --- the bash script --------------------------------------------------------------------------------------


def script_env(tmp_path: Path, hub: FakeHub | None = None, **extra: str) -> dict[str, str]:
    """The user's environment minus tokens and offline switches, pointed at the fake hub."""
    unwanted = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k not in unwanted}
    env.update(
        HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHON=sys.executable, **extra
    )
    if hub is not None:
        env["HF_ENDPOINT"] = hub.url
    return env


def run_script(script: Path, *args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_bash_script_official_line_from_another_directory(hub, tmp_path):
    result = run_script(
        SCRIPT,
        "essential",
        "big-big",
        "bfloat16",
        "--models-dir",
        "here",
        cwd=tmp_path,
        env=script_env(tmp_path, hub),
    )
    assert result.returncode == 0, result.stderr
    assert_fetched(hub, tmp_path / "here", ESSENTIAL["bfloat16"] | variant_files("big-big", "bfloat16"))


def test_bash_script_defaults_to_models_beside_it(hub, tmp_path):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    shutil.copy(SCRIPT, checkout)
    (checkout / "cascade_helpers").symlink_to(ROOT / "cascade_helpers")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_script(
        checkout / "download_models.sh", "small-big", cwd=elsewhere, env=script_env(tmp_path, hub)
    )
    assert result.returncode == 0, result.stderr
    assert_fetched(hub, checkout / "models", variant_files("small-big", "bfloat16"))
    assert list(elsewhere.iterdir()) == []


def test_bash_script_usage_and_python_fallback(tmp_path):
    """No PYTHON set: the script finds python3 on PATH. No words: usage, exit 2."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    env = script_env(tmp_path, PATH=f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    del env["PYTHON"]
    result = run_script(SCRIPT, cwd=tmp_path, env=env)
    assert result.returncode == 2 and result.stderr.startswith("usage: bash download_models.sh")
    result = run_script(SCRIPT, "--help", cwd=tmp_path, env=env)
    assert result.returncode == 0 and "essential" in result.stdout


def test_bash_script_names_a_python_without_huggingface_hub(tmp_path):
    """A Python without site-packages (-S): one line naming it, exit 1."""
    (tmp_path / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    (tmp_path / "python3").chmod(0o755)
    env = {**script_env(tmp_path), "PYTHON": str(tmp_path / "python3")}
    result = run_script(SCRIPT, "essential", cwd=tmp_path, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "has no huggingface_hub" in result.stderr and "PYTHON=" in result.stderr
