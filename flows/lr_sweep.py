"""Flow ``lr_sweep``: one training run per learning rate, fanned out as Prefect tasks.

Each rate becomes an MLflow child run of one parent run (experiment ``lr-sweep``) that holds
the overlaid figures. Rates share one task, trained as one batched computation, only where
the declared batching policy says so (``lrpipe.engine.many``, ``flows.batched.train_planned``).
Every config is built and validated before anything is recorded.
"""

from __future__ import annotations

import time

import pandas as pd
from prefect import flow

from flows.batched import train_planned
from flows.common import (
    check_runner,
    check_workers,
    parallel_tasks,
    preflight,
    set_torch_threads,
    task_resources,
)
from flows.harness import call_flow, parent_run
from flows.report import publish_report
from lrpipe import report, runs, tracking
from lrpipe.engine.config import ConfigError, TrainConfig, check_number, merge, to_dict
from lrpipe.plots import sweep as plots
from lrpipe.plots.ratios import plot_update_ratio_by_lr

HELP = "train one model per learning rate and overlay their learning curves"
EXAMPLES = """examples:
  lrpipe sweep                                  # MLP, SGD, Fashion-MNIST, 8 rates, 5 epochs
  lrpipe sweep --lrs 0.01,0.1,1 --epochs 3
  lrpipe sweep --set model.name=softmax --set optim.name=adam --lrs 1e-4,1e-3,1e-2
  lrpipe sweep --config sweep.yaml              # YAML: {lrs: [...], epochs: 5, overrides: {...}}
"""
EXPERIMENT = "lr-sweep"
# 1.0 and 3.0 diverge for the default MLP, within its first 13 and 3 updates: shown, marked
DEFAULT_LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
DEFAULT_EPOCHS = 5


def sweep_configs(base: TrainConfig, lrs) -> list[TrainConfig]:
    """One config per rate; bad rates are a ConfigError naming ``lrs`` before any work."""
    if isinstance(lrs, (str, bytes)) or not hasattr(lrs, "__iter__") or len(lrs) == 0:
        raise ConfigError(f"lrs: got {lrs!r}; allowed: a non-empty list of finite rates > 0")
    for lr in lrs:
        check_number("lrs", lr, low=0.0, low_open=True)
    if len(set(lrs)) != len(lrs):
        raise ConfigError(f"lrs: got {list(lrs)}; allowed: distinct rates")
    return [merge(base, {"optim.lr": float(lr)}) for lr in sorted(lrs)]


def summarize(results: list[dict]) -> pd.DataFrame:
    cols = ["lr", "status", "val_loss", "val_error", "best_val_error", "diverged_epoch",
            "run_id"]
    return pd.DataFrame(results)[cols].sort_values("lr").reset_index(drop=True)


def best_rate(summary: pd.DataFrame) -> pd.Series | None:
    ok = summary[summary["status"] == "ok"]
    return None if ok.empty else ok.loc[ok["val_loss"].idxmin()]


def print_summary(summary: pd.DataFrame, parent_id: str, seconds: float,
                  experiment: str = EXPERIMENT) -> None:
    """Per-rate table, the best rate, and the links to the parent run and its report."""
    print(f"\nlr_sweep: {len(summary)} rates in {seconds:.0f} s")
    print(summary.drop(columns=["run_id"]).to_string(index=False, float_format="%.4g"))
    best = best_rate(summary)
    if best is None:
        print("Every rate diverged: lower the rates (e.g. LRS=0.0001,0.001,0.01).")
    else:
        print(f"Best rate: lr={best['lr']:g}  validation loss {best['val_loss']:.4f}, "
              f"validation accuracy {1 - best['val_error']:.4f}")
    url = tracking.run_url(parent_id, experiment)
    print(f"MLflow: {url}  (start the UI with `make ui`)")
    print(f"Report: {url.split('?')[0]}/artifacts/report.md?workflowType=machine_learning")


@flow(name="lr-sweep")
def lr_sweep(
    lrs: list[float] | None = None,
    epochs: int = DEFAULT_EPOCHS,
    overrides: dict | None = None,
    runner: str = "threads",
    workers: int | None = None,
    experiment: str = EXPERIMENT,
) -> dict:
    """Train ``overrides``' config (default: MLP, SGD, Fashion-MNIST) at every rate in ``lrs``.

    Resumable: a crashed sweep of the same configs is resumed into its parent run, reusing the
    rates that finished. Returns the parent run id, the per-rate summary records and the best
    rate.
    """
    check_runner(runner)
    lrs = list(DEFAULT_LRS) if lrs is None else lrs
    base = merge(TrainConfig(), {"epochs": epochs, **(overrides or {})})
    cfgs = sweep_configs(base, lrs)
    start = time.perf_counter()
    threads = set_torch_threads(runner, workers)
    uri = tracking.tracking_uri()
    with parent_run(experiment, "lr-sweep", [c.hash() for c in cfgs],
                    f"sweep {base.optim.name} {base.model.name} {len(cfgs)} rates",
                    params={"lrs": list(lrs), "epochs": epochs, "runner": runner,
                            "base_config": tracking.to_json(to_dict(base))}) as parent:
        with task_resources(runner):  # rates batched into one task where the policy says so
            results = train_planned(cfgs, parent, experiment,
                                    [runs.training_run_name(c) for c in cfgs],
                                    threads=threads, workers=parallel_tasks(runner, workers),
                                    tags={"sweep": parent}, uri=uri, label="lr-sweep")
        history = pd.DataFrame([row for r in results for row in r["history"]])
        figures = plots.sweep_figures(history)
        if any(c.startswith("ratio/") for c in history.columns):
            figures["update_ratio"] = plot_update_ratio_by_lr(history)
        for name, fig in figures.items():
            tracking.log_figure(parent, fig, name)
        summary = summarize(results)
        tracking.log_table(parent, summary, "summary.csv")
        best = best_rate(summary)
        if best is not None:
            tracking.log_metrics(parent, {"best_lr": best["lr"], "best_val_loss":
                                          best["val_loss"], "best_val_error": best["val_error"]},
                                 step=0)
        publish_report(parent, experiment, report.sweep_report(
            summary, tracking.run_url(parent, experiment),
            lambda r: tracking.run_url(r, experiment),
            [f"figures/{n}.png" for n in figures]), key="lr-sweep")
    print_summary(summary, parent, time.perf_counter() - start, experiment)
    return {"parent_run_id": parent, "summary": summary.to_dict("records"),
            "best_lr": None if best is None else float(best["lr"])}


def add_arguments(parser) -> None:
    from flows.cli import parse_lrs

    parser.add_argument("--lrs", type=parse_lrs, help="comma-separated learning rates "
                        f"(default {','.join(f'{x:g}' for x in DEFAULT_LRS)})")
    parser.add_argument("--epochs", type=int, help=f"epochs per rate (default {DEFAULT_EPOCHS})")


def validate(lrs=DEFAULT_LRS, epochs=DEFAULT_EPOCHS, overrides=None, runner="threads",
             workers=None) -> list[TrainConfig]:
    """Every check that can fail, before anything is recorded: configs, runner, workers,
    tracking store, then data, batch size and optimizer (``preflight``). Returns the configs."""
    check_runner(runner)
    check_workers(workers)
    base = merge(TrainConfig(), {"epochs": epochs, **(overrides or {})})
    cfgs = sweep_configs(base, lrs)
    tracking.check_tracking_uri(tracking.tracking_uri())
    preflight(cfgs)
    return cfgs


def run(lrs=DEFAULT_LRS, epochs=DEFAULT_EPOCHS, overrides=None, runner="threads",
        workers=None, experiment=EXPERIMENT) -> dict:
    """Validate every input, then run the flow with the chosen task runner (process runners
    share one Prefect API, started here if none is configured)."""
    validate(lrs, epochs, overrides, runner, workers)
    return call_flow(lr_sweep, lrs=list(lrs), epochs=epochs,
                     overrides=overrides, runner=runner, workers=workers, experiment=experiment)


if __name__ == "__main__":
    run()
