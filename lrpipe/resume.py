"""Resume and stale runs: a crashed sweep continues into its parent run instead of starting over.

A sweep's parent run carries SWEEP_TAG (a hash of the flow name and its sorted config hashes);
every run carries lrpipe.procs' tags naming its writer. So a later flow can mark KILLED a run
whose process died and resume into a crashed sweep, reusing the children that finished.
Resumable = FAILED or KILLED: a RUNNING parent after stale marking belongs to a live process
(or another host) and is never taken. Every MLflow call goes through ``lrpipe.tracking``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from lrpipe import procs, runs, tracking

SWEEP_TAG = "sweep_id"
RESUMABLE = ("FAILED", "KILLED")


def _search_all(experiment_ids: list[str], filter_string: str, uri: str | None = None,
                order_by: list[str] | None = None, limit: int | None = None) -> list:
    """Every run matching ``filter_string`` (pages followed), or the first ``limit``."""
    c = tracking.client(uri)
    found, token = [], None
    while True:
        page = tracking.retry_locked(c.search_runs, experiment_ids, filter_string,
                                     max_results=min(limit or 1000, 1000), order_by=order_by,
                                     page_token=token)
        found.extend(page)
        token = page.token
        if not token or (limit and len(found) >= limit):
            return found[:limit] if limit else found


def mark_stale_runs(experiment: str | None = None, uri: str | None = None) -> list[str]:
    """Mark KILLED every RUNNING run of ``experiment`` (None: of every experiment) whose
    writer died on this host.

    Runs without process tags, from other hosts, or from live processes are left alone.
    Returns the ids marked.
    """
    c = tracking.client(uri)
    if experiment is None:
        ids = [e.experiment_id for e in tracking.retry_locked(c.search_experiments)]
    else:
        exp = tracking.retry_locked(c.get_experiment_by_name, experiment)
        ids = [] if exp is None else [exp.experiment_id]
    if not ids:
        return []
    stale = []
    for run in _search_all(ids, "attributes.status = 'RUNNING'", uri):
        if procs.writer_is_dead(run.data.tags):
            tracking.end_run(run.info.run_id, "KILLED", uri=uri)
            stale.append(run.info.run_id)
    return stale


def sweep_identity(flow_name: str, config_hashes: list[str]) -> str:
    """16 hex digits naming a sweep: its flow and its set of configs (order does not matter)."""
    import hashlib

    text = json.dumps([flow_name, sorted(config_hashes)], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def latest_sweep(experiment: str, sweep_id: str, uri: str | None = None) -> Any | None:
    """The most recently started parent run tagged ``sweep_id`` (an mlflow Run), or None."""
    exp = tracking.retry_locked(tracking.client(uri).get_experiment_by_name, experiment)
    if exp is None:
        return None
    found = _search_all([exp.experiment_id], f"tags.{SWEEP_TAG} = '{sweep_id}'", uri,
                        order_by=["attributes.start_time DESC"], limit=1)
    return found[0] if found else None


def open_sweep(
    experiment: str,
    name: str,
    sweep_id: str,
    *,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    uri: str | None = None,
) -> tuple[str, bool]:
    """The parent run of sweep ``sweep_id``: ``(run_id, resumed)``.

    First marks stale runs of every experiment KILLED (a killed pipeline leaves runs RUNNING
    in several). If the latest parent of this sweep is
    FAILED or KILLED it is set RUNNING again and reused (``resumed`` True, params untouched:
    MLflow refuses to change them); otherwise (none, FINISHED, or RUNNING in a live process) a
    new parent starts, so a scheduled re-run of a finished sweep is a new sweep.
    """
    mark_stale_runs(None, uri)
    latest = latest_sweep(experiment, sweep_id, uri)
    if latest is not None and latest.info.status in RESUMABLE:
        run_id = latest.info.run_id
        runs.watch_children(run_id, False)  # others may have added children since
        tracking.retry_locked(tracking.client(uri).update_run, run_id, "RUNNING")
        resumes = int(latest.data.tags.get("resumes", "0")) + 1
        tracking.set_tags(run_id, {**procs.process_tags(), "resumes": resumes}, uri=uri)
        return run_id, True
    run_id = tracking.start_run(experiment, name, params=params, uri=uri,
                       tags={SWEEP_TAG: sweep_id, **procs.process_tags(), **(tags or {})})
    runs.watch_children(run_id)  # nothing else finishes its children: no search needed
    return run_id, False


def finished_child(parent_run_id: str, config_hash: str, uri: str | None = None) -> Any | None:
    """A FINISHED child run of ``parent_run_id`` tagged ``config_hash`` (an mlflow Run), or
    None: the run a resumed sweep reuses instead of training again."""
    started_here = runs.children_finished_here(parent_run_id)
    if started_here is not None:
        child = started_here.get(config_hash)
        return None if child is None else tracking.retry_locked(tracking.client(uri).get_run, child)
    parent = tracking.retry_locked(tracking.client(uri).get_run, parent_run_id)
    found = _search_all(
        [parent.info.experiment_id],
        f"tags.`{tracking.PARENT_TAG}` = '{parent_run_id}' and tags.config_hash = '{config_hash}' "
        "and attributes.status = 'FINISHED'", uri,
        order_by=["attributes.start_time DESC"], limit=1)
    return found[0] if found else None


# --- tasks whose identity is more than one TrainConfig ------------------------------------
# A range test of seed s with its options, a halving search, an optimizer's rate search, a
# surface x optimizer: their child runs carry TASK_TAG, a hash of what the task computes, and a
# resumed flow reuses the FINISHED one instead of computing it again. (The config_hash tag
# cannot tell them apart: a seed's range test and its halving search share one config.)

TASK_TAG = "task_key"


def task_key(kind: str, inputs: Mapping[str, Any]) -> str:
    """16 hex digits naming one task's work: its ``kind`` and its ``inputs`` (JSON, keys
    sorted; tuples and lists alike), the same in every process and on every re-run."""
    import hashlib

    text = json.dumps([kind, inputs], sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def finished_task(parent_run_id: str, key: str, uri: str | None = None) -> Any | None:
    """The latest FINISHED child run of ``parent_run_id`` tagged ``TASK_TAG`` = ``key`` (an
    mlflow Run), or None: what a resumed flow reuses instead of running the task again."""
    parent = tracking.retry_locked(tracking.client(uri).get_run, parent_run_id)
    found = _search_all(
        [parent.info.experiment_id],
        f"tags.`{tracking.PARENT_TAG}` = '{parent_run_id}' and tags.{TASK_TAG} = '{key}' "
        "and attributes.status = 'FINISHED'", uri,
        order_by=["attributes.start_time DESC"], limit=1)
    return found[0] if found else None


def logged_table(run_id: str, path: str, uri: str | None = None) -> Any | None:
    """The CSV artifact ``path`` of ``run_id`` (``tracking.log_table``) as a DataFrame, every
    float exactly as logged (pandas writes each float's shortest repr; 3.0 reads it back
    exactly by default, 2.x needs ``float_precision="round_trip"``, deprecated since); None
    when the run has no such file."""
    import io

    import pandas as pd

    text = tracking.read_text(run_id, path, uri)
    exact = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}
    return None if text is None else pd.read_csv(io.StringIO(text), **exact)
