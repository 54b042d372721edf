"""The ``lrpipe`` command: one subcommand per flow, settings from YAML plus overrides.

Validation happens here, before any flow starts: a bad value prints one line naming the field
and the allowed values, and exits with status 2 without recording anything.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

import yaml

EXAMPLES = """examples:
  lrpipe sweep --lrs 0.01,0.1,1 --epochs 3
  lrpipe sweep --set model.name=softmax --set optim.name=adam
  lrpipe search                                 # halving search + LR range test
  lrpipe <command> --help                       # every command's own flags and examples
"""


def parse_set(text: str) -> tuple[str, Any]:
    """``optim.lr=0.1`` -> ("optim.lr", 0.1); the value is read as YAML (numbers, lists)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set: got {text!r}; allowed: field=value")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def load_settings(path: str | None) -> dict:
    if path is None:
        return {}
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"lrpipe: --config: {path} does not exist")
    data = yaml.safe_load(file.read_text()) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"lrpipe: --config: {path} must hold a mapping, got {type(data).__name__}")
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


def build_parser() -> argparse.ArgumentParser:
    """One subparser per declared command (``flows.commands``), plus the common flags."""
    from flows.commands import COMMANDS

    parser = argparse.ArgumentParser(
        prog="lrpipe", allow_abbrev=False, description="A learning-rate laboratory for PyTorch.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        common_args(command.add_parser(sub))
    return parser


def settings_from(args: argparse.Namespace) -> dict:
    """YAML settings, then every flag the user gave; --set pairs go into "overrides"."""
    settings = load_settings(args.config)
    overrides = dict(settings.pop("overrides", {}) or {})
    overrides.update(dict(args.sets))
    for flag, field in (("model", "model.name"), ("data", "data.dataset")):
        if getattr(args, flag, None) is not None:
            overrides[field] = getattr(args, flag)
    skip = {"command", "config", "sets", "model", "data"}
    for key, value in vars(args).items():
        if key not in skip and value is not None:
            settings[key] = value
    settings["overrides"] = overrides
    return settings


# Exit statuses: 2 bad input; 128 + the signal for a stop asked by the user (130 Ctrl-C,
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    import flows  # noqa: F401  (environment defaults before Prefect and MLflow load)
    from flows.commands import COMMANDS
    from lrpipe.engine.config import ConfigError
    from lrpipe.engine.data import DataUnavailable
    from lrpipe.engine.loop import clear_stop
    from lrpipe.tracking import TrackingError

    run = COMMANDS[args.command].run
    if args.command in SERVES:  # Prefect's runner handles its own signals, in this thread
        try:
            run(**settings)
        except (ConfigError, TrackingError, DataUnavailable, ValueError) as exc:
            print(f"lrpipe {args.command}: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        return 0
    stop = _Stop()
    clear_stop()
    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        _run_in_thread(run, **settings)
    except (ConfigError, TrackingError, DataUnavailable, ValueError) as exc:
        if stop.signum is None:
            print(f"lrpipe {args.command}: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
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
        line = (f"lrpipe {args.command}: stopped by {name}; the runs it was writing are marked "
                "KILLED. Run the same command again to resume: finished runs are reused.\n")
        os.write(_STDERR[0] if _STDERR else 2, line.encode())
        # Not a normal exit: Prefect's worker threads may still be retrying a dead API, and
        # the interpreter would wait for them at exit.
        sys.stdout.flush()
        os._exit(128 + stop.signum)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
