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
import os
import time

import pandas as pd
from prefect import flow

from flows.batched import train_members
from flows.children import member, train_children
from flows.common import check_runner, describe_result, set_torch_threads
from flows.harness import flow_parent
from flows.report import log_confirmation, publish_flow_report
from flows.tested import log_test
from flows.transfer_results import compare, log_outcome, print_summary, result_frames
from flows.transfer_settings import DEFAULT_GRID_SEEDS, validate
from flows.transfer_settings import transfer_config as transfer_config  # the tests' import
from lrpipe import resume, runs, tracking
from lrpipe.engine.config import TrainConfig
from lrpipe.engine.models import HEAD
from lrpipe.experiments.confirm import check_fresh_seeds, confirm
from lrpipe.experiments.final import TEST_HEADING, test_set_name, test_table, untested_line
from lrpipe.experiments.finetuning import CUSTOM, strategy_config
from lrpipe.experiments.registration import pretrained_registration
from lrpipe.experiments.transfer import (
    TransferConfig,
    final_rows,
    grid_configs,
    source_config,
    summarize_strategies,
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
        cfg = strategy_config(run_tc, strategy, seed, lr_mult)
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


# --- members: what each child run is ------------------------------------------------------

def finetune_key(run: dict) -> str:
    """What identifies a planned fine-tuning (``plan_runs``) across re-runs: its kind and its
    config. The config alone does not: gradual_unfreeze ends at discriminative's config."""
    cfg = strategy_config(TransferConfig(**run["tc"]), run["strategy"], run["seed"],
                          run["lr_mult"])
    return resume.task_key("finetune", {"kind": run["kind"], "config_hash": cfg.hash()})


def finetune_members(plan: list[dict], model_uri: str) -> list[dict]:
    """Planned fine-tunings (``plan_runs``) as members: each starts from ``model_uri`` under
    its strategy, is reused by its ``finetune_key`` and returns its labels; a run marked
    ``test`` (the best strategy's confirmation) trains without the test split and is scored
    once on it."""
    return [member(
        strategy_config(TransferConfig(**r["tc"]), r["strategy"], r["seed"], r["lr_mult"]),
        r["name"], {"strategy": r["strategy"], "head_mult": r["head_mult"],
                    "base_lr": r["base_lr"], "grid": r["grid"], "phase": "finetune",
                    "strategies": ",".join(r["strategies"]), "pretrained_model": model_uri},
        key=finetune_key(r), test=bool(r.get("test")),
        init={"model_uri": model_uri, "strategy": r["strategy"], "tc": r["tc"]},
        labels={k: r[k] for k in ("strategy", "seed", "base_lr", "head_mult", "strategies",
                                  "grid")}) for r in plan]


def finetune_all(plan: list[dict], model_uri: str, parent: str, experiment: str,
                 threads: int, label: str) -> list[dict]:
    """Every planned fine-tuning, one task each (each keeps its model), as child runs."""
    return train_members(finetune_members(plan, model_uri), parent, experiment,
                         threads=threads, workers=1, label=label, describe=describe_result)


def pretrain_member(tc: TransferConfig, name: str, model_name: str) -> dict:
    """The pretraining as a member: the source config, registered as ``model_name``."""
    return member(source_config(tc), name, {"phase": "pretrain"},
                  register=pretrained_registration(tc, model_name))


def pretrained_result(result: dict) -> dict:
    """The pretraining's result as the flow reads it: URI, run, source val error."""
    return {"model_uri": result["model_uri"], "run_id": result["run_id"], "reused": False,
            "source_val_error": result["val_error"]}


def pretrained_here(run) -> dict:
    """The pretraining's result, rebuilt from its FINISHED child run (an mlflow Run):
    the registered model's URI, the run, and the source val error of its last epoch."""
    return {"model_uri": run.data.tags["registered_model"], "run_id": run.info.run_id,
            "reused": False, "source_val_error": run.data.metrics["val_error"]}


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
    (done,) = train_children([pretrain_member(tc, name, model_name)], parent, experiment,
                             threads)
    return pretrained_result(done)


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
        results = finetune_all(plan, pre["model_uri"], parent, experiment, threads,
                               "transfer")
        strategy_df, grid_df = result_frames(results)
        summary = summarize_strategies(strategy_df)
        log_outcome(parent, strategy_df, grid_df, summary)
        verdicts = [c for rival in ("uniform", "scratch")
                    if (c := compare(summary, "head_mult", rival)) is not None]
        best = summary.iloc[0]
        confirmation = confirm_best(tc, summary, mult, confirm_seeds, pre["model_uri"], parent,
                                    experiment, threads)
        test_text = (untested_line(confirm_seeds, "strategy") if confirmation is None
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
    results = finetune_all(plan, model_uri, parent, experiment, threads, "transfer-confirm")
    record = confirmation_record(results, best, rival, seeds)
    return {**log_confirmation(parent, record, rival, "best"),
            **log_test(parent, [r for r in results if best in r["strategies"]], best, seeds,
                       f"{test_set_name(tc.dataset)}, target classes "
                       f"{list(tc.target_classes)}")}


def confirmation_record(results: list[dict], best: str, rival: str, seeds) -> dict:
    """``confirm.confirm`` of the confirmation's histories on final target validation error:
    the runs' test figures are not in the frame and never reach the verdict."""
    strategy_df, _ = result_frames(results)
    last = final_rows(strategy_df, ["strategy"])
    return confirm(last.assign(arm=last["strategy"]), "val_error", best, rival, seeds=seeds,
                   what="The best strategy against the runner-up",
                   metric="final target validation error")




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
