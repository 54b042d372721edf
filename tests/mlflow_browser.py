"""An MLflow UI server and a headless Chromium to look at it: shared by tests/test_browser.py and
docs/screenshots.py. Nothing here is a test.

Chromium is Debian's (/usr/bin/chromium, installed by tests/browser_setup.sh), driven by the
playwright package (its driver ships in the wheel; `playwright install` is never run). Flags and
the private HOME follow ../shared/FIELD_NOTES.md: without the background-networking flags it
floods the closed network, and it writes under HOME even with its own profile folder.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1200, "height": 700}


def missing_browser() -> str | None:
    """Why the browser cannot run here, or None when it can."""
    if not CHROMIUM.exists():
        return (f"{CHROMIUM} is missing: run tests/browser_setup.sh as root (apt-get install "
                "chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing: run tests/browser_setup.sh"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store_uri: str, port: int, log: Path) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:``port`` in its own process group (its workers are
    children: stop the group, not the PID)."""
    mlflow = Path(sys.executable).parent / "mlflow"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    with open(log, "wb") as out:
        return subprocess.Popen(
            [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", store_uri, "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_healthy(proc: subprocess.Popen, port: int, log: Path, timeout: float = 90.0) -> float:
    """Seconds until ``/health`` answered OK; RuntimeError (with the log's tail) if the server
    exits or ``timeout`` passes first. It took 21-26 s on this busy 2-core machine."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({proc.returncode}): "
                               f"{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.read().strip() == b"OK":
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server not healthy after {timeout:.0f} s: "
                       f"{log.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    """TERM the server's process group, KILL it after 10 s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


@contextmanager
def mlflow_ui(store_uri: str, folder: Path, port: int | None = None) -> Iterator[str]:
    """An MLflow UI on ``store_uri`` for the duration of the block; yields its base URL."""
    port = port or free_port()
    log = folder / "mlflow-server.log"
    proc = start_server(store_uri, port, log)
    try:
        wait_healthy(proc, port, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(proc)


@contextmanager
def browser_page(folder: Path) -> Iterator[object]:
    """A playwright Page in headless Chromium whose HOME, XDG folders and profile are under
    ``folder``."""
    from playwright.sync_api import sync_playwright

    home = folder / "home"
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_CACHE_HOME": str(home / ".cache"), "XDG_DATA_HOME": str(home / ".local/share")}
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(folder / "profile"), executable_path=str(CHROMIUM), headless=True, args=FLAGS,
            env=env, viewport=VIEWPORT)
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def tidy(page) -> None:
    """Close MLflow 3.17's assistant panel (open by default, a third of the width); no-op when
    it is not there."""
    button = page.get_by_role("button", name="Close")
    if button.count():
        button.first.click()


def show_columns(page, names: list[str]) -> None:
    """Toggle the runs table's columns ``names`` (attributes, metrics, params, tags) in its
    Columns menu: a visible one is hidden, a hidden one shown."""
    page.get_by_role("button", name="Columns").click()
    for name in names:
        node = page.locator(".du-bois-light-tree-treenode").filter(
            has=page.get_by_text(name, exact=True))
        node.locator(".du-bois-light-tree-checkbox").first.click()
    page.keyboard.press("Escape")


def shrink_png(path: Path, colors: int = 128) -> None:
    """Re-save a screenshot with an adaptive palette: UI screenshots lose nothing visible and
    shrink 2-4x."""
    from PIL import Image

    with Image.open(path) as img:
        small = img.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def assert_rendered(page, run_url: str, markdown: str, timeout_ms: int) -> None:
    """Every <img> of the rendered report.md loads from this UI (naturalWidth > 0), each one
    the markdown embeds, and every markdown table renders as a table (MLflow 3.17 draws it with
    its design system's table, role "table", not a <table> element), none left as pipe text."""
    from playwright.sync_api import expect

    from lrpipe import report

    ui = report.parse_run_url(run_url)[0]
    expect(page.locator("img[src*='get-artifact']")).to_have_count(markdown.count("!["),
                                                                   timeout=timeout_ms)
    body = page.locator("img[src*='get-artifact']")
    for i in range(body.count()):
        img = body.nth(i)
        assert img.get_attribute("src").startswith(f"{ui}/get-artifact?"), img.get_attribute("src")
        img.scroll_into_view_if_needed()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0",
                               arg=img.element_handle(), timeout=timeout_ms)
    tables = sum(bool(re.fullmatch(r"\|( ?:?-+:? ?\|)+", line.strip()))
                 for line in markdown.splitlines())  # one rule line under each header
    assert tables >= 1
    expect(page.get_by_role("table")).to_have_count(tables, timeout=timeout_ms)
    assert page.get_by_text(re.compile(r"^\|\s*-{3}")).count() == 0
