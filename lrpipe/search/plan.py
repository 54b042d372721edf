"""The learning-rate search's design: what it runs, and how its evidence is summarized.

On a seeded subset, the LR range test and the halving search per seed; each rule's suggestion
and the halving answer summarized over seeds (median in log rate, min..max band) and
cross-checked; then short full-data trainings at every candidate and at a coarse log grid
around them (the regret check). Pure functions: configs in, configs, tables and text out. The
flow ``flows.lr_search`` runs and logs what this module plans.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from lrpipe.engine.config import TrainConfig, check_number, merge
from lrpipe.experiments.bands import check_seed_list
from lrpipe.experiments.confirm import check_fresh_seeds
from lrpipe.search.choose import RTOL, candidate_grid, candidate_rates, cross_check, log_median_band
from lrpipe.search.rangetest import suggest_band
from lrpipe.search.suggest import RULES

EXPERIMENT = "lr-search"
DEFAULT_SUBSET = 5000  # training examples the range test and halving rungs see (seeded draw)
DEFAULT_SEEDS = (0, 1, 2)  # halving answers 0.156 / 0.039 / 0.078 for these: report a band
DEFAULT_RANGE_STEPS = 100  # range-test updates (about 2.5 epochs of 5000 at batch 128)
DEFAULT_REGRET_EPOCHS = 3  # epochs of full-data training per candidate and grid rate
DEFAULT_CONFIRM_SEEDS = (100, 101, 102)  # used by no search, sweep or default config
DEFAULT_GRID_SPAN = 1.0  # decades of grid below the lowest and above the highest candidate
POINTS_PER_DECADE = 2  # coarse grid: 0.01, 0.0316, 0.1, 0.316, ...
RANGE_OPTS = {"min_lr": 1e-5, "max_lr": 10.0}  # reference rates at the ramp's ends
HALVING_OPTS = {"start_lr": 10.0, "factor": 0.5, "min_lr": 1e-5, "budget_epochs": 1}
GRID_COLUMNS = ["lr", "status", "val_loss", "val_error", "diverged_epoch", "name", "run_id"]


def search_configs(overrides: Mapping | None, subset: int,
                   regret_epochs: int) -> tuple[TrainConfig, TrainConfig]:
    """(full-data config for the regret runs, subset config for range test and halving)."""
    check_number("subset", subset, low=1, integer=True)
    check_number("regret_epochs", regret_epochs, low=1, integer=True)
    base = merge(TrainConfig(), {**(overrides or {}), "epochs": regret_epochs})
    return base, base.replace(**{"data.subset": subset})


def check_search(seeds, range_steps, grid_span) -> list[int]:
    """The seeds as a list; bad values are a ConfigError naming the setting."""
    seeds = check_seed_list("seeds", seeds)
    check_number("range_steps", range_steps, low=5, integer=True)
    check_number("grid_span", grid_span, low=0.0)
    return list(seeds)


def check(subset: int = DEFAULT_SUBSET, seeds: Sequence[int] = DEFAULT_SEEDS,
          range_steps: int = DEFAULT_RANGE_STEPS, regret_epochs: int = DEFAULT_REGRET_EPOCHS,
          grid_span: float = DEFAULT_GRID_SPAN, overrides: Mapping | None = None,
          experiment: str = EXPERIMENT,
          confirm_seeds: Sequence[int] = DEFAULT_CONFIRM_SEEDS) -> tuple[dict, list[TrainConfig]]:
    """The flow's keyword arguments and the configs to preflight, or a ConfigError."""
    base, sub = search_configs(overrides, subset, regret_epochs)
    seeds = check_search(seeds, range_steps, grid_span)
    confirm_seeds = check_fresh_seeds(confirm_seeds, [*seeds, base.seed])
    return {"subset": subset, "seeds": seeds, "range_steps": range_steps,
            "regret_epochs": regret_epochs, "grid_span": grid_span, "overrides": overrides,
            "experiment": experiment, "confirm_seeds": list(confirm_seeds)}, [base, sub]


def summarize_evidence(curves: pd.DataFrame, halvings: list[dict]) -> dict:
    """Bands (halving first, then each rule), candidates and the cross-check table."""
    rules = {rule: suggest_band(curves, rule) for rule in RULES}
    bands = {"halving": log_median_band([h["chosen_lr"] for h in halvings]),
             **{rule: tuple(band[:3]) for rule, band in rules.items()}}
    candidates = candidate_rates(bands)
    halving_lr = bands["halving"][0]
    table = (cross_check(halving_lr, {r: bands[r][0] for r in RULES}) if halving_lr is not None
             else pd.DataFrame(columns=["rule", "lr", "ratio_to_halving", "log10_ratio"]))
    per_seed = pd.DataFrame(
        [{"method": "halving", "seed": h["seed"], "lr": h["chosen_lr"], "reason": h["reason"]}
         for h in halvings]
        + [{"method": rule, "seed": seed, "lr": s.lr, "reason": s.reason}
           for rule, band in rules.items()
           for seed, s in zip(sorted(curves["seed"].unique()), band.per_seed, strict=True)])
    return {"bands": bands, "candidates": candidates, "cross_check": table,
            "per_seed": per_seed}


def grid_plan(base: TrainConfig, candidates: Mapping[str, float], grid_span: float,
              name: callable) -> tuple[list[TrainConfig], list[str], list[dict]]:
    """The regret runs: (configs, run names, tags) at every candidate and coarse-grid rate;
    ``name(cfg)`` names a training run, a candidate's run adds the candidates it stands for."""
    grid = candidate_grid(list(candidates.values()), POINTS_PER_DECADE, grid_span)
    cfgs = [base.replace(**{"optim.lr": lr}) for lr in grid]
    roles = [[n for n, r in candidates.items() if math.isclose(r, lr, rel_tol=RTOL)]
             for lr in grid]
    names = [name(c) + (f" ({', '.join(r)})" if r else "")
             for c, r in zip(cfgs, roles, strict=True)]
    tags = [{"role": "candidate" if r else "grid", "candidates": ",".join(r)} for r in roles]
    return cfgs, names, tags


def _rate(x: float | None) -> str:
    return "none" if x is None or not math.isfinite(x) else f"{x:.3g}"


def search_report(evidence: dict, halvings: list[dict], grid: pd.DataFrame,
                  regret: pd.DataFrame, choice: dict, regret_epochs: int) -> str:
    """The answer and its evidence, as plain text (printed and logged as report.txt)."""
    lo, hi = choice["band"]
    median, h_lo, h_hi = evidence["bands"]["halving"]
    lines = [f"Chosen rate: {_rate(choice['lr'])}  (band {_rate(lo)}..{_rate(hi)}, "
             f"chosen by {choice['chosen_by']})", f"  why: {choice['reason']}", "",
             "Halving search ({budget_epochs}-epoch rungs from {start_lr:g}, x{factor:g}): "
             .format(**HALVING_OPTS)
             + ", ".join(f"seed {h['seed']} -> {_rate(h['chosen_lr'])}" for h in halvings),
             f"  median {_rate(median)}, spread {_rate(h_lo)}..{_rate(h_hi)}"
             + (f" ({h_hi / h_lo:.1f}x)" if h_lo else ""), "",
             "Range-test suggestions (median and min..max over seeds):"]
    for rule in RULES:
        m, r_lo, r_hi = evidence["bands"][rule]
        lines.append(f"  {rule:<12} {_rate(m):>8}   {_rate(r_lo)}..{_rate(r_hi)}")
    table = evidence["cross_check"]
    if len(table):
        lines += ["", "Cross-check against the halving median:",
                  table.to_string(index=False, float_format="%.3g")]
    lines += ["", f"Regret ({regret_epochs} epochs of full-data training; regret = val loss / "
              "grid best - 1):", regret.to_string(index=False, float_format="%.4g"), "",
              "Grid:", grid.drop(columns=["run_id", "name"]).to_string(
                  index=False, float_format="%.4g")]
    return "\n".join(lines)


# --- which search a rate may come from ------------------------------------------------------

SEARCHED_TAG = "searched_identity"  # on a search's parent: the identity of what it searched
SEARCHED_FOR_TAG = "searched_for"  # the same, in words


def searched_part(cfg: TrainConfig) -> dict:
    """What a searched rate depends on: the dataset (and its class selection), the model, the
    optimizer without its rate, the loss and the batch size. Not the subset, the validation
    split, the epochs, the seed or the schedule: the search varies those itself."""
    optim = {k: v for k, v in dataclasses.asdict(cfg.optim).items() if k != "lr"}
    return {"dataset": cfg.data.dataset, "classes": cfg.data.classes,
            "model": dataclasses.asdict(cfg.model), "optim": optim, "loss": cfg.loss,
            "batch_size": cfg.batch_size}


def searched_identity(cfg: TrainConfig) -> str:
    """16 hex digits naming ``searched_part(cfg)``: equal for every config one search serves."""
    text = json.dumps(searched_part(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe_searched(cfg: TrainConfig) -> str:
    """``searched_part`` in words: ``mlp [256] · momentum 0.9 · cross_entropy ·
    fashion_mnist · batch 128``."""
    model = cfg.model.name + (f" {list(cfg.model.hidden)}" if cfg.model.name == "mlp" else "")
    if cfg.model.dropout:
        model += f" dropout {cfg.model.dropout:g}"
    optim = cfg.optim.name
    if cfg.optim.name in ("momentum", "nesterov", "gains"):
        optim += f" momentum {cfg.optim.momentum:g}"
    if cfg.optim.weight_decay:
        optim += f" weight_decay {cfg.optim.weight_decay:g}"
    data = cfg.data.dataset + (f" classes {list(cfg.data.classes)}" if cfg.data.classes else "")
    return f"{model} · {optim} · {cfg.loss} · {data} · batch {cfg.batch_size}"


def search_command(cfg: TrainConfig, overrides: Mapping | None = None) -> str:
    """The command that runs the search ``cfg``'s rate should come from."""
    sets = " ".join(f"--set {k}={v}" for k, v in sorted((overrides or {}).items())
                    if not k.startswith(("optim.lr", "epochs", "seed", "schedule")))
    return "lrpipe search" + (f" {sets}" if sets else "")


# --- the chosen rate, confirmed on fresh seeds ------------------------------------------------



def rival_rate(grid: pd.DataFrame, chosen: float) -> float | None:
    """The rate the choice had to beat: of the regret runs' rates other than ``chosen``, the
    one with the lowest mean validation (selection) loss among those that finished; None when
    there is no such rate."""
    ok = grid[(grid["status"] != "diverged") & np.isfinite(grid["val_loss"].astype(float))]
    per_rate = ok.groupby("lr")["val_loss"].mean()
    per_rate = per_rate[[not math.isclose(lr, chosen, rel_tol=RTOL) for lr in per_rate.index]]
    return None if per_rate.empty else float(per_rate.idxmin())


def confirm_plan(base: TrainConfig, chosen: float, rival: float, seeds: Sequence[int],
                 name: callable) -> tuple[list[TrainConfig], list[str], list[dict]]:
    """The confirmation runs: the chosen and the rival rate on each fresh seed, at the regret
    runs' budget: (configs, run names, tags)."""
    cfgs, names, tags = [], [], []
    for role, lr in (("chosen", chosen), ("rival", rival)):
        for seed in seeds:
            cfg = base.replace(**{"optim.lr": lr, "seed": seed})
            cfgs.append(cfg)
            names.append(f"{name(cfg)} (confirm {role})")
            tags.append({"role": f"confirm_{role}"})
    return cfgs, names, tags
