"""Wiring shared by the flows: task runners, one Prefect API for process workers, per-process
data cache, threads, checks before any run, and progress as tasks finish (the training task
is ``flows.children.train_children``)."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from lrpipe.engine.config import (
    ConfigError,
    DataConfig,
    TrainConfig,
    check_number,
    is_plugin,
)
from lrpipe.engine.data import Dataset, load_data
from lrpipe.engine.loop import Stopped, stop_requested
from lrpipe.engine.models import build_model
from lrpipe.engine.optim import make_optimizer
from lrpipe.engine.plugins import DATA_FIELD, MODEL_FIELD
from lrpipe.engine.train import resolve_device

RUNNERS = ("threads", "dask", "serial")
PROCESS_RUNNERS = ("dask",)  # and every tcp:// address
# Resources each task asks of a Dask worker, e.g. "GPU=1" with workers started as
# `CUDA_VISIBLE_DEVICES=0 dask worker tcp://... --nthreads 1 --resources GPU=1`: one task per GPU.
RESOURCES_ENV = "LRPIPE_DASK_RESOURCES"
# Persisted task results for Prefect's cache; a Path, since a string is read as a block name.
RESULTS = Path(os.environ.get("PREFECT_HOME", ".prefect")).resolve() / "results"


def cores() -> int:
    """CPU cores this process may use (the affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def check_runner(runner: str) -> None:
    if runner in RUNNERS or (isinstance(runner, str) and runner.startswith("tcp://")):
        return
    raise ConfigError(f"runner: got {runner!r}; allowed: {', '.join(RUNNERS)}, or a Dask "
                      "scheduler address tcp://host:port")


def check_workers(workers: int | None) -> None:
    """None (one per core) or an integer >= 1; 0 must not silently mean 'default'."""
    if workers is not None:
        check_number("workers", workers, low=1, integer=True)


def is_process_runner(runner: str) -> bool:
    return runner in PROCESS_RUNNERS or runner.startswith("tcp://")


def make_task_runner(runner: str = "threads", workers: int | None = None):
    """threads (default): one thread per task in this process, torch threads split among them;
    dask: a local Dask cluster of single-threaded worker processes on 127.0.0.1; tcp://...: an
    existing Dask scheduler; serial: one task at a time."""
    check_runner(runner)
    check_workers(workers)
    workers = workers or cores()
    if runner == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if runner == "serial":
        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask import DaskTaskRunner

    # distributed's INFO chatter (about 40 lines a sweep) would bury the [k/N] progress lines.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if runner == "dask":
        return DaskTaskRunner(cluster_kwargs={
            "n_workers": workers, "threads_per_worker": 1, "processes": True,
            "host": "127.0.0.1", "dashboard_address": None})
    return DaskTaskRunner(address=runner)


def parallel_tasks(runner: str, workers: int | None) -> int:
    """How many tasks run at once: 1 for serial, else ``workers`` (default one per core)."""
    return 1 if runner == "serial" else (workers or cores())


def set_torch_threads(runner: str, workers: int | None) -> int:
    """Threads per task so that tasks x threads <= cores (oversubscription is 8-26x slower);
    a Dask worker runs one task at a time on one torch thread."""
    if is_process_runner(runner):
        threads = 1
    else:
        threads = max(1, cores() // parallel_tasks(runner, workers))
    torch.set_num_threads(threads)
    return threads


def parse_resources(text: str | None) -> dict[str, float]:
    """``"GPU=1,MEM=4e9"`` -> ``{"GPU": 1.0, "MEM": 4e9}``; empty or None -> {}."""
    out: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, sep, amount = item.partition("=")
        try:
            out[name.strip()] = float(amount)
        except ValueError:
            sep = ""
        if not sep or not name.strip() or out[name.strip()] <= 0:
            raise ConfigError(f"{RESOURCES_ENV}: got {text!r}; allowed: NAME=amount pairs "
                              "separated by commas, amounts > 0, e.g. GPU=1")
    return out


def task_resources(runner: str):
    """A context in which submitted tasks ask Dask workers for ``$LRPIPE_DASK_RESOURCES``
    (the scheduler then runs a task only on a worker holding them); no-op for threads."""
    resources = parse_resources(os.environ.get(RESOURCES_ENV))
    if not resources or not is_process_runner(runner):
        return nullcontext()
    import dask

    return dask.annotate(resources=resources)


@contextmanager
def shared_api(runner: str) -> Iterator[str | None]:
    """The Prefect API for a flow call: one API for the flow and all its worker processes, and
    no flow heartbeats where the API is this process's own.

    With no PREFECT_API_URL, the flow is served by this process's temporary API server
    (``flows.api_server``: started when the command line was parsed, or now), which lives and
    dies with this process; it is waited for here and put in the settings for the flow call,
    so that Prefect never imports its server code in this process (3.5 CPU-s). Heartbeats
    exist so that a server which outlives a crashed flow can tell; this one cannot outlive
    it, and Prefect joins its heartbeat thread, which sleeps in 1 s slices, at the end of every
    flow call: about 1 s of wall time per flow, for nothing. So they are switched off here;
    with a configured API (``make server``, schedules, a cluster) they stay on.

    Process runners also get the URL in PREFECT_API_URL before the workers spawn; otherwise
    each worker would start its own server on the same database (slow and fragile,
    FIELD_NOTES). Yields the API URL (None for threads).

    Figures the flow logs are written on a background thread meanwhile, all of them by the
    time the block ends (``flows.figures.in_background``).
    """
    from flows import api_server, figures

    url, processes = api_server.configured_url(), is_process_runner(runner)
    if url:
        api_server.stop_unused()  # started before Prefect loaded, in case none was set
        with figures.in_background(), _exported_api(url) if processes else nullcontext():
            yield url if processes else None
        return
    own = api_server.start().wait(float(os.environ.get(
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")))
    with figures.in_background(), _exported_api(own, environ=processes), _without_heartbeats():
        yield own if processes else None


@contextmanager
def _exported_api(url: str, environ: bool = True) -> Iterator[str]:
    """``url`` in the settings and, with ``environ``, in PREFECT_API_URL for worker processes
    to inherit; the environment is restored after."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    before = os.environ.get("PREFECT_API_URL")
    if environ:
        os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before


def _without_heartbeats():
    """The current Prefect settings with flow heartbeats off, as a context. A model copy:
    ``temporary_settings`` would rebuild every setting from the environment (~80 ms)."""
    import prefect.context

    current = prefect.context.get_settings_context()
    flows = current.settings.flows.model_copy(update={"heartbeat_frequency": None})
    return prefect.context.SettingsContext(
        profile=current.profile, settings=current.settings.model_copy(update={"flows": flows}))


@functools.lru_cache(maxsize=8)
def _dataset(data_cfg: DataConfig, device: str) -> Dataset:
    return load_data(data_cfg, device)


def dataset_for(cfg: TrainConfig) -> Dataset:
    """The run's dataset, loaded once per process and device and shared by its tasks."""
    return _dataset(cfg.data, str(resolve_device(cfg.device)))


def preflight(cfgs: list[TrainConfig]) -> None:
    """Check, before any run is recorded, what only the data and model can tell: the device
    exists, the dataset loads (DataUnavailable otherwise), the batch fits the training split,
    and the optimizer builds (lr_mult names real layers, rprop has no weight decay...). The
    model is built on the meta device: no memory, no weights drawn. Data stays cached for
    thread tasks."""
    for cfg in cfgs:
        data = dataset_for(cfg)
        if cfg.batch_size > len(data.train):
            raise ConfigError(f"batch_size: got {cfg.batch_size}; allowed: <= {len(data.train)} "
                              f"(training examples of {cfg.data.dataset})")
        with torch.device("meta"):
            model = build_model(cfg.model, data.input_shape, data.num_classes)
        make_optimizer(model, cfg.optim)
        if is_plugin(cfg.model.name):
            check_plugin_output(cfg, data)


def check_plugin_output(cfg: TrainConfig, data: Dataset) -> None:
    """A user's model must map a batch of the run's inputs to one score per class: checked
    on two real examples before anything is recorded, with the flag's name in the error."""
    model = build_model(cfg.model, data.input_shape, data.num_classes).to(data.train.x.device)
    x = data.train.x[:2]
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's forward is the message
        raise ConfigError(f"{MODEL_FIELD}: {cfg.model.name} fails on {DATA_FIELD}'s inputs of "
                          f"shape {tuple(x.shape)}: {type(exc).__name__}: {exc}") from None
    if tuple(out.shape) != (len(x), data.num_classes):
        raise ConfigError(f"{MODEL_FIELD}: {cfg.model.name} maps inputs {tuple(x.shape)} to "
                          f"{tuple(out.shape)}; allowed: ({len(x)}, {data.num_classes}), one "
                          f"score per class of {cfg.data.dataset}")


def describe_result(result: dict) -> str:
    """One line about a finished training task: its selection figures only. A run scored on
    the test split (it has ``test_loss``) says so; its test figure is reported once, summarized
    over its seeds (``flows.tested.log_test``)."""
    tested = "test_loss" in result
    if result["status"] == "diverged":
        line = f"{result['name']} diverged in epoch {result['diverged_epoch']}" + (
            ": not tested" if tested else "")
    else:
        line = (f"{result['name']} done: val loss {result['val_loss']:.4f}, "
                f"val error {result['val_error']:.4f}") + (
            "; test set scored once" if tested else "")
    return line + (" (finished before, reused)" if result.get("reused") else "")


def history_records(history: pd.DataFrame, **extra: Any) -> list[dict]:
    return [{**extra, **row} for row in history.to_dict("records")]


def epoch_printer(name: str, epochs: int):
    """An on_epoch hook printing one self-contained line per epoch (readable when interleaved)."""

    import math

    from lrpipe.engine.progress import METER

    def show(row: dict) -> None:
        ended = not (math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"]))
        left = METER.epoch(name, int(row["epoch"]), epochs, ended=ended)  # "" until timed
        print(f"  {name:<28} epoch {int(row['epoch']):>3}/{epochs}  train {row['train_loss']:.4f}"
              f"  val {row['val_loss']:.4f}  val error {row['val_error']:.4f}"
              f"{'  ' + left if left else ''}", flush=True)

    return show


def both(*hooks):
    def call(row: dict) -> None:
        for hook in hooks:
            hook(row)

    return call


PROGRESS_EVERY_S = 5.0


STOP_GRACE_S = 5.0  # after a stop, how long the tasks already training get to end


def collect(futures, label: str, describe=None) -> list:
    """Wait for mapped tasks as they finish, printing ``[k/N]`` lines and updating a Prefect
    progress artifact (at most every ``PROGRESS_EVERY_S`` seconds, and at the end: each update
    is an API call and two events for Prefect's server, about a third of a sweep's events when
    made per task); results come back in submission order.

    A failed task does not stop the others: every task is waited for (its run is recorded),
    then the first failure is raised; a re-run resumes, training only what did not finish.
    After a stop (Ctrl-C, SIGTERM: ``lrpipe.engine.loop.stop_requested``) the tasks that were
    training end within a step; those not started are not waited for, and ``Stopped`` is
    raised once the others ended or ``STOP_GRACE_S`` passed.
    """
    from lrpipe.engine.progress import METER, stage_line

    futures = list(futures)
    total = len(futures)
    METER.start_stage(label, total)
    print(stage_line(label, total), flush=True)
    artifact = create_progress_artifact(0.0, key=f"{label}-progress",
                                        description=f"{label}: tasks finished")
    index = {f.task_run_id: i for i, f in enumerate(futures)}
    results: list = [None] * total
    failures: list[BaseException] = []
    updated = time.monotonic()
    remaining, finished, stop_deadline = set(futures), 0, None
    while remaining:
        done, remaining = wait(list(remaining), timeout=0.5)
        for future in done:
            finished += 1
            note = _record(future, index, results, failures, describe)
            if finished == total or time.monotonic() - updated >= PROGRESS_EVERY_S:
                update_progress_artifact(artifact, 100.0 * finished / total)
                updated = time.monotonic()
            left = METER.task_done()  # ~N min left, once an epoch or a task is timed
            print(f"[{finished}/{total}] {label}: {note}{f'  ({left})' if left else ''}",
                  flush=True)
        if stop_requested():
            stop_deadline = stop_deadline or time.monotonic() + STOP_GRACE_S
            if time.monotonic() > stop_deadline or not done:
                raise Stopped(f"{label}: stopped with {len(remaining)} of {total} tasks left")
    if failures:
        print(f"{label}: {len(failures)} of {total} tasks failed; re-run to resume", flush=True)
        raise failures[0]
    return results


def _record(future, index: dict, results: list, failures: list, describe) -> str:
    """Store a finished task's result (or its failure); the note for its progress line."""
    try:
        result = future.result()
    except Exception as exc:  # noqa: BLE001 - reported, then re-raised after the rest
        failures.append(exc)
        return f"FAILED: {type(exc).__name__}: {exc}"
    results[index[future.task_run_id]] = result
    return describe(result) if describe else ""
