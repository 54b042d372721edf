"""Flow ``transfer``: pretrain once, register the model, fine-tune under per-layer rate rules.

The source network is trained once, as a child run, and registered in the MLflow model registry
(``lrpipe-pretrained-<model>``) with the hash of its pretraining config as a tag; a later run
whose pretraining config is the same reuses that version instead of training again. Every
fine-tuning (strategy x seed, and the base rate x head multiplier grid) is one task that loads
the pretrained weights by their ``models:/`` URI and logs one child run. Figures and the strategy
table go on the parent run (experiment ``transfer``). Every setting is validated before anything
is recorded. The same command after a crash or a kill resumes into the same parent
(``flows.harness``): its pretraining, if it finished, and every fine-tuning that finished are
reused from MLflow, so the summary and the best strategy come out as an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Mapping

import pandas as pd
import torch
from prefect import flow, task, unmapped

from flows.common import (
    both,
    check_runner,
    collect,
    dataset_for,
    describe_result,
    epoch_printer,
    set_torch_threads,
)
from flows.harness import flow_parent
from flows.report import log_confirmation, publish_flow_report
from flows.tested import log_scored, log_test, logged_test
from flows.transfer_results import compare, log_outcome, print_summary, result_frames
from flows.transfer_settings import CUSTOM, DEFAULT_GRID_SEEDS, validate
from flows.transfer_settings import transfer_config as transfer_config  # the tests' import
from lrpipe import procs, resume, runs, tracking
from lrpipe.engine.config import TrainConfig
from lrpipe.engine.models import HEAD
from lrpipe.engine.train import TrainResult, resolve_device, train
from lrpipe.experiments.confirm import check_fresh_seeds, confirm
from lrpipe.experiments.final import (
    CONFIRM_OFF,
    TEST_HEADING,
    score_once,
    test_line,
    test_set_name,
    test_summary,
    test_table,
    without_test,
)
from lrpipe.experiments.transfer import (
    TransferConfig,
    final_rows,
    finetune,
    grid_configs,
    source_config,
    summarize_strategies,
    target_config,
    trainable_layers,
    transplant,
)
from lrpipe.search.plan import DEFAULT_CONFIRM_SEEDS

# Loading a registered model downloads its files; MLflow would draw a progress bar per task.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

EXPERIMENT = "transfer"
# --- the plan: each distinct fine-tuning once ------------------------------------------------

def pretrain_hash(tc: TransferConfig) -> str:
    """The identity of the pretrained weights: the hash of the source run's TrainConfig. The
    fine-tuning fields (base_lr, head_mult, seeds, ...) don't change them, so they don't count."""
    return source_config(tc).hash()


def finetune_config(tc: TransferConfig, strategy: str, seed: int,
                    lr_mult: Mapping[str, float] | None = None) -> TrainConfig:
    if strategy == CUSTOM:
        return target_config(tc, "uniform", seed).replace(**{"optim.lr_mult": dict(lr_mult)})
    return target_config(tc, strategy, seed)


def run_name(strategy: str, cfg: TrainConfig) -> str:
    """``head_mult x10 lr=0.01 momentum mlp seed=0``: the strategy, its head multiplier, the rest
    as every flow names a training run."""
    head = dict(cfg.optim.lr_mult).get(HEAD, 1.0)
    label = strategy if strategy in ("uniform", "scratch", CUSTOM) else f"{strategy} x{head:g}"
    return runs.training_run_name(cfg, prefix=f"{label} ")


def plan_runs(tc: TransferConfig, strategies, grid_seeds: int, lr_mult=None) -> list[dict]:
    """Every fine-tuning to run, each once: strategy x seed, then each (base_lr, head_mult) of
    the grid x the first ``grid_seeds`` seeds. A grid cell that trains exactly like a strategy
    run (head_mult at the base rate; multiplier 1 = uniform) is that run, labelled for both.
    ``kind`` says how it trains (one train() from the transplant, staged unfreezing, or
    scratch): with the config it identifies the run (``finetune_key``)."""
    wanted = [(s, tc, seed, False) for s in strategies for seed in tc.seeds]
    wanted += [("head_mult", dataclasses.replace(tc, base_lr=lr, head_mult=mult), seed, True)
               for lr, mult in grid_configs(tc) for seed in tc.seeds[:grid_seeds]]
    runs: dict[tuple, dict] = {}
    for strategy, run_tc, seed, in_grid in wanted:
        cfg = finetune_config(run_tc, strategy, seed, lr_mult)
        kind = strategy if strategy in ("scratch", "gradual_unfreeze") else "transplant"
        run = runs.setdefault((kind, cfg.hash()), {
            "strategy": strategy, "seed": seed, "base_lr": cfg.optim.lr,
            "head_mult": dict(cfg.optim.lr_mult).get(HEAD, 1.0), "kind": kind,
            "tc": dataclasses.asdict(run_tc), "lr_mult": lr_mult if strategy == CUSTOM else None,
            "name": run_name(strategy, cfg), "strategies": [], "grid": False})
        if in_grid:
            run["grid"] = True
        elif strategy not in run["strategies"]:
            run["strategies"].append(strategy)
    return list(runs.values())


# --- tasks ----------------------------------------------------------------------------------

def log_history(run_id: str, history: pd.DataFrame) -> None:
    """Per-epoch metrics (train()'s names, step=epoch) of a run that trained without a hook."""
    log = tracking.epoch_logger(run_id)
    for row in history.to_dict("records"):
        log(row)


@functools.lru_cache(maxsize=4)
def _registered(model_uri: str, store: str, device: str) -> torch.nn.Module:
    return tracking.load_registered(model_uri, device, uri=store)


def pretrained_model(model_uri: str, device: str) -> torch.nn.Module:
    """The registered model, loaded once per process, store and device (a registered version
    never changes; fine-tuning works on transplant()'s deep copy, never on this one)."""
    return _registered(model_uri, tracking.tracking_uri(), device)


@task(name="pretrain", task_run_name="pretrain {name}")
def pretrain_and_register(tc_dict: dict, parent_run_id: str, experiment: str, name: str,
                          model_name: str, threads: int = 1) -> dict:
    """Train the source task as one child run and register the weights; return the URI."""
    torch.set_num_threads(threads)
    tc = TransferConfig(**tc_dict)
    cfg = source_config(tc)
    data = dataset_for(cfg)
    # The writer's tags let the next run mark this one KILLED if its process dies.
    with runs.training_run(cfg, experiment, parent_run_id, name=name,
                               tags={"phase": "pretrain", **procs.process_tags()}) as run_id:
        result = train(cfg, data, keep_model=True, on_epoch=both(
            tracking.epoch_logger(run_id), epoch_printer(name, cfg.epochs)))
        tracking.set_tags(run_id, {"status": result.status, "device": result.device})
        if result.status == "diverged":
            raise ValueError(f"pretraining diverged in epoch {result.diverged_epoch}; "
                             f"allowed: a smaller pretrain_lr than {tc.pretrain_lr:g}")
        final = result.final()
        uri = tracking.register_model(
            run_id, result.model, model_name, pretrain_hash(tc), model_cfg=cfg.model,
            input_shape=data.input_shape, num_classes=data.num_classes,
            tags={"dataset": tc.dataset, "source_classes": list(tc.source_classes),
                  "source_val_error": f"{final['val_error']:.4f}"},
            description=f"{tc.model} {list(tc.hidden)} pretrained on {tc.dataset} classes "
                        f"{list(tc.source_classes)}, {tc.pretrain_epochs} epochs")
    return {"model_uri": uri, "run_id": run_id, "reused": False,
            "source_val_error": final["val_error"]}


def pretrained_here(run) -> dict:
    """``pretrain_and_register``'s result, rebuilt from its FINISHED child run (an mlflow Run):
    the registered model's URI, the run, and the source val error of its last epoch."""
    return {"model_uri": run.data.tags["registered_model"], "run_id": run.info.run_id,
            "reused": False, "source_val_error": run.data.metrics["val_error"]}


def finetune_key(run: dict) -> str:
    """What identifies a planned fine-tuning (``plan_runs``) across re-runs: its kind and its
    config. The config alone does not: gradual_unfreeze ends at discriminative's config."""
    cfg = finetune_config(TransferConfig(**run["tc"]), run["strategy"], run["seed"],
                          run["lr_mult"])
    return resume.task_key("finetune", {"kind": run["kind"], "config_hash": cfg.hash()})


def finetune_result(run: dict, run_id: str, result: TrainResult, reused: bool = False) -> dict:
    """What ``finetune_and_log`` returns: the planned run's labels, final metrics, history."""
    labels = {k: run[k] for k in ("name", "strategy", "seed", "base_lr", "head_mult",
                                  "strategies", "grid")}
    return {"run_id": run_id, **labels, **result.final(), "reused": reused,
            "history": result.history.to_dict("records")}


def finetuned_before(run: dict, child) -> dict:
    """``finetune_and_log``'s result rebuilt from its FINISHED child run (an mlflow Run): the
    logged epochs, with ``trainable_layers`` read back from the per-layer rates."""
    history = tracking.run_history(child.info.run_id)
    tags = child.data.tags
    diverged = tags.get("diverged_epoch", "")
    done = TrainResult(history=history.assign(trainable_layers=trainable_layers(history)),
                       status=tags.get("status", "ok"),
                       diverged_epoch=int(diverged) if diverged.isdigit() else None,
                       device=tags.get("device", "cpu"))
    return {**finetune_result(run, child.info.run_id, done, reused=True),
            **(logged_test(child) if run.get("test") else {})}


@task(name="finetune", task_run_name="finetune {run[name]}")
def finetune_and_log(run: dict, model_uri: str, parent_run_id: str, experiment: str,
                     threads: int = 1) -> dict:
    """Fine-tune one planned run (``plan_runs``) from the registered model as one child run;
    return its labels, final metrics and history rows. A run marked ``test`` (the best
    strategy's confirmation) trains without the test split and is scored once on it after
    training: ``TEST_KEYS`` logged on the run and returned (NaN when it diverged).

    A FINISHED child of the parent with the same ``finetune_key`` (a resumed run) is reused:
    nothing is trained, the result is rebuilt from MLflow (``reused`` True)."""
    torch.set_num_threads(threads)
    key = finetune_key(run)
    if parent_run_id and (done := resume.finished_task(parent_run_id, key)) is not None:
        return finetuned_before(run, done)
    tc = TransferConfig(**run["tc"])
    cfg = finetune_config(tc, run["strategy"], run["seed"], run["lr_mult"])
    data, scored = dataset_for(cfg), bool(run.get("test"))
    seen = without_test(data) if scored else data
    tags = {"strategy": run["strategy"], "head_mult": run["head_mult"],
            "base_lr": run["base_lr"], "grid": run["grid"], "phase": "finetune",
            "strategies": ",".join(run["strategies"]), "pretrained_model": model_uri,
            resume.TASK_TAG: key, **procs.process_tags()}
    with runs.training_run(cfg, experiment, parent_run_id, name=run["name"],
                               tags=tags) as run_id:
        pretrained = (None if run["strategy"] == "scratch"
                      else pretrained_model(model_uri, str(resolve_device(cfg.device))))
        if run["strategy"] == CUSTOM:
            result = train(cfg, seen, model=transplant(pretrained, data.num_classes, cfg.seed),
                           keep_model=scored)
        else:
            result = finetune(tc, run["strategy"], cfg.seed, pretrained, seen, scored)
        log_history(run_id, result.history)
        tracking.set_tags(run_id, {"status": result.status, "device": result.device,
                                   "diverged_epoch": result.diverged_epoch or ""})
        test = score_once(result.model, data, result.status) if scored else {}
        if scored:
            log_scored(run_id, test, int(result.history["epoch"].iloc[-1]))
    return {**finetune_result(run, run_id, result), **test}


# --- the flow -------------------------------------------------------------------------------

def obtain_pretrained(tc, model_name, retrain, parent, experiment, threads) -> dict:
    """The registered model for ``tc``'s pretraining config: this parent's own pretraining if
    it FINISHED before a crash (a resumed run: the answer of an uninterrupted one, even with
    ``retrain``), else one from the registry (unless ``retrain``), else pretrained now as a
    child run and registered."""
    key = pretrain_hash(tc)
    if (own := resume.finished_child(parent, key)) is not None:
        print(f"Reusing {own.info.run_name}, pretrained and registered by this run before it "
              f"was interrupted ({own.data.tags['registered_model']})", flush=True)
        return pretrained_here(own)
    found = None if retrain else tracking.find_registered(model_name, key)
    if found:
        print(f"Reusing the registered pretrained model {found} (pretraining config {key}); "
              "pass --retrain to train it again.", flush=True)
        return {"model_uri": found, "run_id": None, "reused": True}
    name = runs.training_run_name(source_config(tc), prefix="pretrain ")
    print(f"Pretraining {name} (no registered {model_name} for config {key})", flush=True)
    return pretrain_and_register(dataclasses.asdict(tc), parent, experiment, name, model_name,
                                 threads)


@flow(name="transfer")
def transfer(lr: float | None = None, epochs: int | None = None, seeds=None,
             overrides: dict | None = None, strategies=None,
             grid_seeds: int = DEFAULT_GRID_SEEDS, lr_mult: dict | None = None,
             model_name: str | None = None, retrain: bool = False, runner: str = "threads",
             workers: int | None = None, experiment: str = EXPERIMENT,
             confirm_seeds=DEFAULT_CONFIRM_SEEDS) -> dict:
    """Pretrain (or reuse), fine-tune every strategy x seed and the grid, summarize, then
    fine-tune the best and the runner-up strategy again on the fresh ``confirm_seeds`` (out
    of sample; empty: not).

    Returns the parent run id, the pretrained model's URI and whether it was reused, the
    strategy summary records, the head-rule comparisons and every child run id.
    """
    check_runner(runner)
    tc, names, mult, model_name = validate(lr, epochs, seeds, overrides, strategies,
                                           grid_seeds, lr_mult, model_name)
    confirm_seeds = check_fresh_seeds(confirm_seeds, tc.seeds)
    plan = plan_runs(tc, names, grid_seeds, mult)
    start = time.perf_counter()
    threads = set_torch_threads(runner, workers)
    with flow_parent("transfer", experiment,
                     f"transfer {tc.optimizer} {tc.model} {len(names)} strategies x "
                     f"{len(tc.seeds)} seeds", params={
                         **dataclasses.asdict(tc), "strategies": list(names),
                         "grid_seeds": grid_seeds, "lr_mult": mult, "runner": runner,
                         **({"confirm_seeds": list(confirm_seeds)} if confirm_seeds else {})}
                     ) as parent:
        pre = obtain_pretrained(tc, model_name, retrain, parent, experiment, threads)
        tracking.set_tags(parent, {"pretrained_model": pre["model_uri"],
                                   "pretrained_reused": pre["reused"]})
        futures = finetune_and_log.map(plan, unmapped(pre["model_uri"]), unmapped(parent),
                                       unmapped(experiment), unmapped(threads))
        results = collect(futures, "transfer", describe_result)
        strategy_df, grid_df = result_frames(results)
        summary = summarize_strategies(strategy_df)
        log_outcome(parent, strategy_df, grid_df, summary)
        verdicts = [c for rival in ("uniform", "scratch")
                    if (c := compare(summary, "head_mult", rival)) is not None]
        best = summary.iloc[0]
        confirmation = confirm_best(tc, summary, mult, confirm_seeds, pre["model_uri"], parent,
                                    experiment, threads)
        test_text = (untested_line(confirm_seeds) if confirmation is None
                     else confirmation["test_line"])
        publish_flow_report(
            parent, experiment, "Pretrain, then fine-tune",
            f"Best strategy: {best['strategy']} (final target validation error "
            f"{best['mean']:.4f} ± {best['std']:.4f} over {len(tc.seeds)} seeds)", summary,
            evidence=[f"pretrained model: {pre['model_uri']} (reused: {pre['reused']})"]
            + ([] if confirmation is None else [confirmation["line"]]) + [test_text]
            + [f"{v['strategy']} {'beat' if v['beat'] else 'lost to'} {v['rival']} by "
               f"{abs(v['gap']):.4f} ({'clear' if v['clear'] else 'within the seed spread'})"
               for v in verdicts], key="transfer", tables=None if confirmation is None
            else {TEST_HEADING: test_table(confirmation["test"])})
    print_summary(tc, summary, grid_df, pre, verdicts, parent, experiment,
                  time.perf_counter() - start, grid_seeds)
    print(test_text, flush=True)
    return {"parent_run_id": parent, "model_uri": pre["model_uri"], "reused": pre["reused"],
            "pretrain_run_id": pre["run_id"], "summary": summary.to_dict("records"),
            "verdicts": verdicts, "run_ids": [r["run_id"] for r in results],
            "confirmation": confirmation}


def confirm_best(tc: TransferConfig, summary: pd.DataFrame, mult, seeds, model_uri: str,
                 parent: str, experiment: str, threads: int) -> dict | None:
    """The best and the runner-up strategy fine-tuned on ``seeds`` (seeds that did not rank
    them): final target validation errors summarized (``confirm.summarize_arms``), a verdict,
    ``confirm.csv`` and the tag ``confirm_verdict``; None without seeds or a runner-up. The
    best's runs train without the target test split and are scored once on it (``test``: the
    ``test_summary``, on the parent, and its ``test_line``); the verdict reads validation
    only."""
    if not seeds or len(summary) < 2:
        return None
    best, rival = summary["strategy"].iloc[0], summary["strategy"].iloc[1]
    plan = [{**r, "test": best in r["strategies"]} for r in plan_runs(
        dataclasses.replace(tc, seeds=tuple(seeds)), (best, rival), 0, mult)]
    futures = finetune_and_log.map(plan, unmapped(model_uri), unmapped(parent),
                                   unmapped(experiment), unmapped(threads))
    results = collect(futures, "transfer-confirm", describe_result)
    record = confirmation_record(results, best, rival, seeds)
    test = test_summary(pd.DataFrame([r for r in results if best in r["strategies"]]), best, seeds)
    line = test_line(test, f"{test_set_name(tc.dataset)}, target classes "
                           f"{list(tc.target_classes)}")
    log_test(parent, test, line)
    return {**log_confirmation(parent, record, rival, "best"), "test": test,
            "test_line": line}


def confirmation_record(results: list[dict], best: str, rival: str, seeds) -> dict:
    """``confirm.confirm`` of the confirmation's histories on final target validation error:
    the runs' test figures are not in the frame and never reach the verdict."""
    strategy_df, _ = result_frames(results)
    last = final_rows(strategy_df, ["strategy"])
    return confirm(last.assign(arm=last["strategy"]), "val_error", best, rival, seeds=seeds,
                   what="The best strategy against the runner-up",
                   metric="final target validation error")


def untested_line(seeds) -> str:
    """The report's test line when no fine-tuning was scored: confirmation off, or one
    strategy (no runner-up)."""
    why = CONFIRM_OFF if not seeds else "no test score: one strategy, no runner-up"
    return f"{TEST_HEADING}: {why}"


def check(lr=None, epochs=None, seeds=None, strategies=None, grid_seeds=DEFAULT_GRID_SEEDS,
          lr_mult=None, model_name=None, retrain=False,
          overrides=None, confirm_seeds=DEFAULT_CONFIRM_SEEDS) -> tuple[dict, list[TrainConfig]]:
    """Every input checked (``validate``): the flow's keyword arguments."""
    tc, *_ = validate(lr, epochs, seeds, overrides, strategies, grid_seeds, lr_mult, model_name)
    confirm_seeds = check_fresh_seeds(confirm_seeds, tc.seeds)
    return {"lr": lr, "epochs": epochs, "seeds": seeds, "overrides": overrides,
            "strategies": strategies, "grid_seeds": grid_seeds, "lr_mult": lr_mult,
            "model_name": model_name, "retrain": bool(retrain),
            "confirm_seeds": list(confirm_seeds)}, []
