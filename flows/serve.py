"""``lrpipe schedule``: serve the pipeline as a Prefect deployment that re-runs on a schedule.

The served flow is ``flows.pipeline.pipeline`` where that module exists, else
``flows.lr_sweep.lr_sweep``. Schedules need a persistent Prefect server (the ephemeral API
cannot schedule): the one at ``PREFECT_API_URL`` if set (one on this machine is started here on
its port if it does not answer), else ``python -m flows.server``'s on 127.0.0.1 at
``PREFECT_SERVER_API_PORT`` (default 4200), started here if needed (``make schedule PORT=4277``).
``--port N`` names that local server's port outright (127.0.0.1:N, started if needed, its UI
calling the API it serves: ``flows.server.server_env``); with a PREFECT_API_URL naming another
server it is a ConfigError, not a silent choice between the two.
Each scheduled run is a new sweep (a new MLflow parent run): the previous one FINISHED, so
nothing is resumed or served from a cache.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from flows import server
from flows.common import make_task_runner
from lrpipe.engine.config import ConfigError, check_number

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


SERVABLE = ("pipeline", "sweep")  # the commands whose flows can be served on a schedule


def target(which: str | None = None):
    """(command name, Prefect flow) for ``which`` (pipeline, the default, or sweep)."""
    from flows.commands import COMMANDS

    which = "pipeline" if which is None else which
    if which not in SERVABLE:
        raise ConfigError(f"flow: got {which!r}; allowed: {', '.join(SERVABLE)}")
    return which, COMMANDS[which].load("flow")


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


def check_port(port: int | None) -> int | None:
    """``--port``: None (the server PREFECT_API_URL or PREFECT_SERVER_API_PORT names), or a
    port 1-65535 that agrees with PREFECT_API_URL where that is set; else a ConfigError."""
    if port is None:
        return None
    server.check_port(port)
    url = os.environ.get("PREFECT_API_URL")
    if url and server.local_port(url) != port:
        same = server.api_url(port=port)
        raise ConfigError(f"port: got {port}, but PREFECT_API_URL names {url}; allowed: one "
                          f"of them (unset PREFECT_API_URL, or set it to {same})")
    return port


def api_for_schedules(port: int | None = None) -> str:
    """The local server on ``port`` when given (started if needed); else PREFECT_API_URL if
    it answers, started here on its port if it is a local one that does not; unset: the
    local server on ``server.default_port()``, started if needed."""
    url = os.environ.get("PREFECT_API_URL")
    if port is not None:
        return server.start(port=check_port(port))
    if not url:
        return server.start()
    if server.healthy(url):
        return url
    if server.local_port(url) is not None:
        return server.start(port=server.local_port(url))
    raise ConfigError(f"PREFECT_API_URL: {url} does not answer; allowed: a running Prefect "
                      "server, one on this machine (http://127.0.0.1:<port>/api, started "
                      "here), or unset to start one on $PREFECT_SERVER_API_PORT (default 4200)")


def check(cron=None, interval=None, name=DEFAULT_NAME, flow=None, overrides=None,
          runner="threads", workers=None, port=None, **flow_settings) -> tuple[dict, list]:
    """The schedule, the flow it serves and that flow's settings (its own command's check:
    data and optimizer too), and the Prefect server's port, before anything is served.
    Returns the deployment's settings."""
    port = check_port(port)
    schedule = check_schedule(cron, interval)
    which, served = target(flow)
    params = flow_parameters(served, {**flow_settings, "overrides": overrides,
                                      "runner": runner, "workers": workers})
    from flows.commands import COMMANDS  # the served flow's own declaration

    own = COMMANDS[which]
    takes = inspect.signature(own.load("check")).parameters
    _, configs = own.load("check")(**{k: v for k, v in params.items() if k in takes})
    return {"which": which, "name": name, "schedule": schedule, "params": params,
            "port": port}, configs


def run(which: str, name: str, schedule: dict, params: dict, port: int | None = None,
        runner="threads", workers=None) -> None:
    """Serve the checked flow until interrupted, on the Prefect server of ``port`` (None:
    ``api_for_schedules``'s choice)."""
    _, served = target(which)
    serve(served, name, schedule, params, runner, workers, api_for_schedules(port))


def serve(flow, name: str, schedule: dict, params: dict, runner: str, workers, url: str) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from lrpipe import tracking

    ui = url.rstrip("/").removesuffix("/api")
    when = f"cron {schedule['cron']!r}" if "cron" in schedule else \
        f"every {schedule['interval']:g} s"
    print(f"Serving flow {flow.name!r} as deployment '{flow.name}/{name}', {when}.\n"
          f"  Deployment and its runs: {ui}/deployments  (flow runs: {ui}/runs)\n"
          f"  MLflow: each run is a new parent run; start the UI with `make ui` "
          f"({tracking.ui_url()}).\n"
          "  Ctrl-C stops serving and pauses the schedule.", flush=True)
    os.environ["PREFECT_API_URL"] = url  # for the flow-run processes the runner spawns
    served = flow.with_options(task_runner=make_task_runner(runner, workers))
    with temporary_settings(updates={PREFECT_API_URL: url}):
        # limit=1: a run that outlasts the interval delays the next one instead of
        # competing with it for the same cores.
        served.serve(name=name, parameters=params, limit=1, **schedule)
