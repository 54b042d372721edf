"""The ``lrpipe`` command: one subcommand per flow, settings from YAML plus overrides.

Validation happens here, before any flow starts: a bad value prints one line naming the field
and the allowed values, and exits with status 2 without recording anything.
"""

from __future__ import annotations

import argparse
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


def parse_lrs(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"lrs: got {text!r}; allowed: comma-separated numbers, e.g. 0.01,0.1,1") from None


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seeds: got {text!r}; allowed: comma-separated integers, e.g. 0,1,2") from None


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
    p.add_argument("--runner", help="threads (default) | dask | serial | tcp://scheduler:8786")
    p.add_argument("--workers", type=int, help="parallel tasks (default: one per core)")


# Subcommand -> flow module. Each module defines HELP (one line), EXAMPLES (text),
# add_arguments(parser) and run(**settings); settings are the parsed flags that were given,
# merged over the YAML file, with --set overrides collected under "overrides".
COMMANDS = {
    "sweep": "flows.lr_sweep",
    "search": "flows.lr_search",
    "decay": "flows.decay_compare",
    "schedules": "flows.schedule_preview",
    "transfer": "flows.transfer",
    "optimizers": "flows.optimizer_compare",
    "pipeline": "flows.pipeline",
    "schedule": "flows.serve",
}


def available_commands() -> dict:
    """The flow modules that exist in this checkout, imported lazily."""
    import importlib.util

    return {name: mod for name, mod in COMMANDS.items() if importlib.util.find_spec(mod)}


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="lrpipe", description="A learning-rate laboratory for PyTorch.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in available_commands().items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP,
                           epilog=getattr(module, "EXAMPLES", ""),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        common_args(p)
    return parser


def settings_from(args: argparse.Namespace) -> dict:
    """YAML settings, then every flag the user gave; --set pairs go into "overrides"."""
    settings = load_settings(args.config)
    overrides = dict(settings.pop("overrides", {}) or {})
    overrides.update(dict(args.sets))
    skip = {"command", "config", "sets"}
    for key, value in vars(args).items():
        if key not in skip and value is not None:
            settings[key] = value
    settings["overrides"] = overrides
    return settings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    import importlib

    import flows  # noqa: F401  (environment defaults before Prefect and MLflow load)
    from lrpipe.engine.config import ConfigError
    from lrpipe.engine.data import DataUnavailable
    from lrpipe.tracking import TrackingError

    try:
        importlib.import_module(COMMANDS[args.command]).run(**settings)
    except (ConfigError, TrackingError, DataUnavailable, ValueError) as exc:
        print(f"lrpipe {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
