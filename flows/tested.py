"""A recommended recipe's test figure (issue 27): its runs train without the test split and
their models are scored once on it, after training; the figure is reported beside the choice,
never read by it.

``train_and_test`` is ``flows.common.train_and_log`` for one such run: one child run, trained
alone on ``lrpipe.experiments.final.without_test`` of its data (so nothing it does can read a
test image), then ``score_once`` on the test split, logged as test_loss / test_accuracy /
test_error at step = its last epoch. A FINISHED child with the same config (a resumed flow) is
reused with the test figures it logged: nothing is trained or tested again. ``log_test``
puts a ``test_summary`` on the flow's parent run. The decay comparison (the best schedule's
confirmation runs) and the optimizers' comparison (the winner retrained on fresh seeds) call
these; the transfer flow scores its best strategy's fine-tunings inside its own task.
"""

from __future__ import annotations

import math

import torch
from prefect import task

from flows.common import both, dataset_for, epoch_printer, result_from_run, task_result
from lrpipe import procs, resume, runs, tracking
from lrpipe.engine.config import from_dict
from lrpipe.engine.loop import Stopped, stop_requested
from lrpipe.engine.train import train
from lrpipe.experiments.final import (
    TEST_KEYS,
    score_once,
    test_parent_metrics,
    without_test,
)


def logged_test(run) -> dict[str, float]:
    """``TEST_KEYS`` as a FINISHED child run (an mlflow Run) logged them; NaN where it did not
    (a diverged run is not tested)."""
    return {k: float(run.data.metrics.get(k, math.nan)) for k in TEST_KEYS}


def log_scored(run_id: str, scored: dict[str, float], step: int) -> None:
    """The finite test figures of one run at ``step`` (its last epoch); the tag ``test_set``
    says they were scored once, after training."""
    finite = {k: v for k, v in scored.items() if math.isfinite(v)}
    if finite:
        tracking.log_metrics(run_id, finite, step=step)
    tracking.set_tags(run_id, {"test_set": "scored once after training" if finite
                               else "not scored (diverged)"})


@task(name="train-and-test", task_run_name="train and test {name}")
def train_and_test(cfg_dict: dict, parent_run_id: str, experiment: str, name: str,
                   threads: int = 1, tags: dict | None = None) -> dict:
    """Train one config as one child run without the test split, then score it once on the
    test split. Returns ``train_and_log``'s dict plus ``TEST_KEYS`` (NaN when it diverged)."""
    torch.set_num_threads(threads)  # per OS thread under OpenMP: set it in the task's thread
    cfg = from_dict(cfg_dict)
    if stop_requested():  # a task that starts after Ctrl-C records nothing
        raise Stopped(f"{name}: not started")
    if parent_run_id and (done := resume.finished_child(parent_run_id, cfg.hash())):
        return {**result_from_run(done, cfg, name), **logged_test(done)}
    data = dataset_for(cfg)
    run_tags = {"trained": "alone", **procs.process_tags(), **(tags or {})}
    with runs.training_run(cfg, experiment, parent_run_id, name=name, tags=run_tags) as run_id:
        result = train(cfg, without_test(data), keep_model=True, on_epoch=both(
            tracking.epoch_logger(run_id), epoch_printer(name, cfg.epochs)))
        runs.record_result(run_id, result)
        scored = score_once(result.model, data, result.status)
        log_scored(run_id, scored, cfg.epochs)
    return {**task_result(run_id, name, cfg, result), **scored}


def describe_tested(result: dict) -> str:
    """One line about a trained-and-tested run: its selection figures only (its test figure
    is reported once, summarized over its seeds)."""
    if result["status"] == "diverged":
        line = f"{result['name']} diverged in epoch {result['diverged_epoch']}: not tested"
    else:
        line = (f"{result['name']} done: val loss {result['val_loss']:.4f}, val error "
                f"{result['val_error']:.4f}; test set scored once")
    return line + (" (finished before, reused)" if result.get("reused") else "")


def log_test(parent_run_id: str, summary: dict, line: str) -> None:
    """A ``test_summary`` on the flow's parent: metrics ``test_parent_metrics`` (step 0), tags
    ``test_recipe`` and ``test_seeds``, and ``test_score.txt`` holding ``line``."""
    tracking.log_metrics(parent_run_id, test_parent_metrics(summary), step=0)
    tracking.set_tags(parent_run_id, {"test_recipe": summary["recipe"],
                                      "test_seeds": ",".join(map(str, summary["seeds"]))})
    tracking.log_text(parent_run_id, line + "\n", "test_score.txt")
