"""Helpers for tests that interrupt a real ``lrpipe`` command: start it in its own process
group, wait for a line of its output (never a fixed sleep), signal the group as a terminal's
Ctrl-C or a ``kill -9`` would, and read what MLflow holds afterwards."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from lrpipe import tracking

ROOT = Path(__file__).resolve().parent.parent


def start(args: list[str], uri: str, log: Path, *, api_url: str | None = None,
          extra_env: dict | None = None) -> subprocess.Popen:
    """``python -m flows.cli <args>`` in a new session, stdout to ``log``, stderr to
    ``log`` + ".err"; tracking into ``uri``. Without ``api_url`` the command starts its own
    temporary Prefect API, as a user's does (and a Ctrl-C to the group reaches it too)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, **(extra_env or {})}
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    with open(log, "w") as out, open(f"{log}.err", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env,
                                stdout=out, stderr=err, start_new_session=True)


def wait_for_output(log: Path, pattern: str, proc: subprocess.Popen, count: int = 1,
                    timeout: float = 300) -> None:
    """Until ``pattern`` (a regex) has matched ``count`` lines of ``log``; an error if the
    process ends first or ``timeout`` seconds pass."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text() if log.exists() else ""
        if sum(1 for line in text.splitlines() if regex.search(line)) >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the command exited ({proc.returncode}) before {count} lines "
                                 f"matched {pattern!r}:\n{text[-2000:]}\n"
                                 f"{Path(f'{log}.err').read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {count} lines matched {pattern!r} in {timeout} s")
        time.sleep(0.1)


def signal_group(proc: subprocess.Popen, sig: int, timeout: float = 120) -> int:
    """Send ``sig`` to the command's whole process group; its exit code."""
    os.killpg(proc.pid, sig)
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def all_runs(uri: str) -> list:
    """Every run of every experiment in the store."""
    c = tracking.client(uri)
    ids = [e.experiment_id for e in c.search_experiments()]
    return list(c.search_runs(ids, max_results=5000)) if ids else []


def by_status(runs: list) -> dict[str, int]:
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.info.status] = counts.get(run.info.status, 0) + 1
    return counts


@contextlib.contextmanager
def tracking_into(uri: str) -> Iterator[str]:
    """MLFLOW_TRACKING_URI set to ``uri`` for the block (an in-process reference run), and
    restored after."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield uri
    finally:
        if before is None:
            del os.environ["MLFLOW_TRACKING_URI"]
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before
