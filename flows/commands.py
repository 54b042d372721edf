"""The commands of ``lrpipe``: one declaration per flow.

A ``Command`` says everything the command line needs to know of a flow: its name, help and
examples, its own flags (``Option``), the pure function that checks the settings and plans the
work (``check``, in lrpipe: it raises ``ConfigError`` naming the field and the allowed values,
and returns the flow's keyword arguments and the configs to preflight), and the flow it runs.
The parser, the checks before any run is recorded, and the call of the flow on the chosen task
runner are written once, from these declarations (``flows.cli``, ``flows.harness.run_command``).

Nothing here imports Prefect, MLflow or a flow module: ``lrpipe --help`` and the checks of a bad
flag stay quick, and a flow module is imported only when its command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from lrpipe.engine.config import TrainConfig  # noqa: F401  (Checked's annotation)


def _numbers(text: str, kind: type, field: str, example: str) -> list:
    what = "integers" if kind is int else "numbers"
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{field}: got {text!r}; allowed: comma-separated {what}, e.g. {example}") from None


def parse_lrs(text: str) -> list[float]:
    """``0.01,0.1,1`` -> [0.01, 0.1, 1.0]."""
    return _numbers(text, float, "lrs", "0.01,0.1,1")


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` -> [0, 1, 2]."""
    return _numbers(text, int, "seeds", "0,1,2")


def parse_fresh_seeds(text: str) -> list[int]:
    """``100,101,102`` -> [100, 101, 102]; ``none`` -> [] (no confirmation)."""
    return [] if text.strip().lower() == "none" else _numbers(text, int, "confirm_seeds",
                                                             "100,101,102 or none")


def parse_names(text: str) -> list[str]:
    """``cosine,step`` -> ["cosine", "step"] (checked against the allowed names later)."""
    return [x.strip() for x in text.split(",") if x.strip()]


@dataclass(frozen=True)
class Option:
    """One flag of one command: ``--range-steps`` fills the setting ``range_steps``."""

    flag: str
    type: Callable[[str], Any] | None
    help: str
    metavar: str | None = None
    flag_only: bool = False  # a switch: present = True

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        if self.flag_only:
            parser.add_argument(self.flag, dest=self.dest, action="store_true", default=None,
                                help=self.help)
            return
        parser.add_argument(self.flag, dest=self.dest, type=self.type, help=self.help,
                            metavar=self.metavar)


class Checked(NamedTuple):
    """What a command's ``check`` returns: the flow's keyword arguments (normalized) and the
    training configs whose data, batch size and optimizer the preflight tries."""

    kwargs: dict[str, Any]
    configs: list[TrainConfig]


@dataclass(frozen=True)
class Command:
    """A subcommand of ``lrpipe``.

    flow: ``module:function`` of what runs: a Prefect flow (called on the chosen task runner
        under the harness) or, with ``direct``, a plain function called as is.
    check: ``module:function`` taking the settings (the flags given, the YAML file and the
        ``overrides``; not ``runner``/``workers``, which the harness checks) and returning
        ``Checked``; it raises ``ConfigError`` before anything is recorded.
    direct: the command is not one flow run (``schedule`` serves deployments until stopped,
        ``schedules`` draws without training): ``flow`` is called with the checked keyword
        arguments, ``runner`` and ``workers`` included.
    """

    name: str
    help: str
    examples: str
    flow: str
    check: str
    options: tuple[Option, ...] = ()
    direct: bool = False

    def load(self, which: str) -> Callable[..., Any]:
        """The ``flow`` or ``check`` function, imported now (the one plug-in loader)."""
        from lrpipe.engine.plugins import load_callable

        return load_callable(getattr(self, which), f"{self.name}.{which}")

    def add_parser(self, sub) -> argparse.ArgumentParser:
        p = sub.add_parser(self.name, help=self.help, description=self.help, allow_abbrev=False,
                           epilog=self.examples,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        for option in self.options:
            option.add_to(p)
        return p

    def run(self, **settings: Any) -> Any:
        """Check every setting, then run (``flows.harness.run_command``)."""
        from flows.harness import run_command

        return run_command(self, settings)


def parse_mult(text: str) -> dict[str, float]:
    """``fc1=0.1,head=10`` -> {"fc1": 0.1, "head": 10.0} (layer names checked later)."""
    import yaml

    out = {}
    for part in (p.strip() for p in text.split(",")):
        key, sep, value = part.partition("=")
        if part and not sep:
            raise argparse.ArgumentTypeError(f"lr_mult: got {text!r}; allowed: "
                                             "layer=multiplier,..., e.g. fc1=0.1,head=10")
        if part:
            out[key.strip()] = yaml.safe_load(value)
    return out


def parse_rates(text: str) -> dict[str, float]:
    """``sgd=0.01,adam=0.001`` -> {"sgd": 0.01, "adam": 0.001}."""
    out = {}
    for item in parse_names(text):
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(
                f"reference_rates: got {text!r}; allowed: optimizer=rate pairs separated by "
                "commas, e.g. sgd=0.01,adam=0.001")
    return out


def parse_skip(text: str) -> list[str]:
    """``decay,transfer`` -> the pipeline stages to leave out (checked against STAGES)."""
    from lrpipe.experiments.pipeline import STAGES

    names = parse_names(text)
    bad = [n for n in names if n not in STAGES]
    if bad:
        raise argparse.ArgumentTypeError(f"skip: got {bad[0]!r}; allowed: {', '.join(STAGES)}")
    return names


def _seeds_text(seeds) -> str:
    return ",".join(map(str, seeds))


def declarations() -> dict[str, Command]:
    """Every command, by name, in the order ``lrpipe --help`` lists them."""
    from lrpipe.experiments import batch_size as bs
    from lrpipe.experiments import dropout as do
    from lrpipe.experiments import losses as lo
    from lrpipe.experiments import pipeline as pipe
    from lrpipe.experiments import sweep
    from lrpipe.experiments.transfer import STRATEGIES, TransferConfig
    from lrpipe.search import plan as search

    chosen = ("default: the chosen_lr of the newest lr-search run for the same dataset, model, "
              "optimizer, loss and batch size")
    schedule_names = ("constant, step, multistep, exponential, cosine, onecycle, "
                      "warmup_cosine, inverse_time, plateau")
    schedules = Option("--schedules", parse_names,
                       f"comma-separated schedule names (default: all of {schedule_names})")
    final_decay = Option("--final-decay", float,
                         "peak/last rate of every schedule (default 100)")
    commands = (
        Command("sweep", "train one model per learning rate and overlay their learning curves",
                """examples:
  lrpipe sweep                                  # MLP, SGD, Fashion-MNIST, 8 rates, 5 epochs
  lrpipe sweep --lrs 0.01,0.1,1 --epochs 3
  lrpipe sweep --set model.name=softmax --set optim.name=adam --lrs 1e-4,1e-3,1e-2
  lrpipe sweep --config sweep.yaml              # YAML: {lrs: [...], epochs: 5, overrides: {...}}
""", "flows.lr_sweep:lr_sweep", "lrpipe.experiments.sweep:check", (
                    Option("--lrs", parse_lrs, "comma-separated learning rates (default "
                           f"{','.join(f'{x:g}' for x in sweep.DEFAULT_LRS)})"),
                    Option("--epochs", int, f"epochs per rate (default {sweep.DEFAULT_EPOCHS})"),
                )),
        Command("search",
                "find a learning rate: range test + halving search on a subset, checked on "
                "full data", """examples:
  lrpipe search                                 # MLP, SGD, 5000 Fashion-MNIST examples, 3 seeds
  lrpipe search --subset 2000 --seeds 0,1,2,3 --regret-epochs 2
  lrpipe search --set optim.name=adam           # the same search for another optimizer
  lrpipe search --config search.yaml            # YAML: {subset: 5000, seeds: [0, 1, 2], ...}
""", "flows.lr_search:lr_search", "lrpipe.search.plan:check", (
                    Option("--subset", int, "training examples for the range test and halving "
                           f"rungs (default {search.DEFAULT_SUBSET})"),
                    Option("--seeds", parse_seeds, "comma-separated seeds (default "
                           f"{_seeds_text(search.DEFAULT_SEEDS)}; 3 or more for a band)"),
                    Option("--range-steps", int, "range-test updates per seed (default "
                           f"{search.DEFAULT_RANGE_STEPS})"),
                    Option("--regret-epochs", int, "epochs of full-data training per candidate "
                           f"and grid rate (default {search.DEFAULT_REGRET_EPOCHS})"),
                    Option("--grid-span", float, "decades of grid around the candidates "
                           f"(default {search.DEFAULT_GRID_SPAN:g})"),
                    Option("--confirm-seeds", parse_fresh_seeds, "fresh seeds on which the "
                           "chosen rate and its closest rival train again, out of sample "
                           f"(default {_seeds_text(search.DEFAULT_CONFIRM_SEEDS)}; none: skip)"),
                )),
        Command("decay", "train every decay schedule at the chosen rate over 3 seeds and rank "
                "them", """examples:
  lrpipe decay                                  # MLP, SGD, rate from lr-search (else 0.1)
  lrpipe decay --lr 0.1 --epochs 10 --seeds 0,1,2 --schedules cosine,step
  lrpipe decay --set model.dropout=0.2 --set optim.weight_decay=5e-4   # against overfitting
  lrpipe decay --losses cross_entropy           # skip the squared-error comparison
  lrpipe decay --set data.subset=null           # all 50,000 training examples (~2.5x longer)
  lrpipe decay --prune off                      # every schedule on every seed (27 runs, not 17)

Default budget: 8 epochs on a seeded 20,000-example subset of the Fashion-MNIST training
split (data.subset), validation on the usual 10,000 held-out examples. The schedules race
over seeds: all train on the first seed, the best third and constant on the others.
""", "flows.decay_compare:decay_compare", "flows.decay_compare:check", (
                    Option("--lr", float, f"base learning rate ({chosen})"),
                    Option("--epochs", int, "epochs per run (default 8)"),
                    Option("--seeds", parse_seeds, "comma-separated seeds (default 0,1,2)"),
                    Option("--confirm-seeds", parse_fresh_seeds, "fresh seeds on which the best "
                           "and the runner-up schedule train again, out of sample (default "
                           f"{_seeds_text(search.DEFAULT_CONFIRM_SEEDS)}; none: skip)"),
                    schedules, final_decay,
                    Option("--losses", parse_names, "training losses compared for the best "
                           "schedule (default cross_entropy,mse)"),
                    Option("--prune", str, "seeds (default): every schedule trains on the first "
                           "seed, the best third and constant on the others; off: every "
                           "schedule on every seed", metavar="{seeds,off}"),
                )),
        Command("schedules", "preview every decay schedule's rate against epoch (no training) "
                "and its total decay", """examples:
  lrpipe schedules                              # 8 epochs, 100x, rate from lr-search
  lrpipe schedules --epochs 20 --final-decay 1000 --schedules cosine,step,plateau
  lrpipe schedules --set batch_size=32 --out /tmp/schedules.png
""", "flows.schedule_preview:preview", "flows.schedule_preview:check", (
                    Option("--epochs", int, "budget in epochs (default 8)"),
                    schedules, final_decay,
                    Option("--lr", float, f"base rate drawn ({chosen}; else 0.1, "
                                                          "labelled not searched)"),
                    Option("--out", str, "where the PNG goes (default out/schedules.png)"),
                ), direct=True),
        Command("transfer", "pretrain once (kept in the model registry), then fine-tune with "
                "per-layer learning rates", """examples:
  lrpipe transfer                         # Fashion-MNIST: 5 tops -> the other 5 classes
  lrpipe transfer --lr 0.003 --epochs 5 --seeds 5
  lrpipe transfer --strategies uniform,head_mult,scratch --grid-seeds 0   # no grid
  lrpipe transfer --lr-mult fc1=0.1,fc2=0.3,head=10   # adds a "custom" strategy
  lrpipe transfer --set per_class=20 --set head_mults=[1,10,100]
  lrpipe transfer --retrain               # pretrain again though a registered model matches
""", "flows.transfer:transfer", "flows.transfer:check", (
                    Option("--lr", float, "fine-tuning base rate: every backbone layer's rate "
                           f"(default {TransferConfig.base_lr:g})"),
                    Option("--epochs", int, "fine-tuning epochs (default "
                           f"{TransferConfig.finetune_epochs})"),
                    Option("--seeds", int, "seeds per strategy (default 3)"),
                    Option("--confirm-seeds", parse_fresh_seeds, "fresh seeds on which the best "
                           "and the runner-up strategy fine-tune again, out of sample (default "
                           f"{_seeds_text(search.DEFAULT_CONFIRM_SEEDS)}; none: skip)"),
                    Option("--strategies", parse_names, "comma-separated, from "
                           f"{', '.join(STRATEGIES)}, custom (default: all)"),
                    Option("--grid-seeds", int, "seeds of the base rate x head multiplier grid, "
                           "0 = no grid (default 1)"),
                    Option("--lr-mult", parse_mult, "a custom strategy: these layers' "
                           "multipliers of the base rate", metavar="LAYER=MULT,..."),
                    Option("--model-name", str, "registered model name (default "
                           "lrpipe-pretrained-<model>)"),
                    Option("--retrain", None, "pretrain even if a registered model matches the "
                           "config", flag_only=True),
                )),
        Command("optimizers", "compare optimizers on 2-D surfaces and on Fashion-MNIST, each at "
                "its own searched rate", """examples:
  lrpipe optimizers                             # 9 entries, 4 surfaces, MLP on 10k examples
  lrpipe optimizers --optimizers sgd,adam,rprop --surfaces rosenbrock --seeds 3
  lrpipe optimizers --skip-real                 # the surfaces only (seconds)
  lrpipe optimizers --skip-surfaces --set model.name=softmax --set data.subset=20000
  lrpipe optimizers --skip-cost                 # all but the step-cost table (~110 s CPU)
""", "flows.optimizer_compare:optimizer_compare", "flows.optimizer_compare:check", (
                    Option("--optimizers", parse_names, "comma-separated optimizers (default: "
                           "all)"),
                    Option("--surfaces", parse_names, "comma-separated surfaces (default: all)"),
                    Option("--seeds", int, "seeds per optimizer on real data, >= 2 (default 3)"),
                    Option("--epochs", int, "epochs of each final run (default 5)"),
                    Option("--rprop-epochs", int, "epochs of the Rprop full- vs mini-batch runs "
                           "(default 15)"),
                    Option("--skip-surfaces", None, "skip the 2-D surfaces", flag_only=True),
                    Option("--skip-real", None, "skip the real-data comparison",
                           flag_only=True),
                    Option("--skip-second-order", None, "skip Newton and L-BFGS (surfaces, "
                           "full-batch L-BFGS on real data, the step-cost table)",
                           flag_only=True),
                    Option("--skip-cost", None, "skip the step-cost table of SGD, L-BFGS and "
                           "Newton (about 110 s CPU at full scale)", flag_only=True),
                    Option("--cost-scale", str, "full (softmax and MLPs up to 203k parameters, "
                           "default) | small (two tiny MLPs: seconds)"),
                    Option("--lbfgs-iterations", int, "full-batch L-BFGS iterations on real "
                           "data (default 50)"),
                )),
        Command("pipeline", "the whole pipeline: LR search, full training at the chosen rate, "
                "decay, transfer", """examples:
  lrpipe pipeline                               # search, full training, decay, transfer
  lrpipe pipeline --skip decay,final,transfer   # just the search and the sweep
  lrpipe pipeline --lrs 0.03,0.1,0.3 --epochs 3 # full training at these rates instead
  lrpipe pipeline --config pipeline.yaml        # YAML: {search: {subset: 3000}, skip: [...]}
""", "flows.pipeline:pipeline", "flows.pipeline:check", (
                    Option("--lrs", parse_lrs, "full-training rates (default: the search's "
                           "chosen rate and its neighbours)"),
                    Option("--epochs", int,
                           f"full-training epochs (default {pipe.DEFAULT_EPOCHS})"),
                    Option("--skip", parse_skip, "comma-separated stages to leave out: "
                           + ", ".join(pipe.STAGES)),
                    Option("--final-epochs", int, "epochs of the final model's training "
                           "(default: twice the decay comparison's, 16)"),
                    Option("--prune", str, "the decay comparison's: seeds (default: the "
                           "schedules race over seeds) | off (every schedule on every seed)",
                           metavar="{seeds,off}"),
                )),
        Command("batch-size", "the best learning rate against the batch size, with the linear "
                "and square-root rules", """examples:
  lrpipe batch-size                             # softmax, sgd+adam, batch 32..1024, 3 seeds
  lrpipe batch-size --optimizers sgd --batch-sizes 64,256,1024 --reference-batch 256 \\
      --reference-rates sgd=0.02
  lrpipe batch-size --set model.name=mlp --epochs 5 --seeds 0,1,2,3
  lrpipe batch-size --grid 0.125,0.25,0.5,1,2,4,8  # a wider grid (x the square-root rate)
""", "flows.batch_size:batch_size", "flows.batch_size:check", (
                    Option("--batch-sizes", lambda t: _numbers(t, int, "batch_sizes", "32,128"),
                           "comma-separated batch sizes (default "
                           f"{','.join(map(str, bs.DEFAULT_BATCH_SIZES))})"),
                    Option("--optimizers", parse_names, "comma-separated optimizers (default "
                           f"{','.join(bs.DEFAULT_OPTIMIZERS)})"),
                    Option("--seeds", parse_seeds, "comma-separated seeds per rate (default "
                           f"{_seeds_text(bs.DEFAULT_SEEDS)})"),
                    Option("--epochs", int, "epochs of every run, at every batch size (default "
                           f"{bs.DEFAULT_EPOCHS})"),
                    Option("--reference-batch", int, "the batch size the reference rates "
                           f"belong to (default {bs.DEFAULT_REFERENCE_BATCH})"),
                    Option("--reference-rates", parse_rates, "optimizer=rate at the reference "
                           "batch (default " + ",".join(
                               f"{o}={r:g}" for o, r in bs.DEFAULT_REFERENCE_RATES.items())
                           + ")", metavar="OPT=RATE,..."),
                    Option("--grid", lambda t: _numbers(t, float, "grid", "0.25,0.5,1,2,4"),
                           "rates per batch size, as multiples of the square-root rule's rate "
                           f"(default {','.join(f'{g:g}' for g in bs.DEFAULT_GRID)})"),
                )),
        Command("dropout", "dropout against the train/validation gap: with and without, "
                "at a small rate grid, over seeds", """examples:
  lrpipe dropout                                # MLP, SGD, 5,000 examples, rate from lr-search
  lrpipe dropout --lr 0.1 --dropout 0.3 --epochs 30
  lrpipe dropout --grid 0.1,0.316,1,3.16,10 --seeds 0,1,2,3
""", "flows.dropout:dropout_compare", "flows.dropout:check", (
                    Option("--lr", float, f"the chosen rate, the grid's centre ({chosen})"),
                    Option("--dropout", float, "the dropout arm's probability (default "
                           f"{do.DEFAULT_DROPOUT:g}; the other arm has none)"),
                    Option("--grid", lambda t: _numbers(t, float, "grid", "0.316,1,3.16"),
                           "rates per arm as multiples of the chosen rate, 1 included (default "
                           f"{','.join(f'{g:.3g}' for g in do.DEFAULT_GRID)})"),
                    Option("--seeds", parse_seeds, "comma-separated seeds per (arm, rate) "
                           f"(default {_seeds_text(do.DEFAULT_SEEDS)})"),
                    Option("--epochs", int, f"epochs of every run (default {do.DEFAULT_EPOCHS})"),
                )),
        Command("losses", "cross-entropy against squared error, each at its own searched "
                "rate (same search, same budget), over fresh seeds", """examples:
  lrpipe losses                                 # MLP, SGD, Fashion-MNIST: 2 searches, 6 runs
  lrpipe losses --subset 2000 --regret-epochs 2 --seeds 10,11,12,13
  lrpipe losses --set model.name=softmax --epochs 3
""", "flows.losses:loss_compare", "flows.losses:check", (
                    Option("--subset", int, "training examples of each search's range test "
                           f"and halving rungs (default {search.DEFAULT_SUBSET})"),
                    Option("--search-seeds", parse_seeds, "comma-separated seeds of each search "
                           f"(default {_seeds_text(search.DEFAULT_SEEDS)})"),
                    Option("--range-steps", int, "range-test updates per seed (default "
                           f"{search.DEFAULT_RANGE_STEPS})"),
                    Option("--regret-epochs", int, "epochs of each search's full-data regret "
                           f"runs (default {search.DEFAULT_REGRET_EPOCHS})"),
                    Option("--grid-span", float, "decades of regret grid around the candidates "
                           f"(default {search.DEFAULT_GRID_SPAN:g})"),
                    Option("--seeds", parse_seeds, "comma-separated comparison seeds, none of "
                           f"the search's (default {_seeds_text(lo.DEFAULT_SEEDS)})"),
                    Option("--epochs", int, "epochs of each comparison run (default "
                           f"{lo.DEFAULT_EPOCHS})"),
                )),
        Command("schedule", "serve the pipeline as a Prefect deployment re-run on a cron or "
                "interval schedule", """examples:
  lrpipe schedule                               # every night at 03:00 (cron "0 3 * * *")
  lrpipe schedule --cron "0 */6 * * *"          # every six hours
  lrpipe schedule --interval 3600 --lrs 0.01,0.1,1 --epochs 3
  make schedule CRON="30 2 * * 1-5"             # weekdays at 02:30
Runs until Ctrl-C (the schedule is paused on exit). Watch it in the Prefect UI of the
server PREFECT_API_URL names (`make server`: http://127.0.0.1:4200, or the PORT= you gave it).
""", "flows.serve:run", "flows.serve:check", (
                    Option("--cron", str, "cron schedule (default '0 3 * * *': 03:00 daily)"),
                    Option("--interval", float, "seconds between runs, instead of --cron"),
                    Option("--name", str, "deployment name (default 'scheduled')"),
                    Option("--flow", str, "pipeline (default) | sweep"),
                    Option("--lrs", parse_lrs, "learning rates passed to the flow"),
                    Option("--epochs", int, "epochs passed to the flow"),
                    Option("--port", int, "port of the local Prefect server to serve on, "
                           "127.0.0.1:PORT, started if needed (default "
                           "$PREFECT_SERVER_API_PORT, else 4200)"),
                ), direct=True),
    )
    return {c.name: c for c in commands}


COMMANDS = declarations()
