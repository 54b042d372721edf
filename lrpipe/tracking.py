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
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from sqlalchemy import event
from sqlalchemy.engine import Engine

from lrpipe.engine import checkpoint

T = TypeVar("T")
DEFAULT_STORE = Path("mlruns")
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
FIGURE_WRITER: list[Callable[[Callable[[], Any]], None]] = []  # set by flows.figures
_EXPERIMENT_IDS: dict[tuple[str, str], str] = {}  # (uri, name) -> id (experiment_id)


class TrackingError(ValueError):
    """The tracking URI or store is unusable; the message says which and why."""


@event.listens_for(Engine, "connect")
def _sqlite_wal(dbapi_connection: Any, _record: Any) -> None:
    """Write-ahead log for MLflow's sqlite store: a commit appends to the log instead of
    rewriting a rollback journal, and readers (the UI, other tasks) no longer block writers.
    Measured here: 100 per-epoch ``log_metrics`` calls took 0.56-0.73 s instead of 1.03-1.32 s.
    ``synchronous=NORMAL`` is safe with WAL against a killed process (a power cut may lose the
    last commits, never the database). SQLAlchemy's engines in this process are MLflow's."""
    if not isinstance(dbapi_connection, sqlite3.Connection):
        return
    try:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()
    except sqlite3.OperationalError:  # locked by another writer: this connection keeps DELETE
        pass


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
    """Get or create the experiment ``name``; local stores keep artifacts under mlruns/.
    Remembered per store for the process: an experiment's id never changes, and each lookup
    costs ~6 ms (every child run and every run link asks)."""
    uri = uri or tracking_uri()
    if (uri, name) not in _EXPERIMENT_IDS:
        _EXPERIMENT_IDS[uri, name] = _get_or_create_experiment(name, uri)
    return _EXPERIMENT_IDS[uri, name]


def _get_or_create_experiment(name: str, uri: str) -> str:
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
    """Write the run's waiting epoch metrics (``epoch_logger``), then end it with ``status``."""
    flush_metrics(run_id)
    retry_locked(client(uri).set_terminated, run_id, status)


def log_figure(run_id: str, figure: Any, name: str, uri: str | None = None) -> None:
    """Save a Figure as ``figures/<name>.png`` and close it; FIGURE_WRITER's thread if set."""
    import matplotlib.pyplot as plt

    plt.close(figure)  # out of pyplot's registry; the Figure itself still draws and saves
    path = f"figures/{name}.png"
    save = functools.partial(retry_locked, client(uri).log_figure, run_id, figure, path)
    FIGURE_WRITER[0](save) if FIGURE_WRITER else save()


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


def read_text(run_id: str, path: str, uri: str | None = None) -> str | None:
    """The text artifact ``path`` of ``run_id``, or None when the run has no such file."""
    import tempfile

    folder, _, name = path.rpartition("/")
    listed = retry_locked(client(uri).list_artifacts, run_id, folder or None)
    if not any(f.path == path for f in listed):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return Path(retry_locked(client(uri).download_artifacts, run_id, path, tmp)).read_text()


def ui_url(uri: str | None = None) -> str:
    """The MLflow UI's address, where every link starts: ``LRPIPE_UI_URL`` if set; else the
    tracking server when ``uri`` (default ``tracking_uri()``) is http(s); else ``make ui``'s
    http://127.0.0.1:$LRPIPE_UI_PORT (default 5000). TrackingError names a bad setting."""
    given, uri = os.environ.get("LRPIPE_UI_URL"), uri or tracking_uri()
    if given and (not given.startswith(("http://", "https://")) or {"?", "#"} & set(given)):
        raise TrackingError(f"LRPIPE_UI_URL: got {given!r}; allowed: http(s)://host:port[/path]")
    if given or uri.startswith(("http://", "https://")):
        return (given or uri.split("?")[0].split("#")[0]).rstrip("/")
    port = os.environ.get("LRPIPE_UI_PORT") or "5000"
    if not port.isdigit() or int(port) not in range(1, 65536):
        raise TrackingError(f"LRPIPE_UI_PORT: got {port!r}; allowed: an integer port 1-65535")
    return f"http://127.0.0.1:{int(port)}"


def run_url(run_id: str, experiment: str, uri: str | None = None, ui: str | None = None) -> str:
    """Where the run opens in the MLflow UI (runs view, not the GenAI one); ``ui``: ui_url."""
    ui = ui_url(uri) if ui is None else ui.rstrip("/")
    exp = experiment_id(experiment, uri)
    return f"{ui}/#/experiments/{exp}/runs/{run_id}?workflowType=machine_learning"


EPOCH_LOG_EVERY_S = 5.0
# Epoch metrics not yet written, per run id: (tracking URI, metrics), for end_run to write.
_WAITING: dict[str, tuple[str | None, list[Metric]]] = {}


def epoch_logger(run_id: str, uri: str | None = None,
                 every: float = EPOCH_LOG_EVERY_S) -> Callable[[dict], None]:
    """An ``on_epoch`` hook for lrpipe.engine.train.train that logs a History row with step=epoch.

    Live, at most one write every ``every`` seconds: rows wait in memory until ``every``
    seconds have passed since the last write (or since the hook was made), then go out in one
    ``log_batch``; ``end_run`` (any status) writes what still waits. A write costs ~10 ms of
    the sqlite store, more than a small model's epoch, so a run pays for at most one per
    ``every`` seconds plus one at its end, however short its epochs. A process killed
    outright loses at most the last ``every`` seconds of a run it was training (that run is
    marked KILLED and trained again on resume).
    """
    keys = ("train_loss", "val_loss", "train_error", "val_error", "lr", "time_s")
    written = [time.monotonic()]

    def log(row: dict) -> None:
        metrics = {k: row[k] for k in keys if k in row}
        metrics.update({k: v for k, v in row.items() if k.startswith(("ratio/", "lr/"))})
        now, step = int(time.time() * 1000), int(row["epoch"])
        _WAITING.setdefault(run_id, (uri, []))[1].extend(
            Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None)
        if time.monotonic() - written[0] >= every:
            flush_metrics(run_id)
            written[0] = time.monotonic()

    return log


def flush_metrics(run_id: str) -> None:
    """Write the epoch metrics of ``run_id`` that ``epoch_logger`` holds back, if any."""
    uri, waiting = _WAITING.pop(run_id, (None, []))
    for i in range(0, len(waiting), 1000):  # MLflow takes at most 1000 metrics per batch
        retry_locked(client(uri).log_batch, run_id, metrics=waiting[i:i + 1000])


STEP_METRIC = "train_loss_step"


def log_step_losses(run_id: str, step_log: pd.DataFrame, uri: str | None = None,
                    key: str = STEP_METRIC, column: str = "train_loss_smooth") -> None:
    """Log a run's step log (``TrainResult.step_log``), or any curve with a ``step`` column
    (``column``: its values), as metric ``key`` at ``step``, 1000 points per ``log_batch``
    (MLflow's most), beside the per-epoch ``train_loss``; an empty log writes nothing."""
    now = int(time.time() * 1000)
    points = [Metric(key, float(v), now, int(s))
              for s, v in zip(step_log["step"], step_log[column], strict=True)]
    for i in range(0, len(points), 1000):
        retry_locked(client(uri).log_batch, run_id, metrics=points[i:i + 1000])


def log_divergence(run_id: str, epoch: int, uri: str | None = None) -> None:
    """Mark where a run blew up: ``diverged=1`` and NaN losses at ``step=epoch``, so the UI's
    latest values and charts show the divergence instead of the last finite epoch."""
    nan = float("nan")
    log_metrics(run_id, {"diverged": 1.0, "train_loss": nan, "val_loss": nan}, step=epoch,
                uri=uri)


def to_json(value: Any) -> str:
    return json.dumps(value, default=str)


# --- model registry ---
# A registered version is engine.checkpoint's folder (state_dict.pt + model.json) stored as its
# run's ``model/`` artifacts.
# Why not mlflow.pytorch (3.17): its default "pt2" format (torch.export) needs an input example
# and loads back as an exported GraphModule without our named layers; its "pickle" format
# cloudpickles the whole module and load_model passes a pickle_module to torch.load, which
# turns weights_only off (arbitrary code on load). And mlflow's own models:/ resolution reads
# the process-global registry URI; here every lookup goes through an explicit client.

MODEL_DIR = "model"


def register_model(
    run_id: str,
    model: Any,
    name: str,
    config_hash: str,
    *,
    model_cfg: Any,
    input_shape: tuple[int, ...],
    num_classes: int,
    tags: Mapping[str, Any] | None = None,
    description: str | None = None,
    uri: str | None = None,
) -> str:
    """Log ``model``'s weights and structure on run ``run_id`` and register them as a new
    version of ``name`` tagged ``config_hash``; return ``models:/<name>/<version>``.

    The run must exist (it is not started or ended here; the caller's run context marks it
    FAILED if this raises). Raises ConfigError for a bad name.
    """
    import tempfile

    checkpoint.check_model_name(name)
    checkpoint.check_config_hash(config_hash)
    spec = checkpoint.model_spec(model_cfg, input_shape, num_classes, config_hash)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.save_model(Path(tmp), model, spec)
        retry_locked(client(uri).log_artifacts, run_id, tmp, MODEL_DIR)
    c = client(uri)
    _ensure_registered_model(name, description, uri)
    version = retry_locked(
        c.create_model_version, name, f"runs:/{run_id}/{MODEL_DIR}", run_id=run_id,
        tags={"config_hash": config_hash, **{k: str(v) for k, v in (tags or {}).items()}},
        description=description, await_creation_for=0)
    registered = f"models:/{name}/{version.version}"
    set_tags(run_id, {"registered_model": registered}, uri=uri)
    return registered


def _ensure_registered_model(name: str, description: str | None, uri: str | None) -> None:
    from mlflow.exceptions import MlflowException

    try:
        retry_locked(client(uri).create_registered_model, name, description=description)
    except MlflowException as exc:  # another run (or process) registered it first
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def find_registered(name: str, config_hash: str, uri: str | None = None) -> str | None:
    """The newest READY version of ``name`` tagged ``config_hash`` whose files still exist,
    as ``models:/<name>/<version>``; None if there is none (or no such registered model)."""
    checkpoint.check_model_name(name)
    checkpoint.check_config_hash(config_hash)
    c = client(uri)
    found = retry_locked(c.search_model_versions,
                         f"name = '{name}' and tags.config_hash = '{config_hash}'")
    for version in sorted(found, key=lambda v: int(v.version), reverse=True):
        if version.status == "READY" and _has_model_files(version.run_id, uri):
            return f"models:/{name}/{version.version}"
    return None


def _has_model_files(run_id: str | None, uri: str | None) -> bool:
    from mlflow.exceptions import MlflowException

    if not run_id:
        return False
    try:
        files = {Path(f.path).name for f in client(uri).list_artifacts(run_id, MODEL_DIR)}
    except (MlflowException, OSError):  # run or artifact folder deleted since registration
        return False
    return checkpoint.has_model_files(files)


def load_registered(model_uri: str, device: Any = "cpu", uri: str | None = None) -> Any:
    """Rebuild the nn.Sequential registered at ``model_uri`` (``models:/name/version`` or
    ``models:/name@alias``) on ``device``; weights are read with ``weights_only=True``.

    Raises ValueError for a malformed URI or files that are not lrpipe's format, and
    MlflowException for an unknown name, version or alias.
    """
    import tempfile

    import mlflow.artifacts

    name, version, alias = checkpoint.parse_model_uri(model_uri)
    c = client(uri)
    if alias is not None:
        version = retry_locked(c.get_model_version_by_alias, name, alias).version
    source = retry_locked(c.get_model_version_download_uri, name, version)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=tmp, tracking_uri=uri or tracking_uri()))
        return checkpoint.load_model(local, device, model_uri)


def run_history(run_id: str, uri: str | None = None) -> pd.DataFrame:
    """A run's metric histories as one row per step: column ``epoch`` (the step) and one
    column per metric, in train()'s column order; rebuilds a History from MLflow."""
    c = client(uri)
    keys = [k for k in retry_locked(c.get_run, run_id).data.metrics if k != STEP_METRIC]
    columns = {key: {m.step: m.value for m in retry_locked(c.get_metric_history, run_id, key)}
               for key in keys}
    first = ("train_loss", "val_loss", "train_error", "val_error", "lr", "time_s")
    order = [k for k in first if k in columns] + sorted(k for k in columns if k not in first)
    history = pd.DataFrame({k: columns[k] for k in order}).sort_index()
    if "diverged" in history:  # the NaN mark log_divergence adds is not an evaluated epoch
        history = history[history["diverged"] != 1.0].drop(columns="diverged")
    return history.rename_axis("epoch").reset_index()


def run_step_log(run_id: str, uri: str | None = None) -> pd.DataFrame:
    """A run's step log (``log_step_losses``) back as rows: step, train_loss_smooth; empty
    when it kept none."""
    points = retry_locked(client(uri).get_metric_history, run_id, STEP_METRIC)
    return pd.DataFrame({"step": [int(m.step) for m in points],
                         "train_loss_smooth": [float(m.value) for m in points]})
