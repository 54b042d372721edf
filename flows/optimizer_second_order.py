"""The optimizers flow's second-order part (issue 23 item 1): Newton and L-BFGS, which need no
learning rate, beside the first-order race on every 2-D surface; full-batch L-BFGS against SGD
at its searched rate on real data (softmax); and what one step of SGD, L-BFGS and Newton costs
against the number of parameters. Everything is logged on the comparison's parent run.

The tasks recompute on a resumed parent (no child runs): each is deterministic and cheap next
to the trainings, except the step-cost table (about 110 s CPU at ``full`` scale), a stage the
flow's ``skip_cost`` leaves out.
"""

from __future__ import annotations

import pandas as pd
import torch
from prefect import task

from flows.common import dataset_for
from lrpipe import tracking
from lrpipe.engine.config import ModelConfig, TrainConfig, from_dict
from lrpipe.experiments.second_order import (
    LBFGSConfig,
    compare_second_order,
    lbfgs_against_sgd,
    summarize_race,
    with_evaluations,
)
from lrpipe.experiments.step_cost import COST_MODELS, NEWTON_MAX_PARAMS, measure_step_costs
from lrpipe.experiments.surfaces import get_surface
from lrpipe.plots.second_order import (
    plot_full_batch,
    plot_race_losses,
    plot_race_paths,
    plot_step_cost,
)

LBFGS_ITERATIONS = 50  # full-batch L-BFGS iterations on real data (each one or more passes)
# The step-cost table's settings: "full" (softmax and MLPs of 1,600..203,530 parameters,
# batch 1,000: about 110 s CPU) or "small" (two tiny MLPs, batch 32: seconds, the wiring only).
COST_SCALES: dict[str, dict] = {
    "full": dict(models=COST_MODELS, examples=1000, newton_max_params=NEWTON_MAX_PARAMS,
                 repeats=3),
    "small": dict(models=(ModelConfig(name="mlp", hidden=(1,)),
                          ModelConfig(name="mlp", hidden=(2,))),
                  examples=32, newton_max_params=1000, repeats=1, columns=8),
}


@task(name="second-order-surface", task_run_name="{surface_name} newton, lbfgs")
def second_order_task(surface_name: str, threads: int = 1) -> pd.DataFrame:
    """Newton and L-BFGS from the surface's start within its step budget (PATH_COLUMNS)."""
    torch.set_num_threads(threads)
    return compare_second_order(get_surface(surface_name))


@task(name="full-batch-lbfgs", task_run_name="lbfgs vs sgd lr={sgd_lr:.3g}")
def lbfgs_task(cfg_dict: dict, sgd_lr: float, iterations: int, threads: int = 1
               ) -> pd.DataFrame:
    """Full-batch L-BFGS, then SGD at ``sgd_lr`` for as many passes (HISTORY_COLUMNS)."""
    torch.set_num_threads(threads)
    cfg = from_dict(cfg_dict)
    return lbfgs_against_sgd(cfg, sgd_lr, LBFGSConfig(iterations=iterations), dataset_for(cfg))


@task(name="step-cost", task_run_name="step cost ({scale})")
def step_cost_task(scale: str, threads: int = 1) -> pd.DataFrame:
    """``measure_step_costs`` at the declared ``scale`` (COST_SCALES)."""
    torch.set_num_threads(threads)
    return measure_step_costs(**COST_SCALES[scale])


def lbfgs_config(base: TrainConfig) -> TrainConfig:
    """The real-data L-BFGS config: the comparison's data and seed, the softmax model (a
    convex loss, where full-batch quasi-Newton is at home; its 7,850 weights)."""
    return base.replace(**{"model.name": "softmax"})


def log_race(parent: str, surface_name: str, first_order: pd.DataFrame,
             second_order: pd.DataFrame) -> pd.DataFrame:
    """One surface's race on the parent: the paths of both kinds, loss against evaluations,
    the table (``summarize_race``: iterations, evals, evals_to_success)."""
    surface = get_surface(surface_name)
    paths = pd.concat([with_evaluations(first_order), second_order], ignore_index=True)
    table = summarize_race(paths, surface.success_radius)
    tracking.log_figure(parent, plot_race_paths(surface, paths), f"{surface_name}_race_paths")
    tracking.log_figure(parent, plot_race_losses(paths, x="evals"), f"{surface_name}_race_loss")
    tracking.log_table(parent, table, f"surfaces/{surface_name}_race.csv")
    return table


def log_full_batch(parent: str, history: pd.DataFrame) -> None:
    tracking.log_table(parent, history, "second_order/full_batch.csv")
    for metric in ("train_loss", "val_error"):
        tracking.log_figure(parent, plot_full_batch(history, metric, "passes"),
                            f"full_batch_{metric}")


def log_costs(parent: str, costs: pd.DataFrame) -> None:
    tracking.log_table(parent, costs, "second_order/step_cost.csv")
    for metric in ("seconds_per_step", "bytes_per_step"):
        tracking.log_figure(parent, plot_step_cost(costs, metric), f"step_cost_{metric}")


def race_sentence(race: pd.DataFrame) -> str:
    """Newton and L-BFGS against the best first-order entry per surface, in evaluations."""
    parts = []
    for surface, rows in race.groupby("surface", sort=False):
        done = rows[rows["success"].astype(bool)].sort_values("evals_to_success")
        second = rows.set_index("optimizer")
        first = done[~done["optimizer"].isin(["newton", "lbfgs"])]
        best = (f"best first-order {first.iloc[0]['optimizer']} "
                f"{first.iloc[0]['evals_to_success']:.0f}" if len(first) else
                "no first-order entry succeeded")
        methods = ", ".join(
            f"{m} {second.loc[m, 'evals_to_success']:.0f}" if m in second.index
            and pd.notna(second.loc[m, "evals_to_success"]) else f"{m} did not reach it"
            for m in ("newton", "lbfgs"))
        parts.append(f"{surface}: {methods}; {best}")
    return ("Evaluations to reach the minimum's success radius (Newton also builds a 2x2 "
            "Hessian each): " + "; ".join(parts) + ".")


def full_batch_sentence(history: pd.DataFrame) -> str:
    """Full-batch L-BFGS against SGD at the same passes, in words."""
    last = history.sort_values("passes").groupby("method").tail(1).set_index("method")
    lb, sgd = last.loc["lbfgs"], last.loc["sgd"]
    return (f"Full-batch L-BFGS (softmax, no rate) after {lb['passes']:.0f} passes: training "
            f"loss {lb['train_loss']:.4g}, validation error {lb['val_error']:.4f}; mini-batch "
            f"SGD at lr {sgd['lr']:.3g} after {sgd['passes']:.0f} passes: {sgd['train_loss']:.4g}"
            f", {sgd['val_error']:.4f}.")


def cost_sentence(costs: pd.DataFrame) -> str:
    """Why nobody trains the MLP with Newton: the largest model's step costs."""
    n = int(costs["n_params"].max())
    big = costs[costs["n_params"] == n].set_index(["method", "source"])

    def at(method: str, column: str) -> float:
        rows = big.xs(method, level="method")[column]
        return float(rows.get("measured", rows.iloc[0]))
    model = big["model"].iloc[0]
    return (f"One step of {model} ({n:,} parameters): SGD {at('sgd', 'seconds_per_step'):.3g} s, "
            f"L-BFGS {at('lbfgs', 'seconds_per_step'):.3g} s, Newton "
            f"{at('newton', 'seconds_per_step'):.3g} s (extrapolated where not measured, an "
            f"optimistic floor) and {big['dense_hessian_bytes'].iloc[0] / 1e9:,.2f} GB for its "
            "dense Hessian alone: why nobody trains such a network with Newton.")
