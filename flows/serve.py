"""``lrpipe schedule``: serve the pipeline as a Prefect deployment that re-runs on a schedule.

The served flow is ``flows.pipeline.pipeline`` where that module exists, else
``flows.lr_sweep.lr_sweep``. Schedules need a persistent Prefect server (the ephemeral API
cannot schedule): the one at ``PREFECT_API_URL`` if set, else ``python -m flows.server``'s on
127.0.0.1:4200, started here if needed. Each scheduled run is a new sweep (a new MLflow parent
run): the previous one FINISHED, so nothing is resumed or served from a cache.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
from typing import Any

from flows import server
from flows.common import check_runner, check_workers, make_task_runner
from lrpipe import tracking
from lrpipe.engine.config import ConfigError, check_number

HELP = "serve the pipeline as a Prefect deployment re-run on a cron or interval schedule"
EXAMPLES = """examples:
  lrpipe schedule                               # every night at 03:00 (cron "0 3 * * *")
  lrpipe schedule --cron "0 */6 * * *"          # every six hours
  lrpipe schedule --interval 3600 --lrs 0.01,0.1,1 --epochs 3
  make schedule CRON="30 2 * * 1-5"             # weekdays at 02:30
Runs until Ctrl-C (the schedule is paused on exit). Watch it at http://127.0.0.1:4200.
"""
DEFAULT_CRON = "0 3 * * *"  # minute hour day-of-month month day-of-week: nightly at 03:00
DEFAULT_NAME = "scheduled"
CRON_ALLOWED = ("five fields: minute hour day-of-month month day-of-week, e.g. "
                f"'{DEFAULT_CRON}' (03:00 daily) or '*/30 * * * *'")


def check_schedule(cron: str | None, interval: float | None) -> dict[str, Any]:
    """``{"cron": ...}`` or ``{"interval": seconds}``; the default is nightly at 03:00.

    Raises ConfigError naming ``cron`` (malformed, or given with ``interval``) or ``interval``.
    """
    if cron is not None and interval is not None:
        raise ConfigError(f"cron: got {cron!r} and interval {interval!r}; allowed: one of them")
    if interval is not None:
        check_number("interval", interval, low=0.0, low_open=True)
        return {"interval": float(interval)}
    cron = DEFAULT_CRON if cron is None else cron
    if not isinstance(cron, str) or len(cron.split()) != 5:
        raise ConfigError(f"cron: got {cron!r}; allowed: {CRON_ALLOWED}")
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValueError:
        raise ConfigError(f"cron: got {cron!r}; allowed: {CRON_ALLOWED}") from None
    return {"cron": cron}


FLOWS = {"pipeline": "flows.pipeline", "sweep": "flows.lr_sweep"}


def target(which: str | None = None):
    """(module, flow) for ``which`` (pipeline | sweep); default the pipeline if this checkout
    has one, else the lr sweep."""
    if which is None:
        which = "pipeline" if importlib.util.find_spec(FLOWS["pipeline"]) else "sweep"
    if which not in FLOWS or not importlib.util.find_spec(FLOWS[which]):
        present = [k for k, v in FLOWS.items() if importlib.util.find_spec(v)]
        raise ConfigError(f"flow: got {which!r}; allowed: {', '.join(present)}")
    module = importlib.import_module(FLOWS[which])
    return module, getattr(module, FLOWS[which].rsplit(".", 1)[1])


def flow_parameters(flow, settings: dict) -> dict:
    """The settings that were given (not None, not empty, runner not the default threads), as
    deployment parameters; one the flow does not take is a ConfigError."""
    given = {k: v for k, v in settings.items()
             if v is not None and v != {} and not (k == "runner" and v == "threads")}
    accepted = inspect.signature(flow.fn).parameters
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise ConfigError(f"{unknown[0]}: not a parameter of flow {flow.name!r}; allowed: "
                          f"{', '.join(accepted)}")
    return given


def api_for_schedules() -> str:
    """PREFECT_API_URL if it answers; else the local server, started if needed."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        if not server.healthy(url):
            raise ConfigError(f"PREFECT_API_URL: {url} does not answer; allowed: a running "
                              "Prefect server (`make server`), or unset to start one here")
        return url
    return server.start()


def add_arguments(parser) -> None:
    from flows.cli import parse_lrs

    parser.add_argument("--cron", help=f"cron schedule (default {DEFAULT_CRON!r}: 03:00 daily)")
    parser.add_argument("--interval", type=float, help="seconds between runs, instead of --cron")
    parser.add_argument("--name", help=f"deployment name (default {DEFAULT_NAME!r})")
    parser.add_argument("--flow", help="pipeline (default, where present) | sweep")
    parser.add_argument("--lrs", type=parse_lrs, help="learning rates passed to the flow")
    parser.add_argument("--epochs", type=int, help="epochs passed to the flow")


def run(cron=None, interval=None, name=DEFAULT_NAME, flow=None, overrides=None,
        runner="threads", workers=None, **flow_settings) -> None:
    """Validate the schedule and the flow's settings, then serve until interrupted."""
    schedule = check_schedule(cron, interval)
    check_runner(runner)
    check_workers(workers)
    module, flow = target(flow)
    params = flow_parameters(flow, {**flow_settings, "overrides": overrides, "runner": runner,
                                    "workers": workers})
    if hasattr(module, "validate"):  # the flow module's own checks, data and optimizer too
        takes = inspect.signature(module.validate).parameters
        module.validate(**{k: v for k, v in params.items() if k in takes})
    tracking.check_tracking_uri(tracking.tracking_uri())
    url = api_for_schedules()
    serve(flow, name, schedule, params, runner, workers, url)


def serve(flow, name: str, schedule: dict, params: dict, runner: str, workers, url: str) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    ui = url.rstrip("/").removesuffix("/api")
    when = f"cron {schedule['cron']!r}" if "cron" in schedule else \
        f"every {schedule['interval']:g} s"
    print(f"Serving flow {flow.name!r} as deployment '{flow.name}/{name}', {when}.\n"
          f"  Deployment and its runs: {ui}/deployments  (flow runs: {ui}/runs)\n"
          f"  MLflow: each run is a new parent run; start the UI with `make ui`.\n"
          "  Ctrl-C stops serving and pauses the schedule.", flush=True)
    os.environ["PREFECT_API_URL"] = url  # for the flow-run processes the runner spawns
    served = flow.with_options(task_runner=make_task_runner(runner, workers))
    with temporary_settings(updates={PREFECT_API_URL: url}):
        # limit=1: a run that outlasts the interval delays the next one instead of
        # competing with it for the same cores.
        served.serve(name=name, parameters=params, limit=1, **schedule)
