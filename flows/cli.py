"""The ``lrpipe`` command: one subcommand per flow, settings from YAML plus overrides.

Validation happens here, before any flow starts: a bad value prints one line naming the field
and the allowed values, and exits with status 2 without recording anything; an unreachable or
broken service, store or disk exits 3, a failure during the work 1 (``lrpipe.faults.ExitCode``).
No error shows a traceback unless ``--debug`` asks for it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

EXAMPLES = """examples:
  lrpipe sweep --lrs 0.01,0.1,1 --epochs 3
  lrpipe sweep --set model.name=softmax --set optim.name=adam
  lrpipe search                                 # halving search + LR range test
  lrpipe <command> --help                       # every command's own flags and examples
"""


def parse_set(text: str) -> tuple[str, Any]:
    """``optim.lr=1e-3`` -> ("optim.lr", 0.001); the value is read as YAML (numbers, with
    scientific notation, lists, mappings)."""
    from lrpipe.engine.config import ConfigError
    from lrpipe.engine.yaml_values import load_yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--set: got {text!r}; allowed: field=value")
    try:
        return key.strip(), load_yaml(value, f"--set {key.strip()}")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def load_settings(path: str | None) -> dict:
    """The settings of a YAML file (``--config``): a ConfigError naming the flag and the file
    when it is missing, unreadable, not YAML or not a mapping."""
    from lrpipe.engine.config import ConfigError
    from lrpipe.engine.yaml_values import load_yaml

    if path is None:
        return {}
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config: got {path!r}; allowed: an existing YAML file")
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path} ({exc.strerror or exc})") from None
    data = load_yaml(raw, f"--config {path}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: got a {type(data).__name__}; allowed: a mapping of "
                          "settings (field: value lines)")
    overrides = data.get("overrides")
    if overrides is not None and not isinstance(overrides, dict):
        raise ConfigError(f"--config {path}: overrides: got a {type(overrides).__name__}; "
                          "allowed: a mapping of config fields (optim.lr: 0.1)")
    return data


def common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of settings (command-line flags win)")
    p.add_argument("--set", dest="sets", action="append", type=parse_set, default=[],
                   metavar="FIELD=VALUE", help="override a config field, e.g. optim.name=adam")
    p.add_argument("--model", metavar="PACKAGE.MODULE:FACTORY",
                   help="your model: a factory(seed) -> nn.Module (sets model.name)")
    p.add_argument("--data", metavar="PACKAGE.MODULE:LOADER",
                   help="your data: a loader() -> (train, held_out) of DataLoaders or (x, y) "
                        "tensors, integer labels (sets data.dataset)")
    p.add_argument("--runner", help="threads (default) | dask | serial | tcp://scheduler:8786")
    p.add_argument("--workers", type=int, help="parallel tasks (default: one per core)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the traceback of an error, not just its one line")


def build_parser() -> argparse.ArgumentParser:
    """One subparser per declared command (``flows.commands``), plus the common flags."""
    from flows.commands import COMMANDS

    parser = argparse.ArgumentParser(
        prog="lrpipe", allow_abbrev=False, description="A learning-rate laboratory for PyTorch.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lrpipe {version()}")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error, not just its one line")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        common_args(command.add_parser(sub))
    return parser


def version() -> str:
    """lrpipe's version, from the installed package's metadata."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("lrpipe")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def settings_from(args: argparse.Namespace) -> dict:
    """YAML settings, then every flag the user gave; --set pairs go into "overrides"."""
    settings = load_settings(args.config)
    overrides = dict(settings.pop("overrides", {}) or {})
    overrides.update(dict(args.sets))
    for flag, field in (("model", "model.name"), ("data", "data.dataset")):
        if getattr(args, flag, None) is not None:
            overrides[field] = getattr(args, flag)
    skip = {"command", "config", "sets", "model", "data", "debug"}
    for key, value in vars(args).items():
        if key not in skip and value is not None:
            settings[key] = value
    settings["overrides"] = overrides
    return settings


# Exit statuses (lrpipe.faults.ExitCode): 1 a failure during the work, 2 bad input, 3 an
# unreachable or broken service; 128 + the signal for a stop asked by the user (130 Ctrl-C,
# 143 SIGTERM), as shells report a command killed by that signal.
EXIT_BAD_INPUT = 2
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SERVES = ("schedule",)  # long-lived: serves deployments until stopped, signals its own


class _Stop:
    """SIGINT and SIGTERM while a command runs. The first asks every training loop of the
    process to stop before its next update (``lrpipe.engine.loop.request_stop``); the flow
    then ends on its own, its runs marked KILLED. A second one gives up waiting at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame) -> None:
        from lrpipe.engine.loop import request_stop

        if self.signum is not None:
            raise KeyboardInterrupt  # the second: leave now (runs left are marked next time)
        self.signum = signum
        request_stop()
        _quiet_after_stop()


_STDERR: list[int] = []  # the real stderr, kept for the one line once the rest is muted


def _quiet_after_stop() -> None:
    """While stopping, Prefect's client may log connection errors (its temporary API got the
    terminal's signal too) and worker threads may end in the stop: the one line the command
    prints says all there is to say, so stderr goes to /dev/null from here on."""
    import logging
    import threading

    logging.disable(logging.CRITICAL)
    threading.excepthook = lambda args: None
    sys.stderr.flush()
    _STDERR.append(os.dup(2))
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


STOP_WAIT_S = 5.0  # after a stop, how long to wait for the flow to record it and end


class _GaveUp(Exception):
    """The flow did not end within STOP_WAIT_S of a stop (its Prefect API went first)."""


def _run_in_thread(fn, **kwargs):
    """``fn(**kwargs)`` on a worker thread, waited for here. The main thread stays free for
    signals, and no flow code runs in it: Prefect's engine then installs no SIGTERM handler
    of its own, and a stop never lands as an exception in the middle of a flow's bookkeeping
    but where the training loop checks for it. After a stop, waits at most STOP_WAIT_S: the
    runs are marked KILLED by then (or, if not, at the next command's start), while Prefect's
    client may go on retrying an API that the terminal's signal ended too."""
    import threading
    import time

    from lrpipe.engine.loop import stop_requested

    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = fn(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            outcome["error"] = exc

    worker = threading.Thread(target=target, name="lrpipe-flow", daemon=True)
    worker.start()
    deadline = None
    while worker.is_alive():
        worker.join(0.2)
        if stop_requested():
            deadline = deadline or time.monotonic() + STOP_WAIT_S
            if time.monotonic() > deadline:
                raise _GaveUp
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def classify(exc: BaseException) -> tuple[int, str]:
    """The exit status and the one line for an error that ended a command: bad input (2,
    its message names the field), an unreachable or broken service (3, it names the service
    and what to do), else a failure during the work (1: what failed, and that the runs
    finished so far are kept for the next run of the same command to resume)."""
    from lrpipe.engine.config import ConfigError
    from lrpipe.engine.data import DataUnavailable
    from lrpipe.faults import ExitCode, ServiceError

    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, ServiceError | DataUnavailable):
        return ExitCode.SERVICE, text
    if isinstance(exc, ConfigError | ValueError):
        return ExitCode.BAD_INPUT, text
    return ExitCode.WORK_FAILED, (
        f"failed during the work: {type(exc).__name__}: {text}. Runs finished so far are kept: "
        "fix the cause and run the same command again to resume (--debug: the traceback)")


def takes_setting(command: str, name: str) -> bool:
    """Whether ``lrpipe command`` has the setting (flag) ``name``."""
    import inspect

    from flows.commands import COMMANDS

    return name in inspect.signature(COMMANDS[command].load("check")).parameters


def hint_for_default(line: str, command: str, settings: dict) -> str:
    """A dataset-dependent default the user did not set (``data.val_size``, ``data.subset``)
    that does not fit the dataset: name the setting to add."""
    for field in ("data.val_size", "data.subset"):
        if line.startswith(f"{field}: got") and field not in settings.get("overrides", {}):
            flag = (" or --subset N" if field == "data.subset" and "subset" not in settings
                    and takes_setting(command, "subset") else "")
            return (f"{line}; it is the default for larger datasets: set a smaller one "
                    f"(--set {field}=N{flag})")
    return line


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a dead server: seconds,
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")  # not minutes of retries
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    settings: dict = {}
    try:
        settings = settings_from(args)
        start_api_early(args.command)  # before Prefect loads: it starts a second sooner
        if not debug:
            quiet_prefect_tracebacks()
        return run_command_line(args.command, settings)
    except Exception as exc:  # noqa: BLE001 - every error ends in one line and a status
        if debug:
            raise
        code, line = classify(exc)
        line = hint_for_default(line, args.command, settings)
        print(f"lrpipe {args.command}: {line}", file=sys.stderr)
        return int(code)


class MessageOnly:
    """A logging formatter that writes what ``inner`` writes for a record, less its
    traceback and stack (another handler, Prefect's API log, may have formatted them
    already: they are put back after)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def format(self, record) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def quiet_prefect_tracebacks() -> None:
    """Prefect logs a failed task's and flow's traceback on the terminal: its console lines
    keep their one-line message, the traceback goes (``--debug`` keeps it; the Prefect API's
    log handler keeps it, for the UI)."""
    import logging

    import prefect.main  # noqa: F401  (installs its logging configuration)

    for name in ("", "prefect", "prefect.task_runs", "prefect.flow_runs"):  # "": root
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(
                    handler.formatter, MessageOnly):
                handler.setFormatter(MessageOnly(handler.formatter or logging.Formatter()))


def start_api_early(name: str) -> None:
    """A flow command with no PREFECT_API_URL starts its temporary API now, as soon as its
    flags parsed, while Prefect and lrpipe load, the settings are checked and the data is
    mapped: the flow then finds it ready, seconds sooner (``flows.api_server``). A command
    that fails its checks stops it at exit, having recorded nothing in it. An API URL set in
    a Prefect profile is known only once Prefect loads; the flow then uses it and stops the
    temporary one (``api_server.stop_unused``)."""
    from flows import api_server
    from flows.commands import COMMANDS

    if not COMMANDS[name].direct and name not in SERVES and \
            not os.environ.get("PREFECT_API_URL"):
        api_server.start()


def run_command_line(command: str, settings: dict) -> int:
    """Run ``command`` with ``settings``: a serving command in this thread, any other on a
    worker thread, stopped cleanly by SIGINT or SIGTERM."""
    import flows  # noqa: F401  (environment defaults before Prefect and MLflow load)
    from flows.commands import COMMANDS
    from lrpipe.engine.loop import clear_stop

    run = COMMANDS[command].run
    if command in SERVES:  # Prefect's runner handles its own signals, in this thread
        run(**settings)
        return 0
    stop = _Stop()
    clear_stop()
    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        _run_in_thread(run, **settings)
    except BaseException:
        if stop.signum is None:
            raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stop.signum is not None:
        from lrpipe import runs

        runs.end_open_runs("KILLED")  # what the flow did not get to end in STOP_WAIT_S
        name = signal.Signals(stop.signum).name
        line = (f"lrpipe {command}: stopped by {name}; the runs it was writing are marked "
                "KILLED. Run the same command again to resume: finished runs are reused.\n")
        os.write(_STDERR[0] if _STDERR else 2, line.encode())
        # Not a normal exit: Prefect's worker threads may still be retrying a dead API, and
        # the interpreter would wait for them at exit.
        sys.stdout.flush()
        os._exit(128 + stop.signum)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
