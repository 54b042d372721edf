"""Flow ``optimizer_compare``: optimizers side by side, each at its own fairly searched rate.

Two parts under one parent run (experiment ``optimizers``):

* 2-D surfaces: one task per (surface, optimizer) tunes the rate on the same 19-rate grid with
  the same step budget for all, runs from the same start, and logs a child run (tuned rate,
  final loss, distance to the minimum, the loss against step). The parent gets per surface the
  contour with every path, loss against step, an animated GIF and a summary table.
* Real data (Fashion-MNIST subset): one search task per optimizer (the same 8 short trainings
  for all, ``lrpipe.experiments.optimizers.search_rate``), then every optimizer at its own rate over
  several seeds, each a training child run; curves with bands, a final-error table and the
  update/weight-ratio heatmap. Gains enter twice: plain ``gains`` (momentum 0) and
  ``gains_momentum`` (0.9; ``lrpipe.experiments.entries``). Plus Rprop full-batch against
  mini-batch on the same subset at equal epochs AND at equal updates (three arms).
* Second order (``flows.optimizer_second_order``, unless ``skip_second_order``): Newton and
  L-BFGS beside the race on every surface, full-batch L-BFGS (softmax) against SGD at its
  searched rate, and the step-cost table (unless ``skip_cost``).

The real-data winner at its searched rate is then trained again on fresh seeds without the test
split and scored once on it (``test_winner``): its test figure, reported beside the choice.

A re-run of a killed comparison resumes into its parent (``flows.harness``) and reuses every
child that FINISHED: trainings by config hash (``flows.children``), surface tasks and rate
searches by their task key, their results rebuilt from what the child logged.
"""

from __future__ import annotations

import time

import pandas as pd
import torch
from prefect import flow, task, unmapped

from flows import optimizer_second_order as second
from flows.batched import describe_task, train_planned
from flows.children import member, train_children
from flows.common import (
    check_runner,
    collect,
    dataset_for,
    describe_result,
    parallel_tasks,
    set_torch_threads,
)
from flows.harness import flow_parent
from flows.optimizer_report import SEARCH_NOTE, print_summary, report_optimizers
from flows.optimizer_surfaces import (
    compare_on_surface_task,
    describe_surface,
    log_surfaces,
)
from flows.tested import log_test
from lrpipe import procs, resume, runs, tracking
from lrpipe.engine.config import (
    ConfigError,
    DataConfig,
    TrainConfig,
    check_choice,
    check_number,
    from_dict,
    is_plugin,
    merge,
    to_dict,
)
from lrpipe.experiments import optimizers as real
from lrpipe.experiments.confirm import fresh_seeds
from lrpipe.experiments.entries import ENTRY_NAMES, entry_config
from lrpipe.experiments.final import test_set_name
from lrpipe.experiments.surfaces import SURFACES
from lrpipe.plots.ratios import plot_update_ratio
from lrpipe.plots.surfaces import optimizer_palette
from lrpipe.search.plan import DEFAULT_CONFIRM_SEEDS

EXPERIMENT = "optimizers"
DEFAULT_SEEDS = 3  # a band needs at least 2; 3 is the house minimum for a comparison
DEFAULT_EPOCHS = 5  # epochs of each final run (passes over the subset)
DEFAULT_SUBSET = 10_000  # training examples: ~0.3 s CPU per MLP epoch
RPROP_EPOCHS = 15  # full-batch Rprop takes one step per epoch: it needs more epochs
RPROP_TITLE = "Rprop: full batch vs mini-batch, at equal epochs and at equal updates"


def check_settings(optimizers, surfaces, seeds, epochs, rprop_epochs, skip_surfaces,
                   skip_real, skip_second_order=False, skip_cost=False, cost_scale="full",
                   lbfgs_iterations=second.LBFGS_ITERATIONS) -> tuple[list[str], list[str]]:
    """Validate the flow's own settings; return (optimizers, surfaces) as lists."""
    lists = {}
    for name, value, allowed in (("optimizers", optimizers, ENTRY_NAMES),
                                 ("surfaces", surfaces, tuple(SURFACES))):
        if isinstance(value, str) or not hasattr(value, "__iter__") or len(value) == 0 or any(
                v not in allowed for v in value) or len(set(value)) != len(value):
            raise ConfigError(f"{name}: got {value!r}; allowed: distinct names from "
                              f"{', '.join(allowed)}")
        lists[name] = list(value)
    check_number("seeds", seeds, low=2, integer=True)
    check_number("epochs", epochs, low=1, integer=True)
    check_number("rprop_epochs", rprop_epochs, low=1, integer=True)
    check_number("lbfgs_iterations", lbfgs_iterations, low=1, integer=True)
    check_choice("cost_scale", cost_scale, tuple(second.COST_SCALES))
    for name, flag in (("skip_surfaces", skip_surfaces), ("skip_real", skip_real),
                       ("skip_second_order", skip_second_order), ("skip_cost", skip_cost)):
        if not isinstance(flag, bool):
            raise ConfigError(f"{name}: got {flag!r}; allowed: true or false")
    if skip_surfaces and skip_real:
        raise ConfigError("skip_surfaces, skip_real: both set; allowed: at most one (else "
                          "there is nothing to compare)")
    return lists["optimizers"], lists["surfaces"]


def base_config(epochs: int, overrides: dict | None) -> TrainConfig:
    """The real-data config every optimizer shares (default: MLP on 10,000 examples)."""
    overrides = overrides or {}
    nested = overrides.get("optim") if isinstance(overrides.get("optim"), dict) else {}
    for key in ("optim.name", "optim.lr"):
        if key in overrides or key.split(".")[1] in nested:
            raise ConfigError(f"{key}: set by this flow (--optimizers, and each optimizer's "
                              "searched rate); allowed: other fields, e.g. model.name")
    cfg = merge(TrainConfig(data=DataConfig(subset=DEFAULT_SUBSET)),
                {"epochs": epochs, **overrides})
    if is_plugin(cfg.data.dataset) and "data.subset" not in overrides:
        return cfg.replace(**{"data.subset": None})  # a plug-in's data: all of its training set
    return cfg


# --- real data ---

def search_key(cfg: TrainConfig) -> str:
    """The task key of the rate search of ``cfg`` (its optimizer set): the config and the
    search's rates and budget."""
    return resume.task_key("search_rate", {"config": cfg.hash(), "epochs": 1,
                                           "decades": list(real.SEARCH_DECADES)})


def reused_search(cfg: TrainConfig, optimizer: str, parent_run_id: str) -> dict | None:
    """The result of entry ``optimizer``'s rate search (``cfg``) rebuilt from its FINISHED
    child under ``parent_run_id`` (``search.csv``, metric ``searched_lr``, tag ``reason``), or
    None."""
    run = resume.finished_task(parent_run_id, search_key(cfg)) if parent_run_id else None
    table = None if run is None else resume.logged_table(run.info.run_id, "search.csv")
    if table is None:
        return None
    return {"optimizer": optimizer, "lr": run.data.metrics.get("searched_lr"),
            "reason": run.data.tags["reason"], "table": table, "reused": True}


@task(name="search-rate", task_run_name="search {optimizer}")
def search_rate_task(cfg_dict: dict, optimizer: str, parent_run_id: str, experiment: str,
                     threads: int = 1) -> dict:
    """One entry's rate search (the same 8 short trainings for all) as one child run.
    Under a resumed parent, a FINISHED child of the same search is reused (``reused`` True)."""
    torch.set_num_threads(threads)
    cfg = entry_config(from_dict(cfg_dict), optimizer)
    if (done := reused_search(cfg, optimizer, parent_run_id)) is not None:
        return done
    run_id = tracking.start_run(
        experiment, f"search {optimizer} {cfg.model.name}", parent_run_id=parent_run_id,
        params={"optimizer": optimizer, "optim.name": cfg.optim.name,
                "optim.momentum": cfg.optim.momentum, "decades": list(real.SEARCH_DECADES),
                "search_epochs": 1, "seed": cfg.seed, "config_hash": cfg.hash()},
        tags={"optimizer": optimizer, "part": "search", resume.TASK_TAG: search_key(cfg),
              **procs.process_tags()})
    with runs.ending(run_id):
        found = real.search_rate(cfg, dataset_for(cfg))
        table = found.table.assign(optimizer=optimizer, chosen=found.table["lr"] == found.lr)
        tracking.log_table(run_id, table, "search.csv")
        tracking.set_tags(run_id, {"reason": found.reason})
        if found.lr is not None:
            tracking.log_metrics(run_id, {"searched_lr": found.lr}, step=0)
    return {"optimizer": optimizer, "lr": found.lr, "reason": found.reason, "table": table,
            "reused": False}


def describe_search(result: dict) -> str:
    return (f"search {result['optimizer']}: {result['reason']}"
            + (" (finished before, reused)" if result.get("reused") else ""))


def submit_training(runs: list[real.Run], parent: str, experiment: str, threads: int):
    if not runs:
        return []
    return train_children.map([[member(r.cfg, r.name, r.tags)] for r in runs], unmapped(parent),
                              unmapped(experiment), unmapped(threads))


def log_real(parent: str, searches: list[dict], history: pd.DataFrame) -> pd.DataFrame:
    """Search table and figure, curves with bands, final-error table, ratio heatmap."""
    palette = optimizer_palette()
    search = pd.concat([s["table"] for s in searches], ignore_index=True)
    tracking.log_table(parent, search, "search.csv")
    tracking.log_figure(parent, real.plot_rate_search(search, palette=palette), "rate_search")
    if history.empty:
        return pd.DataFrame()
    for metric in ("val_loss", "val_error", "train_loss"):
        tracking.log_figure(parent, real.plot_metric_bands(history, metric, palette=palette),
                            f"real_{metric}")
    tracking.log_figure(parent, plot_update_ratio(history, by="optimizer"), "update_ratio")
    table = real.final_table(history)
    tracking.log_table(parent, table, "real_summary.csv")
    tracking.log_metrics(parent, {f"final_val_error/{r.optimizer}": r.val_error_mean
                                  for r in table.itertuples()}, step=0)
    return table


def log_rprop(parent: str, history: pd.DataFrame) -> pd.DataFrame:
    """The three Rprop arms against epochs (equal epochs) and updates (equal updates), their
    table (with epochs and updates reached) and the claim in words (``rprop_claim``)."""
    for metric in ("val_loss", "val_error"):
        for x, suffix in (("epoch", ""), ("updates", "_by_updates")):
            fig = real.plot_metric_bands(history, metric, by="batch", title=RPROP_TITLE, x=x)
            tracking.log_figure(parent, fig, f"rprop_batch_{metric}{suffix}")
    table = real.rprop_table(history)
    tracking.log_table(parent, table, "rprop_batches.csv")
    tracking.log_text(parent, real.rprop_claim(table), "rprop_claim.txt")
    return table


def compare_real(plan: dict, parent: str, experiment: str, threads: int, pending,
                 workers: int) -> dict:
    """Collect the searches, train every entry at its rate (an optimizer's seeds batched
    into one task per worker where measured to pay), collect Rprop; log all. Then full-batch
    L-BFGS against SGD at its searched rate (needs ``sgd`` among the entries)."""
    base = plan["base"]
    searches = collect(pending["search"], "optimizers-search", describe_search)
    rates = {s["optimizer"]: s["lr"] for s in searches if s["lr"] is not None}
    lbfgs = (second.lbfgs_task.submit(to_dict(second.lbfgs_config(base)), rates["sgd"],
                                      plan["lbfgs_iterations"], threads)
             if not plan["skip_second_order"] and "sgd" in rates else None)
    runs = real.compare_runs(base, rates, plan["seeds"])
    finals = train_planned([r.cfg for r in runs], parent, experiment, [r.name for r in runs],
                           threads=threads, workers=workers, tags=[r.tags for r in runs],
                           label="optimizers-train") if runs else []
    rprop = [r for out in collect(pending["rprop"], "optimizers-rprop",
                                  describe_task(describe_result)) for r in out]
    n_train = len(dataset_for(base).train)
    history = real.history_frame(runs, finals, "optimizer")
    table = log_real(parent, searches, history)
    rprop_table = (log_rprop(parent, real.history_frame(
        pending["rprop_runs"], rprop, "batch", len(dataset_for(real.rprop_base(base)).train)))
        if rprop else pd.DataFrame())
    seeds = real.compare_seeds(base, plan["seeds"])
    out = {"searches": searches, "real": table, "rprop": rprop_table,
           "real_versus": None if table.empty else real.best_against_runner_up(history, table),
           "data": (f"{base.data.dataset}, {n_train} training examples, {base.model.name}, "
                    f"{base.epochs} epochs, seeds {seeds[0]}-{seeds[-1]} (out of sample: "
                    f"every rate was searched on seed {base.seed})")}
    if not table.empty:
        out.update(test_winner(plan, table, parent, experiment, threads))
    if lbfgs is not None:
        out["full_batch"] = lbfgs.result()
        second.log_full_batch(parent, out["full_batch"])
    return out


def test_seeds(plan: dict) -> tuple[int, ...]:
    """The winner's test runs' seeds: as many as the comparison's, none of the search's or
    the comparison's (``confirm.fresh_seeds`` from ``DEFAULT_CONFIRM_SEEDS``)."""
    base = plan["base"]
    used = [base.seed, *real.compare_seeds(base, plan["seeds"])]
    return fresh_seeds(used, plan["seeds"], DEFAULT_CONFIRM_SEEDS[0])


def test_winner(plan: dict, table: pd.DataFrame, parent: str, experiment: str,
                threads: int) -> dict:
    """The recommended recipe, the real-data winner (``table``'s first row, ranked on the
    selection split before this runs) at its searched rate, trained again on ``test_seeds``
    without the test split and scored once on it (``test`` members of ``flows.children``):
    ``test`` (the ``test_summary``, also on the parent) and ``test_line``. Fresh seeds, not
    the comparison's: the winner's comparison runs are the ones that won, and a test figure on
    the seeds that chose would inherit their luck where selection and test errors move
    together."""
    winner, lr = table["optimizer"].iloc[0], float(table["lr"].iloc[0])
    seeds = test_seeds(plan)
    cfgs = [merge(entry_config(plan["base"], winner), {"optim.lr": lr, "seed": seed})
            for seed in seeds]
    scored = train_planned(
        cfgs, parent, experiment,
        [f"test {winner} lr={lr:.3g} {cfg.model.name} seed={cfg.seed}" for cfg in cfgs],
        threads=threads, workers=1, tags={"optimizer": winner, "part": "test"},
        label="optimizers-test", kinds=[{"test": True}] * len(cfgs))
    return log_test(parent, scored, f"{winner} at lr {lr:.3g}", seeds,
                    test_set_name(plan["base"].data.dataset),
                    "retrained on fresh seeds without the test split")


def submit_all(plan: dict, parent: str, experiment: str, threads: int) -> dict:
    """Queue the surface tasks (first- and second-order), the searches, the Rprop runs and the
    step costs at once (the pool stays busy while the parent draws the surface figures)."""
    opts, pending = plan["optimizers"], {"search": [], "rprop": [], "rprop_runs": []}
    if not plan["skip_surfaces"]:
        pairs = [(s, o) for s in plan["surfaces"] for o in opts]
        pending["surfaces"] = compare_on_surface_task.map(
            [s for s, _ in pairs], [o for _, o in pairs], unmapped(parent),
            unmapped(experiment), unmapped(threads))
        if not plan["skip_second_order"]:
            pending["second_order"] = second.second_order_task.map(plan["surfaces"],
                                                                   unmapped(threads))
    if not plan["skip_second_order"] and not plan["skip_cost"]:
        pending["cost"] = second.step_cost_task.submit(plan["cost_scale"], threads)
    if not plan["skip_real"]:
        base = plan["base"]
        dataset_for(base)  # loads the data once, before the workers do
        pending["search"] = search_rate_task.map(unmapped(to_dict(base)), opts, unmapped(parent),
                                                 unmapped(experiment), unmapped(threads))
        rprop_base = real.rprop_base(base)
        n_rprop = len(dataset_for(rprop_base).train)
        if "rprop" in opts and n_rprop > base.batch_size:
            pending["rprop_runs"] = real.rprop_batch_runs(rprop_base, n_rprop,
                                                          plan["rprop_epochs"], plan["seeds"])
            pending["rprop"] = submit_training(pending["rprop_runs"], parent, experiment,
                                               threads)
    return pending


def compare_surfaces(pending: dict, parent: str) -> dict:
    """The first-order race per surface; beside it, Newton and L-BFGS (``race``)."""
    results = collect(pending["surfaces"], "optimizers-surfaces", describe_surface)
    out = {"surfaces": log_surfaces(parent, results)}
    if "second_order" in pending:
        races = []
        for paths in collect(pending["second_order"], "optimizers-second-order"):
            name = paths["surface"].iloc[0]
            first = [r["paths"] for r in results if r["surface"] == name and len(r["paths"])]
            races.append(second.log_race(parent, name, pd.concat(first, ignore_index=True)
                                         if first else paths.iloc[:0], paths))
        out["race"] = pd.concat(races, ignore_index=True)
    return out


# --- the flow ---

SETTINGS = ("optimizers", "surfaces", "seeds", "epochs", "rprop_epochs", "skip_surfaces",
            "skip_real", "skip_second_order", "skip_cost", "cost_scale", "lbfgs_iterations")


def make_plan(optimizers=None, surfaces=None, seeds=DEFAULT_SEEDS, epochs=DEFAULT_EPOCHS,
              rprop_epochs=RPROP_EPOCHS, skip_surfaces=False, skip_real=False,
              skip_second_order=False, skip_cost=False, cost_scale="full",
              lbfgs_iterations=second.LBFGS_ITERATIONS, overrides=None) -> dict:
    """Every setting validated and normalized, before anything is recorded."""
    optimizers = list(ENTRY_NAMES) if optimizers is None else optimizers
    surfaces = list(SURFACES) if surfaces is None else surfaces
    opts, surfs = check_settings(optimizers, surfaces, seeds, epochs, rprop_epochs,
                                 skip_surfaces, skip_real, skip_second_order, skip_cost,
                                 cost_scale, lbfgs_iterations)
    return {"optimizers": opts, "surfaces": surfs, "seeds": seeds, "epochs": epochs,
            "rprop_epochs": rprop_epochs, "skip_surfaces": skip_surfaces,
            "skip_real": skip_real, "skip_second_order": skip_second_order,
            "skip_cost": skip_cost, "cost_scale": cost_scale,
            "lbfgs_iterations": lbfgs_iterations, "base": base_config(epochs, overrides)}


def _params(plan: dict) -> dict:
    return {**{k: v for k, v in plan.items() if k != "base"},
            "base_config": tracking.to_json(to_dict(plan["base"])),
            "rprop_lr": real.RPROP_LR, "search_decades": list(real.SEARCH_DECADES)}


@flow(name="optimizer-compare")
def optimizer_compare(
    optimizers: list[str] | None = None,
    surfaces: list[str] | None = None,
    seeds: int = DEFAULT_SEEDS,
    epochs: int = DEFAULT_EPOCHS,
    rprop_epochs: int = RPROP_EPOCHS,
    skip_surfaces: bool = False,
    skip_real: bool = False,
    skip_second_order: bool = False,
    skip_cost: bool = False,
    cost_scale: str = "full",
    lbfgs_iterations: int = second.LBFGS_ITERATIONS,
    overrides: dict | None = None,
    runner: str = "threads",
    workers: int | None = None,
    experiment: str = EXPERIMENT,
) -> dict:
    """Compare ``optimizers`` (comparison entries) on ``surfaces`` and on real data (see the
    module docstring).

    Returns the parent run id, the surface summary, the search reasons, the final-error table,
    the Rprop arms' table, and (unless skipped) the second-order race, the full-batch L-BFGS
    history and the step-cost table (records).
    """
    check_runner(runner)
    plan = make_plan(optimizers, surfaces, seeds, epochs, rprop_epochs, skip_surfaces,
                     skip_real, skip_second_order, skip_cost, cost_scale, lbfgs_iterations,
                     overrides)
    start = time.perf_counter()
    threads = set_torch_threads(runner, workers)
    with flow_parent("optimizer-compare", experiment, f"optimizers {len(plan['optimizers'])} x "
                                f"{plan['base'].model.name}", params=_params(plan),
                                tags={"mlflow.note.content": SEARCH_NOTE}) as parent:
        pending = submit_all(plan, parent, experiment, threads)
        out = (compare_surfaces(pending, parent) if "surfaces" in pending
               else {"surfaces": pd.DataFrame()})
        if not plan["skip_real"]:
            out.update(compare_real(plan, parent, experiment, threads, pending,
                                    parallel_tasks(runner, workers)))
        if "cost" in pending:
            out["cost"] = pending["cost"].result()
            second.log_costs(parent, out["cost"])
        report_optimizers(out, parent, experiment)
    print_summary(out, parent, experiment, time.perf_counter() - start)
    records = {k: out.get(k, pd.DataFrame()).to_dict("records")
               for k in ("real", "rprop", "race", "full_batch", "cost")}
    return {"parent_run_id": parent, "surfaces": out["surfaces"].to_dict("records"),
            "searches": [{k: s[k] for k in ("optimizer", "lr", "reason")}
                         for s in out.get("searches", [])], **records,
            "test": out.get("test"), "test_line": out.get("test_line")}


def check(optimizers=None, surfaces=None, seeds=DEFAULT_SEEDS, epochs=DEFAULT_EPOCHS,
          rprop_epochs=RPROP_EPOCHS, skip_surfaces=False, skip_real=False,
          skip_second_order=False, skip_cost=False, cost_scale="full",
          lbfgs_iterations=second.LBFGS_ITERATIONS,
          overrides=None) -> tuple[dict, list[TrainConfig]]:
    """Every input checked (``make_plan``): the flow's keyword arguments."""
    settings = dict(zip(SETTINGS, (optimizers, surfaces, seeds, epochs, rprop_epochs,
                                   skip_surfaces, skip_real, skip_second_order, skip_cost,
                                   cost_scale, lbfgs_iterations), strict=True))
    make_plan(**settings, overrides=overrides)
    return {**settings, "overrides": overrides}, []
