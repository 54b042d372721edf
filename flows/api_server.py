"""This process's temporary Prefect API, started early and without Prefect's server code here.

With no PREFECT_API_URL, Prefect serves a flow from a temporary API server in a child process
(``SubprocessASGIServer``); to get that class it first imports ``prefect.server.api.server``
in this process: FastAPI, SQLAlchemy and the server's models, about 3.5 CPU-s for one
``Popen`` (issue 26, measured with ``python -X importtime``). Here the same child starts from
its command line alone, as soon as the command line is parsed (``start``), so that its own
start (about 5 CPU-s, on the other core) runs while this process imports lrpipe, checks the
settings and maps the data; the flow waits for its health only where it first needs the API
(``flows.common.shared_api``), then finds it in its settings as any configured API.

The child is Prefect's own command (``python -m uvicorn ... prefect.server.api.server:
create_app``) with the variables Prefect gives it: no UI, ephemeral services. It lives and dies
with this process: stopped at exit, killed if it does not stop within STOP_WAIT_S.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

# What Prefect sets for its temporary server (prefect.server.api.server.SubprocessASGIServer).
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
              "PREFECT__SERVER_FINAL": "1"}
PORT_IN_USE = 3  # uvicorn's exit status when its port was taken meanwhile: start on another
STOP_WAIT_S = 5.0
POLL_S = 0.1


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_command(port: int) -> list[str]:
    """Prefect's temporary-server command line, on ``port``."""
    package = Path(find_spec("prefect").origin).parent  # find_spec imports nothing of it
    return [sys.executable, "-m", "uvicorn", "--app-dir", str(package.parent), "--factory",
            "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port",
            str(port), "--log-level", "error", "--lifespan", "on"]


@dataclass
class TemporaryAPI:
    """One temporary API server: its child process and port."""

    port: int
    process: subprocess.Popen = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait(self, timeout_s: float) -> str:
        """The API's URL once it answers its health check.

        Raises:
            RuntimeError: it exited, or did not answer within ``timeout_s`` (the message says
                which and what to set).
        """
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            code = self.process.poll()
            if code == PORT_IN_USE:
                self.port = free_port()
                self.process = _spawn(self.port)
            elif code is not None:
                raise RuntimeError(f"the temporary Prefect API exited with status {code} "
                                   "before it answered (run with --debug, or start one: "
                                   "make server, then set PREFECT_API_URL)")
            elif time.monotonic() > deadline:
                raise RuntimeError(
                    f"the temporary Prefect API did not answer within {timeout_s:.0f} s "
                    "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")
            time.sleep(POLL_S)
        return self.url

    def stop(self) -> None:
        """Terminate the child and reap it (killed after STOP_WAIT_S)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _spawn(port: int) -> subprocess.Popen:
    return subprocess.Popen(server_command(port), env={**os.environ, **SERVER_ENV},
                            stdin=subprocess.DEVNULL)


_STARTED: list[TemporaryAPI] = []


def start() -> TemporaryAPI:
    """This process's temporary API, its child started now if it was not yet (returns at
    once; ``TemporaryAPI.wait`` waits for it). Stopped when the process exits."""
    if not _STARTED:
        port = free_port()
        _STARTED.append(TemporaryAPI(port, _spawn(port)))
        atexit.register(_STARTED[0].stop)
    return _STARTED[0]


def stop_unused() -> None:
    """Stop this process's temporary API if one was started (a configured API serves)."""
    while _STARTED:
        _STARTED.pop().stop()


def configured_url() -> str | None:
    """PREFECT_API_URL as Prefect reads it (environment or profile), or None."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url
