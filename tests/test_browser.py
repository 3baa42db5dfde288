"""The text-to-image notebook and its generation panel in a real browser.

JupyterLab in headless Chromium runs every cell on the tiny models, then clicks the panel's Generate
button, as a user would. What nbval cannot see is checked here: widgets render as widgets (not as
the text ``HBox(children=...)``), the widget manager logs no error, no cell shows a traceback or an
empty output area, both progress bars fill, the pictures render and keep their aspect ratio, and the
status line names the file it saved.

It needs Debian's ``chromium`` (``apt-get install -y chromium``; ``.ci/run`` installs it) and the
``playwright`` Python package (the dev extra), which drives that browser: ``playwright install``,
its own browser download, is not needed. Elsewhere the test skips and says what to install.

The notebook runs from a copy in a temporary folder with JupyterLab's autosave off and a fresh
workspace, so executed outputs never reach the checkout. ``MPLBACKEND`` is left unset for the
kernel (``Agg`` would keep every figure out of the page).
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import PIL.Image
import pytest

ROOT = Path(__file__).parents[1]
NOTEBOOK = ROOT / "notebooks" / "text_to_image.ipynb"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
INSTALL = (
    "install Debian's chromium (`apt-get install -y chromium`) and playwright (`pip install playwright`; "
    "`playwright install` is not needed)"
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason=f"the browser test needs Chromium: {INSTALL}"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason=f"the browser test needs playwright: {INSTALL}")

RUN_ALL_TIMEOUT_S = 600
GENERATE_TIMEOUT_S = 300
#: how a widget that the page failed to render as a widget shows up
WIDGET_AS_TEXT = re.compile(
    r"\b(?:[HV]?Box|IntProgress|FloatProgress|Image|Button|HTML|Label|Output|IntSlider|FloatSlider|Dropdown"
    r"|Text|Textarea|ToggleButtons|IntText)\((?:children|value|layout|description)="
    r"|Loading widget\.\.\.|Error displaying widget"
)
#: console errors that only say the page is offline (the Colab badge's image), not that something broke
OFFLINE = re.compile(r"net::ERR_(?:NAME_NOT_RESOLVED|INTERNET_DISCONNECTED|ADDRESS_UNREACHABLE)")
#: JupyterLab settings for a run that writes nothing back: no autosave, no news, every cell in the page
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    # the default windowing leaves cells out of the page until they are scrolled to
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def _root_conftest():
    """The root conftest.py (NOTEBOOK_ENV, TINY_DIR: what CI gives every notebook), loaded by path:
    ``tests/conftest.py`` shares its module name."""
    spec = importlib.util.spec_from_file_location("_root_conftest", ROOT / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"JupyterLab exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"JupyterLab did not answer in {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def lab(tmp_path, request):
    """A JupyterLab server on a copy of the notebook, with the notebooks' CI environment; yields
    (url of the notebook, the temporary folder)."""
    conftest = _root_conftest()
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    env.update({k: v for k, v in conftest.NOTEBOOK_ENV.items() if k != "MPLBACKEND"})
    if os.environ.get("CASCADE_MODELS_DIR") == str(conftest.TINY_DIR):  # this session wrote the full set
        env["CASCADE_MODELS_DIR"] = str(conftest.TINY_DIR)
    else:
        env["CASCADE_MODELS_DIR"] = str(request.getfixturevalue("tiny_models"))
    env["CASCADE_OUTPUT_DIR"] = str(tmp_path / "outputs")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    for name, folder in (
        ("JUPYTERLAB_SETTINGS_DIR", "settings"),
        ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"),
        ("JUPYTER_CONFIG_DIR", "config"),
        ("JUPYTER_RUNTIME_DIR", "runtime"),
    ):
        env[name] = str(tmp_path / folder)
    for relative, value in LAB_SETTINGS.items():
        path = tmp_path / "settings" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    (tmp_path / "notebooks").mkdir()
    shutil.copy(NOTEBOOK, tmp_path / "notebooks" / NOTEBOOK.name)

    port, token = _free_port(), secrets.token_hex(16)
    log = tmp_path / "jupyterlab.log"
    command = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={tmp_path}",
        "--allow-root",  # CI runs as root
    ]
    with log.open("w") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for_server(f"{base}/api/status?token={token}", process, log)
        yield f"{base}/lab/tree/notebooks/{NOTEBOOK.name}?token={token}", tmp_path
    finally:
        process.terminate()  # the server shuts its kernels down
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _run_all_cells(page, cells: int) -> list[str]:
    """Open the notebook, wait for its kernel, Run > Run All Cells, wait until no cell is running
    (run-all stops at the first failing cell); return every code cell's prompt."""
    page.wait_for_function(
        f"() => document.querySelectorAll('.jp-NotebookPanel .jp-Cell').length === {cells}", timeout=120_000
    )
    page.get_by_text("| Idle").wait_for(timeout=120_000)
    page.locator(".lm-MenuBar-item", has_text="Run").click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    prompts = page.locator(".jp-CodeCell .jp-InputPrompt")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].some(p => p.innerText.includes('*'))",
        timeout=60_000,
    )
    deadline = time.monotonic() + RUN_ALL_TIMEOUT_S
    while any("*" in p for p in prompts.all_inner_texts()):
        assert time.monotonic() < deadline, f"the cells still run after {RUN_ALL_TIMEOUT_S} s"
        time.sleep(1)
    return prompts.all_inner_texts()


# the visible output areas that show nothing: no text, no picture, no widget
EMPTY_OUTPUTS = """() => [...document.querySelectorAll('.jp-OutputArea-output')].filter(o =>
    o.getBoundingClientRect().height > 4 && !o.innerText.trim()
    && !o.querySelector('img, canvas, svg, input, button, textarea, select')).length"""
PICTURE_BOX = "e => [e.naturalWidth, e.naturalHeight, e.clientWidth, e.clientHeight]"


def test_the_text_to_image_notebook_and_its_panel_in_jupyterlab(lab):
    url, folder = lab
    checkout_before = NOTEBOOK.read_bytes()
    copy = folder / "notebooks" / NOTEBOOK.name
    cells = len(json.loads(copy.read_text())["cells"])
    console = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1600, "height": 1200})
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
        try:
            page.goto(url)
            prompts = _run_all_cells(page, cells)
            outputs = page.locator(".jp-OutputArea-output").all_inner_texts()
            tracebacks = [o for o in outputs if "Traceback" in o or "---------------------------" in o]
            assert not tracebacks, f"a cell failed:\n{tracebacks[0][-3000:]}"
            unrun = [i for i, p in enumerate(prompts) if not re.fullmatch(r"\[\d+\]:", p.strip())]
            assert not unrun, f"code cells {unrun} did not run: {[prompts[i] for i in unrun]}"
            as_text = [o for o in outputs if WIDGET_AS_TEXT.search(o)]
            assert not as_text, f"a widget rendered as text (widget manager missing?): {as_text[0][:300]}"

            # the panel, found by its Generate button wherever the notebook shows it
            panel = (
                page.locator(".cascade-panel").filter(has=page.get_by_role("button", name="Generate")).first
            )
            button = panel.get_by_role("button", name="Generate")
            status = panel.locator(".cascade-status")
            before = status.inner_text()
            button.scroll_into_view_if_needed()
            button.click()
            # done: the status line changed (only the end of a run changes it) and the button is
            # enabled again (the kernel re-enables it after its last status update)
            page.wait_for_function(
                "([panel, before]) => panel.querySelector('.cascade-status').innerText !== before"
                " && ![...panel.querySelectorAll('button')].find(b => b.innerText.includes('Generate')).disabled",
                arg=[panel.element_handle(), before],
                timeout=GENERATE_TIMEOUT_S * 1000,
            )

            saved = re.search(r"saved (cascade-\d+-seed\d+-\d+\.png)", status.inner_text())
            assert saved, f"the status line names no saved file: {status.inner_text()!r}"
            assert list(folder.rglob(saved.group(1))), f"{saved.group(1)} is not on disk"
            for stage in ("stage-c", "stage-b"):
                width = panel.locator(f".cascade-progress-{stage} .progress-bar").evaluate(
                    "e => e.style.width"
                )
                assert width == "100%", f"the {stage} progress bar stopped at {width}"
            for name in ("preview", "result"):
                natural_w, natural_h, shown_w, shown_h = panel.locator(f".cascade-{name}").evaluate(
                    PICTURE_BOX
                )
                assert natural_w > 0 and shown_w > 0, f"the {name} picture did not render"
                assert abs(shown_w / shown_h - natural_w / natural_h) < 0.02, (
                    f"the {name} picture ({natural_w}×{natural_h}) is drawn {shown_w}×{shown_h}"
                )
            assert page.evaluate(EMPTY_OUTPUTS) == 0, "an empty output area is left in the notebook"
        except Exception:
            page.screenshot(path=str(folder / "failure.png"))
            print(f"screenshot: {folder / 'failure.png'}; JupyterLab log: {folder / 'jupyterlab.log'}")
            raise
        finally:
            browser.close()

    errors = [m for m in console if m.startswith(("error", "pageerror")) and not OFFLINE.search(m)]
    assert not errors, "the page logged errors:\n" + "\n".join(errors[:10])
    assert NOTEBOOK.read_bytes() == checkout_before, "the checkout's notebook was written"
    assert json.loads(copy.read_text()) == json.loads(checkout_before), (
        "JupyterLab saved the run (autosave on?)"
    )


def test_the_page_checks_can_fail():
    """The notebook test's checks, on a page made to fail them: a widget shown as text, an empty
    output area, a stretched picture (and an offline error they let pass)."""
    assert WIDGET_AS_TEXT.search("HBox(children=(VBox(children=(ToggleButtons(description='Sampler'")
    assert WIDGET_AS_TEXT.search("Error displaying widget: model not found")
    assert not WIDGET_AS_TEXT.search("Stage C: (2, 16, 24, 24)  Stage B: (2, 4, 256, 256)")
    assert OFFLINE.search("Failed to load resource: net::ERR_NAME_NOT_RESOLVED")
    page_html = """
        <div class="jp-OutputArea-output" style="height: 20px"></div>
        <div class="jp-OutputArea-output" style="height: 20px">some text</div>
        <div class="jp-OutputArea-output" style="height: 0px"></div>
        <img style="width: 30px; height: 40px" src="data:image/png;base64,{png}">
    """
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (30, 30)).save(buffer, format="PNG")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox"])
        page = browser.new_page()
        page.set_content(page_html.format(png=base64.b64encode(buffer.getvalue()).decode()))
        assert page.evaluate(EMPTY_OUTPUTS) == 1
        natural_w, natural_h, shown_w, shown_h = page.locator("img").evaluate(PICTURE_BOX)
        assert (natural_w, natural_h, shown_w, shown_h) == (30, 30, 30, 40)
        browser.close()
