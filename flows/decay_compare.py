"""Flow ``decay_compare``: every decay schedule at one rate, over several seeds, side by side.

One MLflow parent run (experiment ``lr-decay``) holds the schedule preview, the loss and error
bands, the final errors, the best schedule's generalization gap, the ranking table and the loss
choice (cross-entropy vs squared error for the best schedule); each schedule x seed is a child
run. Every name, seed, loss and budget is checked (and each schedule's total decay computed)
before any run is recorded. The same command after a crash or a kill resumes into the same
parent (``flows.harness``) and reuses every child that FINISHED: only the rest train again,
and the ranking, the best schedule and the loss choice come out as an uninterrupted run's.
The best schedule's confirmation runs train without the test split and are scored once on it
(``flows.tested``): a figure reported beside the ranking and the verdict, never read by them.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from prefect import flow

from flows.batched import train_planned
from flows.common import check_runner, parallel_tasks, set_torch_threads
from flows.decay_results import (
    loss_figure,
    loss_table,
    mean_curve,
    print_summary,
    rank_schedules,
    rate_set_by,
    selection_notes,
    versus_constant,
)
from flows.harness import flow_parent
from flows.report import log_confirmation, publish_flow_report
from flows.schedule_preview import (
    DEFAULT_EPOCHS,
    DEFAULT_FINAL_DECAY,
    EXPERIMENT,
    base_config,
    check_names,
    decay_table,
    latest_chosen_lr,
    print_table,
    resolve_lr,
    select_schedules,
    steps_per_epoch,
)
from flows.tested import log_test
from lrpipe import runs, tracking
from lrpipe.engine.config import (
    LOSSES,
    ScheduleConfig,
    TrainConfig,
    from_dict,
    merge,
    to_dict,
)
from lrpipe.experiments import decay, race
from lrpipe.experiments.bands import check_seed_list
from lrpipe.experiments.confirm import check_fresh_seeds, confirm
from lrpipe.experiments.final import TEST_HEADING, test_set_name, test_table
from lrpipe.experiments.final import untested_line as final_untested
from lrpipe.search.plan import DEFAULT_CONFIRM_SEEDS, searched_identity

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_SEEDS = (0, 1, 2)  # >= 3 seeds: comparisons show a mean and a band
DEFAULT_LOSSES = ("cross_entropy", "mse")
# Rate per loss, relative: the summed squared error's Hessian in the outputs is 2I, against at
# most 1/2 for cross-entropy's (diag(p) - pp^T), so the same step is up to 4x larger in
# curvature units. Measured: MLP, SGD, plateau, lr=0.1, 20k Fashion-MNIST: mse diverged in
# epoch 1 for all 3 seeds; at 0.025 and 0.05 it trained (val error 0.17 after 3 epochs).
LOSS_LR_SCALE = {"cross_entropy": 1.0, "mse": 0.25}


@dataclasses.dataclass(frozen=True)
class DecayPlan:
    """Everything the comparison will run, validated: base config (rate applied), schedules,
    seeds, losses, updates per epoch and the decay table."""

    base: TrainConfig
    lr_source: str
    schedules: dict[str, ScheduleConfig]
    seeds: tuple[int, ...]
    losses: tuple[str, ...]
    final_decay: float
    steps_per_epoch: int
    decays: pd.DataFrame
    loss_rates: dict[str, float] = dataclasses.field(default_factory=dict)
    loss_sources: dict[str, str] = dataclasses.field(default_factory=dict)
    confirm_seeds: tuple[int, ...] = ()
    prune: str = "seeds"  # race.PRUNE_CHOICES: race the schedules over seeds, or train all


# The schedule the verdicts compare with ("beats the constant rate"): never pruned.
CONTROLS = ("constant",)


def make_plan(lr=None, epochs=DEFAULT_EPOCHS, seeds=DEFAULT_SEEDS, schedules=None,
              final_decay=DEFAULT_FINAL_DECAY, losses=DEFAULT_LOSSES, overrides=None,
              confirm_seeds=DEFAULT_CONFIRM_SEEDS, prune=None) -> DecayPlan:
    """Validate every input (ConfigError naming the field) and size the budget."""
    prune = race.check_prune(prune)
    base = base_config(epochs, overrides)
    selected = select_schedules(schedules, final_decay, base.epochs)
    seeds = check_seed_list("seeds", seeds)
    confirm_seeds = check_fresh_seeds(confirm_seeds, seeds)
    losses = tuple(check_names("losses", losses, LOSSES))
    rate, source = resolve_lr(lr, base, overrides)
    base = merge(base, {"optim.lr": rate})
    spe = steps_per_epoch(base)
    rates = {loss: loss_source(base, loss, given=lr is not None) for loss in losses}
    return DecayPlan(base, source, selected, seeds, losses, float(final_decay), spe,
                     decay_table(selected, base.epochs, spe),
                     {k: v[0] for k, v in rates.items()}, {k: v[1] for k, v in rates.items()},
                     confirm_seeds, prune)


def loss_source(base: TrainConfig, loss: str, given: bool) -> tuple[float, str]:
    """(rate, where it came from) for training ``base`` with ``loss``: ``base``'s own rate for
    its loss; for another, the rate a search chose for that loss when there is one (and the
    base rate was not given), else ``loss_rate``'s fixed ratio, labelled as not searched."""
    if loss == base.loss:
        return base.optim.lr, "the chosen rate"
    if not given:
        found = latest_chosen_lr(identity=searched_identity(base.replace(loss=loss)))
        if found is not None:
            return found[0], f"searched for {loss}: lr-search run {found[1]}"
    scale = LOSS_LR_SCALE[loss] / LOSS_LR_SCALE[base.loss]
    return loss_rate(base, loss), (f"{scale:g}x the {base.loss} rate, not searched (the fair "
                                   f"comparison, each loss at its own searched rate: `lrpipe "
                                   f"losses`)")


def loss_rate(base: TrainConfig, loss: str) -> float:
    """The base rate for training with ``loss``: ``base``'s rate x the ``LOSS_LR_SCALE``
    ratio (the rate was chosen for ``base.loss``)."""
    return base.optim.lr * LOSS_LR_SCALE[loss] / LOSS_LR_SCALE[base.loss]


def run_specs(plan: DecayPlan, names, loss: str) -> list[dict]:
    """One training per schedule in ``names`` x seed: config dict, run name, tags, decay."""
    planned = plan.decays.set_index("schedule")
    rate = plan.loss_rates.get(loss, loss_rate(plan.base, loss))
    optim = dataclasses.replace(plan.base.optim, lr=rate)
    specs = []
    for name in names:
        for seed in plan.seeds:
            cfg = dataclasses.replace(plan.base, schedule=plan.schedules[name], seed=seed,
                                      loss=loss, optim=optim)
            label = name if loss == plan.base.loss else f"{name} {loss}"
            decay_value = float(planned.loc[name, "total_decay"])
            tags = {"schedule": name, "loss": loss,
                    "total_decay": "val-loss driven" if math.isnan(decay_value)
                    else f"{decay_value:.4g}"}
            if planned.loc[name, "warning"]:
                tags["decay_warning"] = planned.loc[name, "warning"]
            specs.append({"cfg": to_dict(cfg), "schedule": name, "loss": loss, "tags": tags,
                          "name": runs.training_run_name(cfg, prefix=f"{label} "),
                          "total_decay": None if math.isnan(decay_value) else decay_value})
    return specs


def train_stage(plan: DecayPlan, specs: list[dict], parent: str, experiment: str,
                threads: int, workers: int, label: str, tested: str | None = None) -> list[dict]:
    """Train ``specs`` (schedules x seeds batched into one task per worker where measured to
    pay; the schedule ``tested`` each alone, without the test split, scored once on it), each
    with its schedule extras (total decay, rate curve); one result per spec."""
    return train_planned(
        [from_dict(s["cfg"]) for s in specs], parent, experiment, [s["name"] for s in specs],
        threads=threads, workers=workers, tags=[s["tags"] for s in specs], label=label,
        kinds=[{"test": s["schedule"] == tested, "extras": {
            "total_decay": s["total_decay"], "updates_per_epoch": plan.steps_per_epoch}}
            for s in specs])


def stage_history(specs: list[dict], results: list[dict]) -> pd.DataFrame:
    """The histories of ``train_stage``'s results stacked with schedule and loss columns."""
    return pd.DataFrame([{**row, "schedule": s["schedule"], "loss": s["loss"]}
                         for s, r in zip(specs, results, strict=True) for row in r["history"]])


def train_comparison(plan: DecayPlan, parent: str, experiment: str, threads: int,
                     workers: int) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Every schedule x seed, raced over seeds where ``race.races`` says so: round 1 trains
    every schedule on the first seed, round 2 the best third (``race.round_one``) and the
    control on the others. Returns the histories and the race's table (None: not raced);
    the race is logged as ``race.csv`` and each round-1 run is tagged kept, control or
    pruned."""
    specs = run_specs(plan, plan.schedules, plan.base.loss)
    if not race.races(plan.prune, list(plan.schedules), plan.seeds, CONTROLS):
        return stage_history(specs, train_stage(plan, specs, parent, experiment, threads,
                                                workers, "lr-decay")), None
    first = [s for s in specs if s["cfg"]["seed"] == plan.seeds[0]]
    results = train_stage(plan, first, parent, experiment, threads, workers,
                          "lr-decay-race-1")
    finals = pd.DataFrame({"arm": [s["schedule"] for s in first], "val_loss": [
        math.inf if r["status"] == "diverged" else r["val_loss"] for r in results]})
    table = race.round_one(finals, CONTROLS)
    verdict = table.set_index("arm")["race"]
    for spec, result in zip(first, results, strict=True):
        tracking.set_tags(result["run_id"], {"race": verdict[spec["schedule"]]})
    tracking.log_table(parent, table, "race.csv")
    tracking.log_metrics(parent, {"schedules_pruned": float((table["race"] == "pruned").sum())},
                         step=0)
    print(race.race_line(table, plan.seeds), flush=True)
    through = race.racing_through(table)
    rest = [s for s in specs if s["cfg"]["seed"] != plan.seeds[0] and s["schedule"] in through]
    later = train_stage(plan, rest, parent, experiment, threads, workers, "lr-decay-race-2")
    return pd.concat([stage_history(first, results), stage_history(rest, later)],
                     ignore_index=True), table


def parent_figures(plan: DecayPlan, history: pd.DataFrame,
                   ranking: pd.DataFrame) -> dict[str, Figure]:
    from lrpipe.plots import decay as decay_plots  # drawing libraries load here, after training

    best = ranking.iloc[0]["schedule"]
    if "race" in ranking:  # a pruned schedule's line is its one seed's: say so in the legend
        label = {s: f"{s} (pruned: seed {plan.seeds[0]})" for s in
                 ranking.loc[ranking["race"] == "pruned", "schedule"]}
        history = history.assign(schedule=history["schedule"].replace(label))
        ranking = ranking.assign(schedule=ranking["schedule"].replace(label))
    previews = decay.schedule_previews(plan.schedules, plan.base.epochs, plan.steps_per_epoch,
                                       plan.base.optim.lr)
    gap = decay_plots.plot_gap(mean_curve(history[history["schedule"] == best]))
    gap.axes[0].set_title(f"{gap.axes[0].get_title()}: {best}, mean over seeds")
    return {"schedules": decay_plots.plot_schedules(previews),
            "val_loss_band": decay_plots.plot_metric_band(history, "val_loss"),
            "val_error_band": decay_plots.plot_metric_band(history, "val_error"),
            "final_val_error": decay_plots.plot_final_errors(ranking),
            "gap_best": gap}


@contextmanager
def decay_parent(plan: DecayPlan, experiment: str, runner: str) -> Iterator[str]:
    """The comparison's parent run (``flow_parent``: resumed after a crash), with the planned
    total decay of every schedule logged before any training."""
    base = plan.base
    with flow_parent(
            "lr-decay", experiment, f"decay {len(plan.schedules)} schedules "
            f"lr={base.optim.lr:g} {base.optim.name} {base.model.name} {len(plan.seeds)} seeds",
            params={"lr": base.optim.lr, "lr_source": plan.lr_source, "epochs": base.epochs,
                    "seeds": list(plan.seeds), "schedules": list(plan.schedules),
                    "final_decay": plan.final_decay,
                    "losses": list(plan.losses), "steps_per_epoch": plan.steps_per_epoch,
                    "runner": runner, "prune": plan.prune,
                    "base_config": tracking.to_json(to_dict(base))}) as parent:
        tracking.log_metrics(parent, {f"total_decay/{r.schedule}": r.total_decay
                                      for r in plan.decays.itertuples()
                                      if not math.isnan(r.total_decay)}, step=0)
        tracking.log_table(parent, plan.decays, "total_decay.csv")
        warnings = [w for w in plan.decays["warning"] if w]
        if warnings:
            tracking.log_text(parent, "\n".join(warnings) + "\n", "decay_warnings.txt")
        yield parent


def raced_text(plan: DecayPlan) -> str:
    """``, raced: 17 runs, not 27 (...)`` for the plan line; empty when not raced."""
    count = race.planned_runs(plan.prune, list(plan.schedules), plan.seeds, CONTROLS)
    every = len(plan.schedules) * len(plan.seeds)
    if count == every:  # not raced
        return ""
    return (f", raced: {count} runs, not "
            f"{every} (all on seed {plan.seeds[0]}, the best third and constant on the rest; "
            "--prune off: all)")


def print_plan(plan: DecayPlan) -> None:
    base = plan.base
    print(f"decay_compare: lr={base.optim.lr:g} ({plan.lr_source}), {base.epochs} epochs x "
          f"{plan.steps_per_epoch} updates, {len(plan.schedules)} schedules x "
          f"{len(plan.seeds)} seeds{raced_text(plan)}, {base.model.name} {base.optim.name} on "
          f"{base.data.dataset} (subset {base.data.subset or 'all'})", flush=True)
    print_table(plan.decays)


def compare_losses(plan, history, best, parent, experiment, threads,
                   workers) -> pd.DataFrame | None:
    """Train ``best`` with the other losses of ``plan.losses``; log the table and figure."""
    extra = [loss for loss in plan.losses if loss != plan.base.loss]
    if not extra:
        return None
    specs = {loss: run_specs(plan, [best], loss) for loss in extra}
    runs = [stage_history(specs[loss], train_stage(
        plan, specs[loss], parent, experiment, threads, workers,
        f"lr-decay-{loss.replace('_', '-')}")) for loss in extra]
    both = pd.concat([history[history["schedule"] == best], *runs], ignore_index=True)
    rates = {loss: plan.loss_rates.get(loss, loss_rate(plan.base, loss))
             for loss in both["loss"].unique()}
    table = loss_table(both)
    table.insert(1, "lr", table["loss"].map(rates))
    tracking.log_table(parent, table, "loss_choice.csv")
    tracking.log_figure(parent, loss_figure(both, best, rates), "loss_choice")
    return table


def confirm_best(plan: DecayPlan, ranking: pd.DataFrame, parent: str, experiment: str,
                 threads: int, workers: int) -> dict | None:
    """The best and the runner-up schedule on ``plan.confirm_seeds`` (seeds that did not rank
    them): their final validation losses summarized (``confirm.summarize_arms``), a verdict,
    ``confirm.csv``, the tag ``confirm_verdict``; None without seeds or a runner-up. The
    best's runs train without the test split and are scored once on it (``test``: the
    ``test_summary`` and its ``line``, on the parent); the verdict reads validation only."""
    if not plan.confirm_seeds or len(ranking) < 2:
        return None
    best, rival = ranking["schedule"].iloc[0], ranking["schedule"].iloc[1]
    fresh = dataclasses.replace(plan, seeds=plan.confirm_seeds)
    specs = [{**s, "tags": {**s["tags"], "role": "confirm"}}
             for s in run_specs(fresh, [best, rival], plan.base.loss)]
    results = train_stage(plan, specs, parent, experiment, threads, workers,
                          "lr-decay-confirm", tested=best)
    history = stage_history(specs, results)
    scored = [r for s, r in zip(specs, results, strict=True) if s["schedule"] == best]
    record = confirmation_record(plan, history, best, rival)
    return {**log_confirmation(parent, record, rival, "best"),
            **log_test(parent, scored, best, plan.confirm_seeds,
                       test_set_name(plan.base.data.dataset))}


def untested_line(plan: DecayPlan) -> str:
    """The report's test line when no run was scored (``final.untested_line``)."""
    return final_untested(plan.confirm_seeds, "schedule")


def confirmation_record(plan: DecayPlan, history: pd.DataFrame, best: str, rival: str) -> dict:
    """``confirm.confirm`` of the confirmation runs' histories on final validation loss: the
    test figures are not in ``history`` and never reach the verdict."""
    last = decay.final_rows(history)
    finished = (last["epoch"] >= plan.base.epochs) & np.isfinite(last["val_loss"].astype(float))
    last = last.assign(arm=last["schedule"], status=np.where(finished, "ok", "diverged"))
    return confirm(last, "val_loss", best, rival, seeds=plan.confirm_seeds,
                   what=f"The best schedule against the runner-up ({plan.base.epochs} epochs)",
                   metric="final validation loss")


@flow(name="lr-decay")
def decay_compare(
    lr: float | None = None,
    epochs: int = DEFAULT_EPOCHS,
    seeds: tuple[int, ...] = DEFAULT_SEEDS,
    schedules: list[str] | None = None,
    final_decay: float = DEFAULT_FINAL_DECAY,
    losses: tuple[str, ...] = DEFAULT_LOSSES,
    overrides: dict | None = None,
    runner: str = "threads",
    workers: int | None = None,
    experiment: str = EXPERIMENT,
    confirm_seeds: tuple[int, ...] = DEFAULT_CONFIRM_SEEDS,
    prune: str = "seeds",
) -> dict:
    """Train every schedule x seed at ``lr`` (None: the matching lr-search's choice), rank
    the schedules by mean final validation loss, train the best and the runner-up again on
    the fresh ``confirm_seeds`` (out of sample; empty: not), then train the best with the
    other losses. ``prune``: ``seeds`` races the schedules over seeds (``train_comparison``:
    the best third and constant go on past the first seed), ``off`` trains all on all.

    Returns the parent run id, the rate, the ranking and loss-choice records and the verdict
    of the best decaying schedule against constant.
    """
    check_runner(runner)
    plan = make_plan(lr, epochs, seeds, schedules, final_decay, losses, overrides,
                     confirm_seeds, prune)
    start = time.perf_counter()
    threads, tasks = set_torch_threads(runner, workers), parallel_tasks(runner, workers)
    print_plan(plan)
    with decay_parent(plan, experiment, runner) as parent:
        history, raced = train_comparison(plan, parent, experiment, threads, tasks)
        ranking = rank_schedules(history, plan.decays)
        if raced is not None:
            ranking = race.order_ranking(ranking, raced)
        ranking["rate_set_by"] = ranking["schedule"].map(lambda n: rate_set_by(plan, n))
        tracking.log_table(parent, ranking, "ranking.csv")
        for name, fig in parent_figures(plan, history, ranking).items():
            tracking.log_figure(parent, fig, name)
        best = ranking.iloc[0]
        vs = versus_constant(ranking)
        tracking.set_tags(parent, {"best_schedule": best["schedule"],
                                   **({} if vs is None else {"beats_constant": vs[
                                       "beats_constant"]})})
        tracking.log_metrics(parent, {"best_val_loss": best["final_val_loss_mean"],
                                      "best_val_error": best["final_val_error_mean"]}, step=0)
        confirmation = confirm_best(plan, ranking, parent, experiment, threads, tasks)
        test_text = untested_line(plan) if confirmation is None else confirmation["test_line"]
        losses_df = compare_losses(plan, history, best["schedule"], parent, experiment, threads,
                                   tasks)
        publish_flow_report(
            parent, experiment, "Learning-rate decay",
            f"Best schedule: {best['schedule']} (final validation loss "
            f"{best['final_val_loss_mean']:.4f}, error {best['final_val_error_mean']:.4f}, "
            f"mean over {len(plan.seeds)} seeds) at lr={plan.base.optim.lr:g}", ranking,
            evidence=[f"rate from: {plan.lr_source}"] + (
                [] if raced is None else [race.race_line(raced, plan.seeds)]) + (
                [] if confirmation is None else [confirmation["line"]]) + [test_text] + [
                f"{loss} rate {plan.loss_rates[loss]:.3g}: {plan.loss_sources[loss]}"
                for loss in plan.losses if loss != plan.base.loss] + ([] if vs is None else [
                f"beats the constant rate: {vs['beats_constant']}"]),
            notes=[w for w in plan.decays["warning"] if w] + selection_notes(plan, ranking),
            key="lr-decay", tables=None if confirmation is None else {
                TEST_HEADING: test_table(confirmation["test"])})
    if confirmation is not None:
        print(confirmation["line"], flush=True)
    print(test_text, flush=True)
    print_summary(ranking, losses_df, vs, parent, experiment, time.perf_counter() - start)
    return {"parent_run_id": parent, "lr": plan.base.optim.lr, "lr_source": plan.lr_source,
            "best_schedule": best["schedule"], "ranking": ranking.to_dict("records"),
            "loss_choice": None if losses_df is None else losses_df.to_dict("records"),
            "versus_constant": vs, "confirmation": confirmation}


def check(lr=None, epochs=DEFAULT_EPOCHS, seeds=DEFAULT_SEEDS, schedules=None,
          final_decay=DEFAULT_FINAL_DECAY, losses=DEFAULT_LOSSES, overrides=None,
          experiment=EXPERIMENT, confirm_seeds=DEFAULT_CONFIRM_SEEDS, prune=None
          ) -> tuple[dict, list[TrainConfig]]:
    """Every input checked and the budget sized (``make_plan``), before anything is recorded:
    the flow's keyword arguments and its base config."""
    plan = make_plan(lr, epochs, seeds, schedules, final_decay, losses, overrides,
                     confirm_seeds, prune)
    return {"lr": lr, "epochs": epochs, "seeds": tuple(seeds), "schedules": schedules,
            "final_decay": final_decay, "losses": tuple(losses), "overrides": overrides,
            "experiment": experiment, "confirm_seeds": plan.confirm_seeds,
            "prune": plan.prune}, [plan.base]
