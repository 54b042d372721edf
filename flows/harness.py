"""The one harness every flow runs in: its parent run, its Prefect flow run, and how it stops.

``parent_run`` opens the flow's MLflow parent run, or resumes the one a crashed or killed run
of the same work left behind (``lrpipe.resume.open_sweep``: the identity is the flow's name
and a hash of what it will do), tags it with the writer (host, pid), and ends it FINISHED,
KILLED (Ctrl-C, SIGTERM: ``KeyboardInterrupt`` or the engine's ``Stopped``) or FAILED as the
block ends. Runs left RUNNING by dead writers, in every experiment, are marked KILLED first.

``call_flow`` runs a Prefect flow with the chosen task runner, its flow runs tagged with the
same writer tags, after marking CRASHED the flow runs whose process died (a SIGKILL leaves
them RUNNING in Prefect's UI otherwise).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from lrpipe import procs
from lrpipe.engine import progress

# Prefect, torch and MLflow (flows.common, lrpipe.resume, lrpipe.runs) are imported where they
# are used: ``run_command`` says what will run before they load (seconds on a cold start).

# Prefect tags carry key:value strings; these name the process running a flow run.
PREFECT_TAG_KEYS = (procs.HOST_TAG, procs.PID_TAG, procs.PID_STARTED_TAG)


def identity(flow_name: str, work: Mapping[str, Any] | Sequence[str]) -> str:
    """The sweep id of a flow's work: its config hashes (a sequence), or its settings (a
    mapping, serialized with sorted keys), hashed with the flow's name."""
    if isinstance(work, Mapping):
        parts = [json.dumps(work, sort_keys=True, default=str, separators=(",", ":"))]
    else:
        parts = list(work)
    from lrpipe import resume

    return resume.sweep_identity(flow_name, parts)


@contextmanager
def parent_run(
    experiment: str,
    flow_name: str,
    work: Mapping[str, Any] | Sequence[str],
    name: str,
    *,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    uri: str | None = None,
) -> Iterator[str]:
    """The flow's parent run id, new or resumed; it ends as the block ends.

    Args:
        work: what identifies the work (``identity``): the same work after a crash resumes
            into the same parent, and its FINISHED children are reused.
    Yields:
        The parent run id.
    """
    from lrpipe import resume, runs

    sweep_id = identity(flow_name, work)
    parent, resumed = resume.open_sweep(experiment, name, sweep_id, params=params, tags=tags,
                                        uri=uri)
    if resumed:
        print(f"{flow_name}: resuming {sweep_id} into parent run {parent}; finished runs are "
              "reused, failed, killed and missing ones run again", flush=True)
    with runs.ending(parent, uri):
        yield parent


def writer_tags() -> list[str]:
    """This process as Prefect tags: ``host:...``, ``pid:...``, ``pid_started:...``."""
    return [f"{key}:{value}" for key, value in procs.process_tags().items()]


def _tag_values(tags: list[str]) -> dict[str, str]:
    found = {}
    for tag in tags:
        key, sep, value = tag.partition(":")
        if sep and key in PREFECT_TAG_KEYS:
            found[key] = value
    return found


def mark_dead_flow_runs() -> list[str]:
    """Set CRASHED every RUNNING Prefect flow run of this host whose process died.

    Flow runs carry ``writer_tags``; runs without them, from other hosts or from live
    processes are left alone. Returns the ids marked."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    host = f"{procs.HOST_TAG}:{socket.gethostname()}"
    marked = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])),
            tags=FlowRunFilterTags(all_=[host])))
        for run in runs:
            if procs.writer_is_dead(_tag_values(list(run.tags))):
                client.set_flow_run_state(run.id, Crashed(
                    message="its process died (marked by the next lrpipe command)"), force=True)
                marked.append(str(run.id))
    return marked


def call_flow(flow_fn, **kwargs: Any) -> Any:
    """Run ``flow_fn(**kwargs)`` on the task runner its ``runner`` and ``workers`` arguments
    name, under one Prefect API for the flow and its workers (``shared_api``), its flow runs
    tagged with this process, after marking the flow runs of dead processes CRASHED."""
    from prefect import tags

    from flows.common import make_task_runner, shared_api

    runner = kwargs.get("runner", "threads")
    with shared_api(runner), tags(*writer_tags()):
        mark_dead_flow_runs()
        task_runner = make_task_runner(runner, kwargs.get("workers"))
        return flow_fn.with_options(task_runner=task_runner)(**kwargs)


def flow_parent(flow_name: str, experiment: str, name: str, *,
                params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None,
                uri: str | None = None):
    """``parent_run`` for a flow whose work is described by its parameters (the runner, which
    changes no number, left out): the same settings after a crash resume the same parent."""
    work = {k: v for k, v in (params or {}).items() if k != "runner"}
    return parent_run(experiment, flow_name, work, name, params=params, tags=tags, uri=uri)


def preflight_services(runner: str, uri: str, runs: int) -> None:
    """Check everything outside the process the command will talk to, each within
    ``lrpipe.faults.SERVICE_TIMEOUT_S``, before any run is recorded: the tracking URI's form
    (TrackingError), the store (a sqlite file's integrity and schema, or a server's health),
    the disk under a local store (room for ``runs`` runs, ``ulimit -f``), the Dask scheduler
    a ``tcp://`` runner names, the Prefect API when PREFECT_API_URL is set (ServiceError,
    each one line naming the thing and what to do). Then a new local store is created and
    migrated, once, under a lock (``faults.create_store``; a store of an older schema is a
    ServiceError saying how to upgrade it)."""
    from prefect.settings import get_current_settings

    from lrpipe import faults, tracking

    tracking.check_tracking_uri(uri)
    faults.check_store(uri)
    path = faults.sqlite_path(uri)
    if path is not None:
        faults.check_disk(path.parent, runs, path.stat().st_size if path.exists() else 0)
    if runner.startswith("tcp://"):
        faults.check_tcp("runner", runner, "start the scheduler (dask scheduler --port PORT) "
                         "or choose --runner threads")
    api = get_current_settings().api.url
    if api:
        faults.check_http("Prefect API", api.rstrip("/") + "/health",
                          "start it (make server) or unset PREFECT_API_URL")
    faults.create_store(uri, lambda: tracking.client(uri).search_experiments(max_results=1))


def run_command(command, settings: Mapping[str, Any]) -> Any:
    """Check every setting of ``command`` (a ``flows.commands.Command``), then run it.

    In order, before anything is recorded: the runner and workers, the names of the settings
    (one the command does not take is a ConfigError listing those it does), the command's own
    ``check`` (its configs and plan), the tracking store, then the data, batch size and
    optimizer of every config (``preflight``). Then the flow runs on the chosen task runner
    (``call_flow``), or, for a ``direct`` command, its function is called.

    The terminal hears at once what will run (``progress.start_line``, before Prefect, MLflow
    and the flow load), then what was checked and where it records (``plan_line``), and at
    the end the wall-clock time from the command's start (``progress.wall_line``).
    """
    started = progress.command_start()
    settings = {k: v for k, v in settings.items() if v is not None or k == "overrides"}
    if not command.direct:  # a served schedule says what it serves itself
        print(progress.start_line(command.name, command.flow.split(":")[-1], settings),
              flush=True)
    result, work_s = _checked_run(command, settings)
    if not command.direct:
        print(progress.wall_line(command.name, time.monotonic() - started, work_s), flush=True)
    return result


def _checked_run(command, settings: dict) -> tuple[Any, float]:
    """``run_command``'s checks and run: (what the flow returned, seconds the flow took)."""
    import inspect

    from flows.common import check_runner, check_workers, preflight
    from lrpipe import faults, tracking
    from lrpipe.engine.config import ConfigError

    settings = dict(settings)
    runner = settings.pop("runner", "threads")
    workers = settings.pop("workers", None)
    check_runner(runner)
    check_workers(workers)
    check = command.load("check")
    accepted = inspect.signature(check).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    unknown = sorted(set(settings) - set(accepted) - {"runner", "workers"})
    if unknown and not takes_any:
        allowed = [k for k in accepted if k != "experiment"]
        raise ConfigError(f"{unknown[0]}: not a setting of `lrpipe {command.name}`; allowed: "
                          f"{', '.join(allowed)}, runner, workers")
    if command.direct and "runner" in accepted:  # it serves flows: their runner is its
        settings.update(runner=runner, workers=workers)
    kwargs, configs = check(**settings)
    if "experiment" in kwargs:
        faults.check_experiment_name(kwargs["experiment"])
    fn = command.load("flow")
    if not command.direct:
        epochs = {c.epochs for c in configs}
        print(progress.plan_line(command.name, len(configs),
                                 epochs.pop() if len(epochs) == 1 else None,
                                 tracking.tracking_uri(), experiment_of(fn, kwargs),
                                 tracking.ui_url()), flush=True)
    preflight_services(runner, tracking.tracking_uri(), runs=len(configs) + 1)
    preflight(configs)
    begun = time.monotonic()
    if command.direct:
        return fn(**kwargs, runner=runner, workers=workers), time.monotonic() - begun
    result = call_flow(fn, **kwargs, runner=runner, workers=workers)
    return result, time.monotonic() - begun


def experiment_of(flow, kwargs: Mapping[str, Any]) -> str | None:
    """The MLflow experiment a flow records in: the ``experiment`` setting, else the flow's
    default; None for a flow without one (the pipeline: one per stage)."""
    import inspect

    if kwargs.get("experiment"):
        return str(kwargs["experiment"])
    param = inspect.signature(getattr(flow, "fn", flow)).parameters.get("experiment")
    return None if param is None or param.default is param.empty else str(param.default)
