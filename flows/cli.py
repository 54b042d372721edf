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
  lrpipe sweep                                  # MLP, SGD, Fashion-MNIST, 8 rates, 5 epochs
  lrpipe sweep --lrs 0.01,0.1,1 --epochs 3
  lrpipe sweep --set model.name=softmax --set optim.name=adam --lrs 1e-4,1e-3,1e-2
  lrpipe sweep --config sweep.yaml              # YAML: {lrs: [...], epochs: 5, overrides: {...}}
"""


def parse_lrs(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"lrs: got {text!r}; allowed: comma-separated numbers, e.g. 0.01,0.1,1") from None


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lrpipe", description="A learning-rate laboratory for PyTorch.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sweep = sub.add_parser("sweep", help="train one model per learning rate and compare",
                           epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_argument("--lrs", type=parse_lrs, help="comma-separated learning rates")
    sweep.add_argument("--epochs", type=int, help="epochs per rate")
    common_args(sweep)
    return parser


def settings_from(args: argparse.Namespace) -> dict:
    settings = load_settings(args.config)
    overrides = dict(settings.pop("overrides", {}) or {})
    overrides.update(dict(args.sets))
    for key in ("lrs", "epochs", "runner", "workers"):
        if getattr(args, key, None) is not None:
            settings[key] = getattr(args, key)
    settings["overrides"] = overrides
    return settings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    from lrpipe.config import ConfigError
    from lrpipe.data import DataUnavailable
    from lrpipe.tracking import TrackingError

    try:
        if args.command == "sweep":
            from flows.lr_sweep import run

            run(**settings)
    except (ConfigError, TrackingError, DataUnavailable, ValueError) as exc:
        print(f"lrpipe {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
