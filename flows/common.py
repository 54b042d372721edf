"""Wiring shared by the flows: task runners, per-process data cache, threads, the train task."""

from __future__ import annotations

import functools
import os
from typing import Any

import pandas as pd
import torch
from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from lrpipe import tracking
from lrpipe.config import ConfigError, DataConfig, TrainConfig, from_dict
from lrpipe.data import Dataset, load_data
from lrpipe.train import resolve_device, train

RUNNERS = ("threads", "dask", "serial")


def cores() -> int:
    """CPU cores this process may use (the affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def check_runner(runner: str) -> None:
    if runner in RUNNERS or (isinstance(runner, str) and runner.startswith("tcp://")):
        return
    raise ConfigError(f"runner: got {runner!r}; allowed: {', '.join(RUNNERS)}, or a Dask "
                      "scheduler address tcp://host:port")


def make_task_runner(runner: str = "threads", workers: int | None = None):
    """threads (default): one thread per task in this process, torch threads split among them;
    dask: a local Dask cluster of single-threaded worker processes; tcp://...: an existing Dask
    scheduler; serial: one task at a time."""
    check_runner(runner)
    workers = workers or cores()
    if runner == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if runner == "serial":
        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask import DaskTaskRunner

    if runner == "dask":
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    return DaskTaskRunner(address=runner)


def set_torch_threads(runner: str, workers: int | None) -> int:
    """Threads per task so that tasks x threads <= cores (oversubscription is 8-26x slower)."""
    parallel = 1 if runner == "serial" else (workers or cores())
    threads = max(1, cores() // max(1, parallel))
    torch.set_num_threads(threads)
    return threads


@functools.lru_cache(maxsize=8)
def _dataset(data_cfg: DataConfig, device: str) -> Dataset:
    return load_data(data_cfg, device)


def dataset_for(cfg: TrainConfig) -> Dataset:
    """The run's dataset, loaded once per process and device and shared by its tasks."""
    return _dataset(cfg.data, str(resolve_device(cfg.device)))


def describe_result(result: dict) -> str:
    """One line about a finished training task."""
    if result["status"] == "diverged":
        return f"{result['name']} diverged in epoch {result['diverged_epoch']}"
    return (f"{result['name']} done: val loss {result['val_loss']:.4f}, "
            f"val error {result['val_error']:.4f}")


def history_records(history: pd.DataFrame, **extra: Any) -> list[dict]:
    return [{**extra, **row} for row in history.to_dict("records")]


def epoch_printer(name: str, epochs: int):
    """An on_epoch hook printing one self-contained line per epoch (readable when interleaved)."""

    def show(row: dict) -> None:
        print(f"  {name:<28} epoch {int(row['epoch']):>3}/{epochs}  train {row['train_loss']:.4f}"
              f"  val {row['val_loss']:.4f}  val error {row['val_error']:.4f}", flush=True)

    return show


def both(*hooks):
    def call(row: dict) -> None:
        for hook in hooks:
            hook(row)

    return call


def collect(futures, label: str, describe=None) -> list:
    """Wait for mapped tasks as they finish, printing ``[k/N]`` lines and updating a Prefect
    progress artifact; results come back in submission order."""
    futures = list(futures)
    total = len(futures)
    artifact = create_progress_artifact(0.0, key=f"{label}-progress",
                                        description=f"{label}: tasks finished")
    index = {f.task_run_id: i for i, f in enumerate(futures)}
    results: list = [None] * total
    for done, future in enumerate(as_completed(futures), start=1):
        result = future.result()
        results[index[future.task_run_id]] = result
        update_progress_artifact(artifact, 100.0 * done / total)
        note = describe(result) if describe else ""
        print(f"[{done}/{total}] {label}: {note}", flush=True)
    return results


@task(name="train", task_run_name="train {name}")
def train_and_log(
    cfg_dict: dict, parent_run_id: str, experiment: str, name: str, threads: int = 1,
    tags: dict | None = None,
) -> dict:
    """Train one config as one MLflow child run; return its final metrics and history rows."""
    # torch's intra-op thread count is per OS thread under OpenMP: set it in the task's thread.
    torch.set_num_threads(threads)
    cfg = from_dict(cfg_dict)
    data = dataset_for(cfg)
    with tracking.training_run(cfg, experiment, parent_run_id, name=name, tags=tags) as run_id:
        result = train(cfg, data, on_epoch=both(tracking.epoch_logger(run_id),
                                                 epoch_printer(name, cfg.epochs)))
        tracking.set_tags(run_id, {"status": result.status, "device": result.device,
                                   "diverged_epoch": result.diverged_epoch or ""})
    return {"run_id": run_id, "name": name, "lr": cfg.optim.lr, "seed": cfg.seed,
            "config_hash": cfg.hash(), **result.final(),
            "history": history_records(result.history, lr=cfg.optim.lr, seed=cfg.seed,
                                       status=result.status,
                                       diverged_epoch=result.diverged_epoch)}
