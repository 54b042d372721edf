"""MLflow tracking: the only module of lrpipe that imports mlflow.

The default store is sqlite under ``mlruns/`` with artifacts beside it; ``MLFLOW_TRACKING_URI``
overrides (a tracking server for several machines). Every call names its run explicitly
through ``MlflowClient``: MLflow's active run is thread-local and Prefect runs tasks on other
threads or processes, so a child run is linked to its parent by id, never by context.
Writes retry on a locked sqlite database so concurrent tasks lose nothing.
"""

from __future__ import annotations

import functools
import io
import json
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from lrpipe.config import TrainConfig, flatten

T = TypeVar("T")
DEFAULT_STORE = Path("mlruns")
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"


class TrackingError(ValueError):
    """The tracking URI or store is unusable; the message says which and why."""


def tracking_uri(store: Path | str | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<abs>/mlruns/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and store is None:
        return env
    folder = Path(store or DEFAULT_STORE).resolve()
    return f"sqlite:///{folder / 'mlflow.db'}"


def check_tracking_uri(uri: str) -> None:
    """Raise TrackingError for a malformed URI or an unwritable local store, before any run."""
    schemes = ("sqlite:///", "http://", "https://", "postgresql://", "mysql://", "file:",
               "databricks")
    if not isinstance(uri, str) or not uri.startswith(schemes):
        raise TrackingError(f"tracking_uri: got {uri!r}; allowed: sqlite:///<path>/mlflow.db, "
                            "http(s)://host:port of an MLflow server, or a database URI")
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"tracking_uri: cannot create {folder} ({exc})") from exc
        if not os.access(folder, os.W_OK):
            raise TrackingError(f"tracking_uri: {folder} is not writable; allowed: a writable "
                                "folder (fix its permissions or set MLFLOW_TRACKING_URI)")


def _is_locked(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "database is locked" in text or "database table is locked" in text


def retry_locked(fn: Callable[..., T], *args: Any, attempts: int = 12, **kwargs: Any) -> T:
    """Call ``fn``; on a locked sqlite database wait (jittered backoff) and try again."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - only lock errors are retried
            if not _is_locked(exc) or attempt == attempts - 1:
                raise
            time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


@functools.lru_cache(maxsize=8)
def _client(uri: str) -> MlflowClient:
    check_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def client(uri: str | None = None) -> MlflowClient:
    """A client for ``uri`` (default ``tracking_uri()``); creating it validates the URI."""
    return _client(uri or tracking_uri())


def experiment_id(name: str, uri: str | None = None) -> str:
    """Get or create the experiment ``name``; local stores keep artifacts under mlruns/."""
    uri = uri or tracking_uri()
    c = client(uri)
    exp = retry_locked(c.get_experiment_by_name, name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    try:
        return retry_locked(c.create_experiment, name, artifact_location=location)
    except Exception:  # another process created it first
        exp = retry_locked(c.get_experiment_by_name, name)
        if exp is None:
            raise
        return exp.experiment_id


def start_run(
    experiment: str,
    name: str,
    *,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    uri: str | None = None,
) -> str:
    """Create a RUNNING run (a child when ``parent_run_id`` is given) and return its id."""
    c = client(uri)
    all_tags = {RUN_NAME_TAG: name, **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = retry_locked(c.create_run, experiment_id(experiment, uri), tags=all_tags,
                       run_name=name)
    if params:
        log_params(run.info.run_id, params, uri=uri)
    return run.info.run_id


def log_params(run_id: str, params: Mapping[str, Any], uri: str | None = None) -> None:
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        retry_locked(client(uri).log_batch, run_id, params=items[i:i + 100])


def set_tags(run_id: str, tags: Mapping[str, Any], uri: str | None = None) -> None:
    retry_locked(client(uri).log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int,
                uri: str | None = None) -> None:
    """All metrics of one step in one transaction (one ``log_batch``), with ``step=epoch``."""
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if v is not None]
    retry_locked(client(uri).log_batch, run_id, metrics=batch)


def end_run(run_id: str, status: str = "FINISHED", uri: str | None = None) -> None:
    retry_locked(client(uri).set_terminated, run_id, status)


def log_figure(run_id: str, figure: Any, name: str, uri: str | None = None) -> None:
    """Save a matplotlib Figure as a PNG artifact ``figures/<name>.png``, then close it."""
    import matplotlib.pyplot as plt

    retry_locked(client(uri).log_figure, run_id, figure, f"figures/{name}.png")
    plt.close(figure)


def log_bytes(run_id: str, data: bytes, path: str, uri: str | None = None) -> None:
    """Write raw bytes (a GIF, a CSV) as the artifact ``path``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / Path(path).name
        local.write_bytes(data)
        folder = str(Path(path).parent) if Path(path).parent != Path(".") else None
        retry_locked(client(uri).log_artifact, run_id, str(local), folder)


def log_table(run_id: str, df: pd.DataFrame, path: str, uri: str | None = None) -> None:
    """A DataFrame as a CSV artifact (readable in the UI's artifact view)."""
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    log_bytes(run_id, buf.getvalue().encode(), path, uri=uri)


def log_text(run_id: str, text: str, path: str, uri: str | None = None) -> None:
    retry_locked(client(uri).log_text, run_id, text, path)


def run_url(run_id: str, experiment: str, uri: str | None = None,
            ui: str = "http://127.0.0.1:5000") -> str:
    """Where the run opens in the MLflow UI (runs view, not the GenAI one)."""
    exp = experiment_id(experiment, uri)
    return f"{ui}/#/experiments/{exp}/runs/{run_id}?workflowType=machine_learning"


def training_run_name(cfg: TrainConfig, prefix: str = "") -> str:
    """``lr=0.1 sgd mlp seed=0``: a name that says what the run is, the same in every flow."""
    return f"{prefix}lr={cfg.optim.lr:g} {cfg.optim.name} {cfg.model.name} seed={cfg.seed}"


@contextmanager
def training_run(
    cfg: TrainConfig,
    experiment: str,
    parent_run_id: str | None,
    *,
    name: str | None = None,
    tags: Mapping[str, str] | None = None,
    uri: str | None = None,
) -> Iterator[str]:
    """A child run for one training: params = flattened config, tag ``config_hash``.

    Yields the run id. Ends FINISHED on success and FAILED on any exception (re-raised), so no
    run is left RUNNING by an error in the body.
    """
    run_id = start_run(
        experiment, name or training_run_name(cfg), params=flatten(cfg),
        tags={"config_hash": cfg.hash(), **(tags or {})}, parent_run_id=parent_run_id, uri=uri,
    )
    try:
        yield run_id
    except BaseException:
        end_run(run_id, "FAILED", uri=uri)
        raise
    end_run(run_id, "FINISHED", uri=uri)


def epoch_logger(run_id: str, uri: str | None = None) -> Callable[[dict], None]:
    """An ``on_epoch`` hook for lrpipe.train.train that logs a History row with step=epoch."""
    keys = ("train_loss", "val_loss", "train_error", "val_error", "lr", "time_s")

    def log(row: dict) -> None:
        metrics = {k: row[k] for k in keys if k in row}
        metrics.update({k: v for k, v in row.items() if k.startswith("ratio/")})
        log_metrics(run_id, metrics, step=int(row["epoch"]), uri=uri)

    return log


def to_json(value: Any) -> str:
    return json.dumps(value, default=str)
