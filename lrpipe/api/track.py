"""The public API's MLflow runs, written only through ``lrpipe.tracking`` (the edge).

find_lr and choose_lr: one run per call, in the experiment the caller names: params, the
curves as metric series (step = range-test step), every rule's band as metrics at step 0, the
tables as CSV artifacts, the figure, and the answer with its reason as tags. A run whose
logging fails ends FAILED.

sweep: one parent run and one child run per training, as ``lrpipe sweep`` records them:
params, per-epoch metrics (step = epoch, train_/val_ names), status and diverged_epoch tags,
NaN where a run blew up; on the parent the figures, summary.csv and report.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from lrpipe import procs, runs, tracking
from lrpipe.engine.loop import TrainResult
from lrpipe.report import sweep_finding, sweep_report
from lrpipe.search.suggest import Suggestion

REPORT_PATH = "report.md"  # where flows/report.py publishes a flow's report, too


@contextmanager
def api_run(experiment: str, name: str, params: Mapping[str, Any]) -> Iterator[str]:
    """A run that ends FINISHED, or FAILED (re-raised) if logging into it raises."""
    run_id = tracking.start_run(experiment, name, params=params, tags={"role": name.split()[0]})
    try:
        yield run_id
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    tracking.end_run(run_id, "FINISHED")


def log_curves(run_id: str, curves: pd.DataFrame) -> None:
    """Each seed's rate, raw and smoothed loss as series ``range_test_<col>/seed_<seed>``,
    step = range-test step: one write per step holding every seed (~10 ms each on the sqlite
    store, so 100 steps cost about a second whatever the number of seeds)."""
    wide = curves.pivot(index="step", columns="seed", values=["lr", "loss", "smoothed"])
    for step, row in wide.iterrows():
        tracking.log_metrics(run_id, {f"range_test_{col}/seed_{seed}": value
                                      for (col, seed), value in row.items()
                                      if pd.notna(value)}, step=int(step))


def band_metrics(bands: Mapping[str, tuple]) -> dict[str, float]:
    """``<name>_lr``, ``<name>_lr_lo``, ``<name>_lr_hi`` of every band with a median."""
    out = {}
    for name, band in bands.items():
        if band[0] is not None:
            out.update({f"{name}_lr": band[0], f"{name}_lr_lo": band[1],
                        f"{name}_lr_hi": band[2]})
    return out


def per_seed_table(bands: Mapping[str, Any], seeds: list[int]) -> pd.DataFrame:
    """rule, seed, lr, reason: every rule's answer on every seed."""
    return pd.DataFrame([{"rule": rule, "seed": s, "lr": p.lr, "reason": p.reason}
                         for rule, band in bands.items()
                         for s, p in zip(seeds, band.per_seed, strict=True)])


def log_find_lr(experiment: str, params: Mapping[str, Any], curves: pd.DataFrame,
                bands: Mapping[str, Any], suggestion: Suggestion, figure: Figure) -> str:
    """One ``find_lr`` as a run of ``experiment``; returns its run id.

    Args:
        bands: rule -> Band (median, lo, hi, per_seed), as ``suggest_band`` returns.
    """
    with api_run(experiment, f"find_lr {params.get('model', 'model')}", params) as run_id:
        log_curves(run_id, curves)
        metrics = band_metrics({r: tuple(b[:3]) for r, b in bands.items()})
        if suggestion.lr is not None:
            metrics["suggested_lr"] = suggestion.lr
        tracking.log_metrics(run_id, metrics, step=0)
        seeds = sorted(int(s) for s in curves["seed"].unique())
        tracking.log_table(run_id, curves, "range_test_curves.csv")
        tracking.log_table(run_id, per_seed_table(bands, seeds), "suggestions_per_seed.csv")
        tracking.log_figure(run_id, figure, "range_test")
        tracking.set_tags(run_id, {
            "rule": suggestion.rule, "reason": suggestion.reason[:5000],
            "suggested_lr": "none" if suggestion.lr is None else f"{suggestion.lr:.4g}"})
    return run_id


def log_choose_lr(experiment: str, params: Mapping[str, Any], tables: Mapping[str, Any],
                  choice: Mapping[str, Any], figure: Figure) -> str:
    """One ``choose_lr`` as a run of ``experiment``; returns its run id.

    Args:
        tables: curves, ladders, grid, regret (DataFrames) and bands (name -> (median, lo,
            hi)), as ``ChooseLRResult`` holds them.
        choice: lr, band (lo, hi), chosen_by, reason.
    """
    with api_run(experiment, f"choose_lr {params.get('model', 'model')}", params) as run_id:
        log_curves(run_id, tables["curves"])
        metrics = band_metrics(tables["bands"])
        metrics.update({"chosen_lr": choice["lr"], "chosen_lr_lo": choice["band"][0],
                        "chosen_lr_hi": choice["band"][1]})
        metrics.update({f"regret/{r.name}": r.regret for r in tables["regret"].itertuples()
                        if math.isfinite(r.regret)})
        tracking.log_metrics(run_id, metrics, step=0)
        for key in ("curves", "ladders", "grid", "regret"):
            tracking.log_table(run_id, tables[key], f"{key}.csv")
        tracking.log_figure(run_id, figure, "choose_lr")
        tracking.set_tags(run_id, {"chosen_lr": f"{choice['lr']:.4g}",
                                   "chosen_by": choice["chosen_by"],
                                   "reason": choice["reason"][:5000]})
    return run_id


# --- lrpipe.sweep: one parent, one child per training, as ``lrpipe sweep`` records them ---


@contextmanager
def sweep_parent(experiment: str, name: str, params: Mapping[str, Any]) -> Iterator[str]:
    """The parent run of one ``sweep``, tagged with this process (a later ``lrpipe`` command
    marks it KILLED if the process died with it RUNNING); ends FINISHED, FAILED or KILLED
    with the block (``runs.ending``)."""
    run_id = tracking.start_run(experiment, name, params=params, tags={
        "role": "sweep", "api": "lrpipe.sweep", **procs.process_tags()})
    with runs.ending(run_id):
        yield run_id


@contextmanager
def training_child(experiment: str, parent_run_id: str, name: str,
                   params: Mapping[str, Any]) -> Iterator[tuple[str, Callable[[dict], None]]]:
    """One training's child run of ``parent_run_id``: yields (run id, an ``on_epoch(row)``
    hook logging each History row with step=epoch, train_/val_ names); ends FINISHED, FAILED
    or KILLED with the block, its waiting epoch metrics written."""
    run_id = tracking.start_run(experiment, name, params=params, parent_run_id=parent_run_id,
                                tags={"sweep": parent_run_id, "trained": "alone",
                                      **procs.process_tags()})
    with runs.ending(run_id):
        yield run_id, tracking.epoch_logger(run_id)


def log_outcome(run_id: str, result: TrainResult) -> None:
    """Tags status (ok | diverged), diverged_epoch and device; where it blew up, NaN losses
    and ``diverged=1`` at step=diverged_epoch (``tracking.log_divergence``), as the flows do."""
    tracking.set_tags(run_id, {"status": result.status, "device": result.device,
                               "diverged_epoch": result.diverged_epoch or ""})
    if result.status == "diverged":
        tracking.log_divergence(run_id, result.diverged_epoch)


def log_sweep(parent_run_id: str, experiment: str, summary: pd.DataFrame,
              by_rate: pd.DataFrame, figures: Mapping[str, Figure], title: str) -> None:
    """On the parent: the figures (``figures/<name>.png``), ``summary.csv`` (one row per
    training), best_lr / best_val_loss / best_val_error at step 0 when a rate trained, and
    ``report.md`` (``lrpipe.report.sweep_report`` of ``by_rate``, one row per rate)."""
    for name, fig in figures.items():
        tracking.log_figure(parent_run_id, fig, name)
    tracking.log_table(parent_run_id, summary, "summary.csv")
    best = sweep_finding(by_rate).best_lr
    if best is not None:
        row = by_rate[by_rate["lr"] == best].iloc[0]
        tracking.log_metrics(parent_run_id, {"best_lr": best, "best_val_loss": row["val_loss"],
                                             "best_val_error": row["val_error"]}, step=0)
    markdown = sweep_report(by_rate, tracking.run_url(parent_run_id, experiment),
                            lambda run_id: tracking.run_url(run_id, experiment),
                            [f"figures/{name}.png" for name in figures], title=title)
    tracking.log_text(parent_run_id, markdown, REPORT_PATH)
