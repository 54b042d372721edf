"""Exit codes and the preflight checks of everything outside the process that need no MLflow.

Every ``lrpipe`` command ends with one of ``ExitCode``'s statuses. Before any run is recorded,
the command checks the services it will talk to (a Dask scheduler, a Prefect API, an MLflow
server), the disk it will write to and the local tracking database's file, each with a short
timeout; a failed check is a ``ServiceError`` whose message is one line naming the thing and
what to do. A new local store is created under a lock (``create_store``) by a first use
through ``lrpipe.tracking``, the one module that imports MLflow.
"""

from __future__ import annotations

import fcntl
import os
import resource
import shutil
import socket
import sqlite3
import urllib.error
import urllib.request
from collections.abc import Callable
from enum import IntEnum
from pathlib import Path

from lrpipe.engine.config import ConfigError

# Seconds a preflight waits for a service to answer: long enough for a loaded machine on the
# same network, short enough that a dead address costs the user one blink, not minutes.
SERVICE_TIMEOUT_S = 3.0
# MLflow refuses experiment names longer than this (mlflow.utils.validation).
MAX_EXPERIMENT_NAME = 500
# Disk a run may write (history table, figures, a registered model), bytes: the largest of
# the 51 runs' artifact folders in this repository's mlruns/ held 0.9 MiB (a sweep parent's
# figures ~0.2 MiB), so 4 MiB leaves a margin for bigger models.
BYTES_PER_RUN = 4 * 2**20
# Room kept for the tracking database itself to grow during the work, bytes.
STORE_HEADROOM_BYTES = 64 * 2**20


class ExitCode(IntEnum):
    """The statuses of the ``lrpipe`` command (README, Troubleshooting).

    A stop asked by the user exits 128 + the signal (130 Ctrl-C, 143 SIGTERM), as shells
    report a command killed by that signal."""

    OK = 0
    WORK_FAILED = 1  # a failure during the work: runs recorded so far are kept
    BAD_INPUT = 2  # a setting, flag or file the user gave: nothing was recorded
    SERVICE = 3  # an unreachable or broken service, store or disk: nothing was recorded


class ServiceError(RuntimeError):
    """A service, store or disk the command needs is unreachable or broken (exit 3). The
    message is one line: the thing, what is wrong, and what to do."""


def check_experiment_name(name: object) -> None:
    """A ConfigError unless ``name`` is a non-empty string MLflow accepts as an experiment."""
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_EXPERIMENT_NAME:
        shown = name if not isinstance(name, str) or len(name) <= 40 else name[:40] + "..."
        size = f" ({len(name)} characters)" if isinstance(name, str) else ""
        raise ConfigError(f"experiment: got {shown!r}{size}; allowed: a non-empty name of at "
                          f"most {MAX_EXPERIMENT_NAME} characters")


def check_http(name: str, url: str, fix: str, timeout: float = SERVICE_TIMEOUT_S) -> None:
    """A ServiceError unless ``url`` answers an HTTP GET within ``timeout`` seconds with a
    status below 500 (any answer means the server is up; a 5xx means it is broken)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServiceError(f"{name}: {url} does not answer ({reason}); {fix}") from None
    if status >= 500:
        raise ServiceError(f"{name}: {url} answers HTTP {status}; {fix}")


def check_tcp(name: str, address: str, fix: str, timeout: float = SERVICE_TIMEOUT_S) -> None:
    """A ServiceError unless ``scheme://host:port`` accepts a TCP connection in time."""
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{name}: got {address!r}; allowed: tcp://host:port")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ServiceError(f"{name}: {address} does not answer ({exc.strerror or exc}); "
                           f"{fix}") from None


def check_disk(folder: Path, runs: int, existing: int = 0) -> None:
    """A ServiceError unless ``folder`` is writable and has room for ``runs`` runs'
    artifacts plus the store's headroom, and the process's file size limit (``ulimit -f``)
    lets the store (now ``existing`` bytes) grow by that headroom."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".lrpipe-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"\0" * 4096)
    except OSError as exc:
        raise ServiceError(f"artifacts: cannot write in {folder} ({exc.strerror or exc}); "
                           "free space or fix permissions, or set MLFLOW_TRACKING_URI to a "
                           "writable store") from None
    finally:
        probe.unlink(missing_ok=True)
    need = runs * BYTES_PER_RUN + STORE_HEADROOM_BYTES
    free = shutil.disk_usage(folder).free
    if free < need:
        raise ServiceError(f"artifacts: {folder} has {free / 2**20:.0f} MiB free; the planned "
                           f"{runs} run(s) need about {need / 2**20:.0f} MiB; free space or set "
                           "MLFLOW_TRACKING_URI to a store on another disk")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    grow = existing + STORE_HEADROOM_BYTES
    if limit != resource.RLIM_INFINITY and limit < grow:
        raise ServiceError(f"artifacts: the file size limit (ulimit -f) is {limit // 1024} "
                           f"KiB; the store needs files of {grow // 1024} KiB or more; raise "
                           "it (ulimit -f unlimited)")


def sqlite_revision(path: Path, timeout: float = SERVICE_TIMEOUT_S) -> str | None:
    """The schema revision (alembic) of the sqlite database at ``path``, None for a new or
    empty one; a ServiceError if it does not open or fails sqlite's integrity check."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    fix = (f"move it aside (mv {path} {path}.broken) and run `make setup` for a new store, "
           "or set MLFLOW_TRACKING_URI to another one")
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout) as db:
            verdict = db.execute("PRAGMA quick_check").fetchone()[0]
            if verdict != "ok":
                raise ServiceError(f"tracking store: {path} is corrupted ({verdict}); {fix}")
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
            if "alembic_version" not in tables:
                return None
            row = db.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.DatabaseError as exc:
        if "locked" in str(exc):  # a writer holds it: it opens, the store's own retries wait
            return None
        raise ServiceError(f"tracking store: {path} is unreadable ({exc}); {fix}") from None
    return row[0] if row else None


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, None for any other store."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def check_store(uri: str, timeout: float = SERVICE_TIMEOUT_S) -> None:
    """A ServiceError (one line: the store, what is wrong, what to do) unless the tracking
    store at ``uri`` can be used: a sqlite file opens and passes sqlite's integrity check (or
    does not exist yet: ``create_store`` makes it); a server answers its health check within
    ``timeout`` seconds. Other databases are left to MLflow."""
    path = sqlite_path(uri)
    if path is not None:
        sqlite_revision(path, timeout)
    elif uri.startswith(("http://", "https://")):
        check_http("tracking server", uri.rstrip("/") + "/health",
                   "start it (make server) or unset MLFLOW_TRACKING_URI", timeout)


def create_store(uri: str, open_store: Callable[[], object]) -> None:
    """Create and migrate a sqlite store once: ``open_store`` (a first use of the store,
    which makes MLflow create and migrate it) runs under a file lock beside the database, so
    any number of commands may start together on a new store (MLflow's own first-use
    migration races: ``table _alembic_tmp_experiments already exists``). A store of an older
    schema is a ServiceError saying how to upgrade it. Other stores: ``open_store`` only."""
    path = sqlite_path(uri)
    try:
        if path is None:
            open_store()
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / (path.name + ".init-lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            open_store()
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "out-of-date database schema" not in text:
            raise
        raise ServiceError(f"tracking store: {path or uri}: {text.rstrip('.')}; upgrade it "
                           f"(mlflow db upgrade {uri}) or set MLFLOW_TRACKING_URI to another "
                           "store") from None
