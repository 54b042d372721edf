"""Flow ``dropout``: does dropout close the train/validation gap, at what cost, at which rate?

Two arms (no dropout, dropout p) x a small grid of rates around the chosen one (``--lr``,
else the newest lr-search's ``chosen_lr`` for the same dataset, model, optimizer, loss and
batch size) x several seeds, each run an MLflow child of one parent run (experiment
``dropout``), batched where the declared policy says so (``flows.batched.train_planned``).
The parent gets the figure (the gap against epoch for both arms at the chosen rate; final
validation loss against rate per arm), the tables and a report (the verdict of
``lrpipe.experiments.dropout``). A crashed run of the same plan resumes into its
parent and reuses its finished runs.
"""

from __future__ import annotations

import time

import pandas as pd
from prefect import flow

from flows.batched import train_planned
from flows.common import check_runner, parallel_tasks, set_torch_threads, task_resources
from flows.harness import parent_run
from flows.report import publish_flow_report
from flows.schedule_preview import resolve_lr
from lrpipe import report, runs, tracking
from lrpipe.engine.config import TrainConfig, check_number, to_dict
from lrpipe.experiments import dropout as exp
from lrpipe.experiments.bands import band_text

EXPERIMENT = "dropout"
FIGURE = "dropout_gap"


def make_plan(lr=None, dropout=exp.DEFAULT_DROPOUT, grid=None, seeds=None,
              epochs=exp.DEFAULT_EPOCHS, overrides=None):
    """(plan, where the rate came from, base config, one config per run); a bad setting is a
    ConfigError naming it."""
    base = exp.base_config(overrides)
    rate, source = resolve_lr(lr, base, overrides)  # the search matching base, else an error
    plan = exp.DropoutPlan(lr=rate, dropout=dropout,
                           grid=exp.DEFAULT_GRID if grid is None else grid,
                           seeds=exp.DEFAULT_SEEDS if seeds is None else seeds, epochs=epochs)
    return plan, source, base, exp.plan_configs(base, plan)


def arms_table(rates: pd.DataFrame, best: pd.DataFrame) -> pd.DataFrame:
    """Per (arm, rate), the report's and the terminal's table: final losses, errors and gap,
    mean [min..max] over seeds, and which rate is the arm's best."""
    best_lr = best.set_index("dropout")["best_lr"]

    def cell(r, col, digits=4):
        return band_text((r[f"{col}_mean"], r[f"{col}_min"], r[f"{col}_max"]), digits)

    return pd.DataFrame([{
        "arm": exp.arm_label(r["dropout"]), "lr": f"{r['lr']:.3g}",
        "train loss": cell(r, "train_loss"), "val loss": cell(r, "val_loss"),
        "gap (val - train)": cell(r, "gap"), "val error": cell(r, "val_error"),
        "train error": cell(r, "train_error"),
        "best": "yes" if r["lr"] == best_lr.get(r["dropout"]) else ""}
        for r in rates.to_dict("records")])


def evidence(plan: exp.DropoutPlan, source: str, base: TrainConfig) -> list[str]:
    return [f"rate {plan.chosen_rate():g} from {source}; grid "
            f"{', '.join(f'{r:g}' for r in plan.rates())}",
            f"{base.model.name} {base.optim.name} on {base.data.dataset} (subset "
            f"{base.data.subset or 'all'}), {plan.epochs} epochs, seeds "
            f"{', '.join(map(str, plan.seeds))}; losses evaluated in eval mode (dropout off)"]


def notes(analysis: exp.DropoutAnalysis, plan: exp.DropoutPlan) -> list[str]:
    out = [f"{exp.arm_label(r.dropout)}: its best rate {r.best_lr:.3g} is the grid's edge; widen "
           "--grid to see past it." for r in analysis.best[analysis.best["at_edge"]].itertuples()]
    bad = int(analysis.rates["n_bad"].sum())
    if bad:
        out.append(f"{bad} runs diverged; their rates count as infinitely bad.")
    if len(plan.seeds) < 3:
        out.append(f"{len(plan.seeds)} seed(s): too few for a band (3 or more).")
    return out


def log_results(parent: str, analysis: exp.DropoutAnalysis, history: pd.DataFrame) -> None:
    from lrpipe.plots.dropout import plot_dropout  # drawing libraries load after training

    tracking.log_figure(parent, plot_dropout(analysis.curves, analysis.rates, analysis.best),
                        FIGURE)
    for name, table in (("rates.csv", analysis.rates), ("best.csv", analysis.best),
                        ("gap_curves.csv", analysis.curves), ("history.csv", history)):
        tracking.log_table(parent, table, name)
    metrics = {"gap_no_dropout": analysis.gap["b"][0], "gap_dropout": analysis.gap["a"][0],
               "val_error_no_dropout": analysis.error["b"][0],
               "val_error_dropout": analysis.error["a"][0]}
    tracking.log_metrics(parent, metrics, step=0)
    tracking.set_tags(parent, {"mlflow.note.content": analysis.answer,
                               "gap_winner": analysis.gap["winner"]})


@flow(name="dropout")
def dropout_compare(
    lr: float | None = None,
    dropout: float = exp.DEFAULT_DROPOUT,
    grid: list[float] | None = None,
    seeds: list[int] | None = None,
    epochs: int = exp.DEFAULT_EPOCHS,
    overrides: dict | None = None,
    runner: str = "threads",
    workers: int | None = None,
    experiment: str = EXPERIMENT,
) -> dict:
    """Train both arms over the grid and seeds; say whether dropout closes the gap, at what
    cost in validation error, and whether it needs another rate. Returns the parent run id,
    the answer, the per-rate and best-rate records and the two comparisons."""
    check_runner(runner)
    plan, source, base, cfgs = make_plan(lr, dropout, grid, seeds, epochs, overrides)
    start = time.perf_counter()
    threads = set_torch_threads(runner, workers)
    with parent_run(experiment, "dropout", [c.hash() for c in cfgs],
                    f"dropout {plan.dropout:g} vs none {base.model.name} lr={plan.lr:.3g}",
                    params={"lr": plan.lr, "lr_source": source, "dropout": plan.dropout,
                            "grid": list(plan.grid), "seeds": list(plan.seeds),
                            "epochs": plan.epochs, "runner": runner,
                            "base_config": tracking.to_json(to_dict(base))}) as parent:
        with task_resources(runner):
            finals = train_planned(
                cfgs, parent, experiment,
                [runs.training_run_name(c, prefix=f"dropout={c.model.dropout:g} ")
                 for c in cfgs], threads=threads, workers=parallel_tasks(runner, workers),
                tags={"sweep": parent}, uri=tracking.tracking_uri(), label="dropout")
        history = exp.history_table(cfgs, finals)
        analysis = exp.analyze(history, plan)
        log_results(parent, analysis, history)
        table = arms_table(analysis.rates, analysis.best)
        publish_flow_report(parent, experiment, "Dropout against the train/validation gap",
                            analysis.answer, table, evidence(plan, source, base),
                            notes(analysis, plan), key=EXPERIMENT)
    url = tracking.run_url(parent, experiment)
    print(f"\ndropout: {len(cfgs)} runs in {time.perf_counter() - start:.0f} s")
    print(report.terminal_summary(analysis.answer, evidence(plan, source, base), table,
                                  {"the parent run (figure, tables)": url},
                                  notes(analysis, plan)))
    return {"parent_run_id": parent, "answer": analysis.answer, "lr": plan.chosen_rate(),
            "lr_source": source, "rates": analysis.rates.to_dict("records"),
            "best": analysis.best.to_dict("records"), "gap": analysis.gap,
            "error": analysis.error}


def check(lr=None, dropout=exp.DEFAULT_DROPOUT, grid=None, seeds=None,
          epochs=exp.DEFAULT_EPOCHS, overrides=None,
          experiment=EXPERIMENT) -> tuple[dict, list[TrainConfig]]:
    """The flow's keyword arguments and one config per arm to preflight, or a ConfigError
    naming the field."""
    check_number("epochs", epochs, low=1, integer=True)
    plan, _, _, cfgs = make_plan(lr, dropout, grid, seeds, epochs, overrides)
    kwargs = {"lr": lr, "dropout": plan.dropout, "grid": list(plan.grid),
              "seeds": list(plan.seeds), "epochs": epochs, "overrides": overrides,
              "experiment": experiment}
    return kwargs, list({c.model.dropout: c for c in cfgs}.values())
