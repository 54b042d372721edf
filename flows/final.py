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

import re
import time

import pandas as pd
import torch
from prefect import flow, task

from flows.common import (
    both,
    check_runner,
    collect,
    dataset_for,
    epoch_printer,
    set_torch_threads,
)
from flows.harness import flow_parent
from flows.report import publish_flow_report
from flows.schedule_preview import DEFAULT_EPOCHS as DECAY_EPOCHS  # decay_compare's budget
from lrpipe import procs, resume, runs, tracking
from lrpipe.engine.config import TrainConfig, from_dict, merge
from lrpipe.engine.schedules import preview
from lrpipe.engine.train import train
from lrpipe.experiments.final import (
    FinalPlan,
    final_plan,
    plan_summary,
    test_metrics,
    without_test,
)

EXPERIMENT = "final"
TEST_KEYS = ("test_loss", "test_accuracy", "test_error")


def model_name(cfg: TrainConfig) -> str:
    """The registered model's name: ``lrpipe-final-<model>`` (a plug-in model's spec with
    every character the registry refuses as '-')."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", cfg.model.name).strip("-")[:100]
    return f"lrpipe-final-{slug}"


def register_final(run_id: str, cfg: TrainConfig, model, data, tested: dict,
                   plan_tags: dict) -> str:
    """Log the config and the rate plan on the run and register ``model``; the URI."""
    tracking.log_text(run_id, tracking.to_json(cfg.to_dict()), "final/config.json")
    spe = -(-len(data.train) // cfg.batch_size)
    tracking.log_table(run_id, preview(cfg.schedule, cfg.epochs, spe, cfg.optim.lr),
                       "final/rate_plan.csv")
    return tracking.register_model(
        run_id, model, model_name(cfg), cfg.hash(), model_cfg=cfg.model,
        input_shape=data.input_shape, num_classes=data.num_classes,
        tags={**plan_tags, **{k: f"{tested[k]:.4f}" for k in TEST_KEYS}},
        description=f"{cfg.model.name} trained {cfg.epochs} epochs at lr {cfg.optim.lr:g} "
                    f"with the {plan_tags['schedule']} schedule; test accuracy "
                    f"{tested['test_accuracy']:.4f} on {plan_tags['test_set']}")


def tested_before(run, label: str) -> dict:
    """``train_and_test``'s result rebuilt from its FINISHED child run (an mlflow Run)."""
    metrics, tags = run.data.metrics, run.data.tags
    return {"label": label, "run_id": run.info.run_id, "status": tags.get("status", "ok"),
            "model_uri": tags.get("registered_model"), "reused": True,
            "val_loss": metrics.get("val_loss"), "val_error": metrics.get("val_error"),
            **{k: metrics.get(k) for k in TEST_KEYS}}


@task(name="final-train", task_run_name="final {label}")
def train_and_test(cfg_dict: dict, label: str, parent_run_id: str, experiment: str,
                   plan_tags: dict | None = None, threads: int = 1) -> dict:
    """Train one config as one child run without the test split, then evaluate it once on
    the test split and log test_loss/test_accuracy/test_error; with ``plan_tags``, register
    the model. A FINISHED child with the same config hash is reused (``reused`` True)."""
    torch.set_num_threads(threads)
    cfg = from_dict(cfg_dict)
    if (done := resume.finished_child(parent_run_id, cfg.hash())) is not None:
        return tested_before(done, label)
    data = dataset_for(cfg)
    name = runs.training_run_name(cfg, prefix=f"final {label} ")
    with runs.training_run(cfg, experiment, parent_run_id, name=name, tags={
            "phase": "final", "schedule_label": label, **procs.process_tags()}) as run_id:
        result = train(cfg, without_test(data), keep_model=True, on_epoch=both(
            tracking.epoch_logger(run_id), epoch_printer(name, cfg.epochs)))
        runs.record_result(run_id, result)
        tested = {k: float("nan") for k in TEST_KEYS}
        model_uri = None
        if result.status != "diverged":  # a diverged model is not tested nor registered
            tested = test_metrics(result.model, data)
            tracking.log_metrics(run_id, {k: tested[k] for k in TEST_KEYS}, step=cfg.epochs)
            if plan_tags is not None:
                model_uri = register_final(run_id, cfg, result.model, data, tested, plan_tags)
    final = result.final()
    return {"label": label, "run_id": run_id, "status": result.status, "model_uri": model_uri,
            "reused": False, "val_loss": final["val_loss"], "val_error": final["val_error"],
            **{k: tested[k] for k in TEST_KEYS}}


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
        futures = [train_and_test.submit(cfg.to_dict(), label, parent, experiment,
                                         plan_tags if label == plan.schedule else None,
                                         threads)
                   for label, cfg in plan.configs().items()]
        done = {r["label"]: r for r in collect(futures, "final", describe)}
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
