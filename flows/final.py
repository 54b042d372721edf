"""Flow ``final``: the pipeline's answer trained on all the data and tested once.

The chosen rate with the decay ranking's winning schedule (rebuilt for a longer budget, about
100x total decay) and the constant-rate twin at the same rate, each one child run of the
stage's parent (experiment ``final``), trained on the full training split with the test split
taken out of what training sees (``lrpipe.experiments.final.without_test``), then evaluated
once on the test split. The winner is registered in MLflow's model registry
(``lrpipe-final-<model>``) with its test accuracy and loss as tags and its config and rate plan
as artifacts of its run. The same settings after a crash resume the same parent: a FINISHED
child is reused with the test metrics it logged (nothing is trained or tested again).
"""

from __future__ import annotations

import time

import pandas as pd
from prefect import flow

from flows.batched import train_planned
from flows.common import check_runner, dataset_for, parallel_tasks, set_torch_threads
from flows.harness import flow_parent
from flows.report import publish_flow_report
from flows.schedule_preview import DEFAULT_EPOCHS as DECAY_EPOCHS  # decay_compare's budget
from lrpipe import runs, tracking
from lrpipe.engine.config import TrainConfig, merge
from lrpipe.experiments.final import TEST_KEYS, FinalPlan, final_plan, plan_summary
from lrpipe.experiments.registration import final_registration

EXPERIMENT = "final"


def describe(result: dict) -> str:
    """One line about a final training: its test accuracy and loss."""
    if result["status"] == "diverged":
        return f"{result['label']} DIVERGED: not tested"
    return (f"{result['label']}: test accuracy {result['test_accuracy']:.4f}, test loss "
            f"{result['test_loss']:.4f}" + (" (finished before, reused)"
                                             if result["reused"] else ""))


def answer_line(plan: FinalPlan, winner: dict, constant: dict | None) -> str:
    """The stage's answer: rate, schedule, epochs, test accuracy and loss, constant beside."""
    line = (f"lr {plan.winner.optim.lr:.3g}, {plan.schedule}, {plan.epochs} epochs: "
            + describe(winner).split(": ", 1)[1])
    if constant is not None:
        line += f"; constant rate: {describe(constant).split(': ', 1)[1]}"
    return line


@flow(name="final")
def final_training(lr: float, best_schedule: str | None = None,
                   decay_epochs: int = DECAY_EPOCHS, epochs: int | None = None,
                   overrides: dict | None = None, runner: str = "threads",
                   workers: int | None = None, experiment: str = EXPERIMENT) -> dict:
    """Train ``best_schedule`` (None: constant) and the constant twin at ``lr`` on the full
    training data for ``epochs`` (default 2 x ``decay_epochs``), test each once, register the
    winner. Returns the plan's numbers, the winner's and the constant's results, the
    registered model's URI and the answer line."""
    check_runner(runner)
    base = merge(TrainConfig(), dict(overrides or {}))
    plan = final_plan(lr, best_schedule, decay_epochs, len(dataset_for(base).train),
                      overrides, epochs)
    print(f"final: {plan_summary(plan)}", flush=True)
    threads, start = set_torch_threads(runner, workers), time.perf_counter()
    plan_tags = {"schedule": plan.schedule, "lr": f"{lr:g}", "epochs": plan.epochs,
                 "total_decay": "plateau" if plan.total_decay is None
                 else f"{plan.total_decay:.1f}", "test_set": plan.test_set}
    with flow_parent("final", experiment, f"final {plan.schedule} lr={lr:g}", params={
            "lr": lr, "best_schedule": best_schedule, "epochs": plan.epochs,
            "overrides": tracking.to_json(overrides or {}), "runner": runner}) as parent:
        tracking.set_tags(parent, {**plan_tags, "schedule_source": plan.schedule_source})
        labels, cfgs = zip(*plan.configs().items(), strict=True)
        names = [runs.training_run_name(c, prefix=f"final {lab} ")
                 for lab, c in plan.configs().items()]
        trained = train_planned(
            list(cfgs), parent, experiment, names,
            threads=threads, workers=parallel_tasks(runner, workers), label="final",
            describe=describe, tags=[{"phase": "final", "schedule_label": lab} for lab in labels],
            kinds=[{"test": True, "labels": {"label": lab},
                    "register": final_registration(cfg, plan_tags) if lab == plan.schedule
                    else None} for lab, cfg in plan.configs().items()])
        done = {r["label"]: r for r in trained}
        winner, constant = done[plan.schedule], done.get("constant")
        if constant is None and plan.schedule == "constant":
            constant = winner
        tracking.log_metrics(parent, {**{k: winner[k] for k in TEST_KEYS}, **{
            f"constant_{k}": constant[k] for k in TEST_KEYS}}, step=0)
        answer = answer_line(plan, winner, constant)
        tracking.log_text(parent, f"{plan_summary(plan)}\n{answer}\n", "summary.txt")
        publish_flow_report(parent, experiment, "Final training", answer, _table(done),
                            evidence=[plan_summary(plan)], key=EXPERIMENT)
    print(f"final: {answer} ({time.perf_counter() - start:.0f} s)", flush=True)
    return {"parent_run_id": parent, "lr": lr, "schedule": plan.schedule,
            "schedule_source": plan.schedule_source, "epochs": plan.epochs,
            "total_decay": plan.total_decay, "test_set": plan.test_set,
            "model_uri": winner["model_uri"], "winner": winner, "constant": constant,
            "answer": answer}


def _table(done: dict) -> pd.DataFrame:
    return pd.DataFrame([{k: r[k] for k in ("label", "status", "test_accuracy", "test_loss",
                                             "val_loss", "val_error", "reused")}
                         for r in done.values()])
