"""A persistent Prefect server for schedules: ``python -m flows.server start|stop|status``.

The ephemeral API that flows start on their own cannot schedule (FIELD_NOTES), so
``lrpipe schedule`` needs a real ``prefect server start``. It binds 127.0.0.1 unless told
otherwise, runs in its own session (setsid) so that stopping it stops every process it
started (SIGTERM to the ``prefect server start`` pid alone leaves a child answering), and
keeps its pid and log under ``$PREFECT_HOME`` (.prefect/). Start-up waits until the API
answers ``/api/health``, for a bounded time.

Its port is ``--port`` (``make server PORT=4277``), else ``PREFECT_SERVER_API_PORT`` (Prefect's
own setting), else 4200. ``prefect server start --port N`` alone serves a UI that still calls
``$PREFECT_API_URL`` or 127.0.0.1:4200 ("Can't connect to Server API"), so the server is started
with ``PREFECT_UI_API_URL``, ``PREFECT_API_URL`` and ``PREFECT_SERVER_API_HOST/PORT`` all naming
the address it binds.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4200
START_TIMEOUT_S = 180.0  # a fresh database migrates first: 15-60 s on a busy 2-core machine
STOP_TIMEOUT_S = 20.0


def state_dir() -> Path:
    import flows  # noqa: F401  (sets PREFECT_HOME to the project's .prefect/)

    return Path(os.environ["PREFECT_HOME"])


def pid_file(port: int) -> Path:
    return state_dir() / f"server-{port}.pid"


def api_url(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    return f"http://{host}:{port}/api"


def ui_url(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    return f"http://{host}:{port}"


WILDCARDS = ("0.0.0.0", "::", "")  # bind every interface: a browser must be told a real name


def ui_api_url(host: str, port: int) -> str:
    """The API URL the server's UI calls from the browser: its own address, or this machine's
    name where it binds every interface."""
    return api_url(socket.gethostname() if host in WILDCARDS else host, port)


def server_env(host: str, port: int) -> dict[str, str]:
    """The Prefect settings for a server on host:port whose UI calls that same server."""
    return {"PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_API_URL": api_url(host, port), "PREFECT_UI_API_URL": ui_api_url(host, port)}


def local_port(url: str) -> int | None:
    """The port of ``url`` when it is a Prefect API on this machine (http://127.0.0.1 or
    localhost, path /api) that this module could start; else None."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost") or \
            parts.path.rstrip("/") != "/api":
        return None
    return parts.port or 80


def default_port(env: dict | None = None) -> int:
    """``PREFECT_SERVER_API_PORT`` if set (checked), else 4200."""
    env = os.environ if env is None else env
    given = env.get("PREFECT_SERVER_API_PORT")
    return check_port(int(given) if given and given.isdigit() else given or DEFAULT_PORT,
                      "PREFECT_SERVER_API_PORT")


def healthy(url: str, timeout: float = 2.0) -> bool:
    """Whether the Prefect API at ``url`` (…/api) answers its health check."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as reply:
            return reply.status == 200
    except OSError:
        return False


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` still runs (zombies do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop_group(pgid: int, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group, wait (bounded), then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and group_alive(pgid):
            time.sleep(0.2)
        if not group_alive(pgid):
            return


def check_port(port, name: str = "port") -> int:
    from lrpipe.engine.config import check_number

    check_number(name, port, low=1, high=65535, integer=True)
    return port


def start(host: str = DEFAULT_HOST, port: int | None = None, timeout: float = START_TIMEOUT_S,
          env: dict | None = None) -> str:
    """Start ``prefect server start`` on host:port (default ``default_port()``) unless one
    answers there already, its UI calling that same API (``server_env``); wait until healthy
    and return its API URL. Raises RuntimeError if it exits or stays silent."""
    port = default_port() if port is None else port
    url = api_url(host, check_port(port))
    if healthy(url):
        return url
    stop(port)  # a stale pid file from a server that died or hangs
    state_dir().mkdir(parents=True, exist_ok=True)
    log = state_dir() / f"server-{port}.log"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host,
           "--port", str(port)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **server_env(host, port), **(env or {})})
    pid_file(port).write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while not healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(port)
            why = (f"exited with code {proc.returncode}" if proc.returncode is not None
                   else f"did not answer within {timeout:.0f} s")
            raise RuntimeError(f"prefect server on {host}:{port} {why}; see {log}")
        time.sleep(0.5)
    return url


def stop(port: int | None = None) -> bool:
    """Stop the server started on ``port`` (default ``default_port()``; its whole process
    group); False if none was."""
    file = pid_file(default_port() if port is None else port)
    if not file.exists():
        return False
    pgid = int(file.read_text().strip())
    running = group_alive(pgid)
    if running:
        stop_group(pgid)
    file.unlink(missing_ok=True)
    return running


def status(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    url = api_url(host, port)
    if healthy(url):
        return f"running: {ui_url(host, port)} (API {url})"
    file = pid_file(port)
    pid = file.read_text().strip() if file.exists() else ""
    if pid and group_alive(int(pid)):
        return f"starting or not answering (pid {pid}, log {file.with_suffix('.log')})"
    return "stopped"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=None,
                        help="port (default $PREFECT_SERVER_API_PORT, else 4200)")
    args = parser.parse_args(argv)
    args.port = default_port() if args.port is None else check_port(args.port)
    if args.action == "start":
        url = start(args.host, args.port)
        print(f"Prefect server: {ui_url(args.host, args.port)}  (export PREFECT_API_URL={url}; "
              f"stop with `python -m flows.server stop --port {args.port}`)")
    elif args.action == "stop":
        print("stopped" if stop(args.port) else "no server was running on that port")
    else:
        print(status(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
