"""Flow ``pipeline``: what ``make sweep`` runs, one stage after another, each its own subflow.

1. search    ``flows.lr_search``: range test + halving on a subset, regret check on full data.
2. sweep     ``flows.lr_sweep``: full training (default 5 epochs) at the chosen rate and at the
             rates around it that the regret step ran (or at ``lrs`` when given).
3. decay     ``flows.decay_compare.decay_compare(lr=<chosen>, overrides=, runner=, workers=)``.
4. final     ``flows.final.final_training``: the chosen rate with decay's winning schedule
             (constant when decay is skipped) and the constant twin, on the full training
             data for ``final_epochs`` (default 2x decay's), each tested once on the test set
             (Fashion-MNIST's t10k) after its training; the winner is registered.
5. transfer  ``flows.transfer.transfer(overrides=, runner=, workers=)``, at its own
             fine-tuning rates; its settings are validated before the search starts.
The report opens with the final model: rate, schedule, epochs, test accuracy and loss, and the
constant-rate run's beside it.
Each stage keeps its own parent run in its own experiment; a small run in the ``pipeline``
experiment links them (tags ``stage.<name>``) and holds the summary. The pipeline's parent is
resumable like every flow's (``flows.harness``): each finished stage records its result under
it (``stages/<stage>.json``), so re-running a killed ``make sweep`` skips the stages that
finished and resumes the one that was cut short, reusing its finished runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import pandas as pd
from prefect import flow

from flows import decay_compare as decay_flow
from flows import final as final_flow
from flows import lr_search as search_flow
from flows import transfer as transfer_flow
from flows.common import dataset_for, make_task_runner
from flows.harness import flow_parent
from flows.lr_sweep import lr_sweep
from flows.report import publish_flow_report
from lrpipe import tracking
from lrpipe.engine.config import TrainConfig, check_number, is_plugin, merge
from lrpipe.experiments.final import final_epochs as check_final_epochs
from lrpipe.experiments.pipeline import (
    DEFAULT_EPOCHS,
    EXPERIMENT,
    STAGES,
    check_search_settings,
    check_skip,
    final_answer,
    full_training_rates,
    sweep_regret,
)
from lrpipe.experiments.race import check_prune
from lrpipe.experiments.sweep import sweep_configs
from lrpipe.search import plan as search_plan

# --- stages -------------------------------------------------------------------------------

def _with_runner(flow_fn, runner: str, workers: int | None):
    return flow_fn.with_options(task_runner=make_task_runner(runner, workers))


def stage_url(run_id: str | None) -> str:
    """The MLflow UI address of a stage's parent run, whatever experiment holds it."""
    if not run_id:
        return ""
    c = tracking.client()
    name = c.get_experiment(c.get_run(run_id).info.experiment_id).name
    return tracking.run_url(run_id, name)


def _answer(result) -> str:
    """A short line from a later stage's result dict (its best-something, if it says)."""
    if isinstance(result, dict):
        for key in ("answer", "best", "best_schedule", "best_strategy", "best_lr"):
            if result.get(key) is not None:
                return f"{key}: {result[key]}"
    return "done"


def print_pipeline(records: list[dict], parent: str, seconds: float) -> str:
    lines = [f"\npipeline: {len(records)} stages in {seconds:.0f} s"]
    for r in records:
        lines.append(f"  {r['stage']:<9} {r['status']:<8} {r.get('answer', '')}")
        if r.get("url"):
            lines.append(f"  {'':<9} {'':<8} {r['url']}")
    lines.append(f"All stages: {tracking.run_url(parent, EXPERIMENT)}")
    lines.append("Start the MLflow UI with `make ui` to open these links.")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


@flow(name="pipeline")
def pipeline(
    lrs: list[float] | None = None,
    epochs: int = DEFAULT_EPOCHS,
    skip: Sequence[str] = (),
    overrides: dict | None = None,
    search: dict | None = None,
    runner: str = "threads",
    workers: int | None = None,
    final_epochs: int | None = None,
    prune: str | None = None,
) -> dict:
    """Search, full training at the chosen rate and its neighbours, decay, final, transfer.

    Args:
        lrs: full-training rates; default the search's neighbours (lr_sweep's grid when the
            search is skipped).
        epochs: full-training epochs (the search's regret runs use their own, shorter budget).
        skip: stages to leave out (search, sweep, decay, final, transfer).
        search: lr_search settings (subset, seeds, range_steps, regret_epochs, grid_span).
        final_epochs: the final training's budget (epochs; default 2x the decay comparison's).
        prune: the decay comparison's (``seeds``, the default: raced over seeds; ``off``).
    Returns:
        chosen_lr, the final stage's result (None when it did not run) and one record per
        stage (stage, status, answer, run_id, url, result).
    """
    skip = check_skip(skip)
    start = time.perf_counter()
    with flow_parent("pipeline", EXPERIMENT, "pipeline " + ",".join(
        s for s in STAGES if s not in skip), params={
            "lrs": lrs, "epochs": epochs, "skip": skip, "search": search, "runner": runner,
            "overrides": tracking.to_json(overrides or {}),
            # only when set: a killed run of the default settings resumes the same parent
            **({} if final_epochs is None else {"final_epochs": final_epochs}),
            **({} if prune is None else {"prune": prune})}) as parent:
        records, chosen = _run_stages(lrs, epochs, skip, overrides, search, runner, workers,
                                      parent, final_epochs, prune)
        final = next((r["result"] for r in records
                      if r["stage"] == "final" and r["status"] == "done"), None)
        for r in records:
            r["url"] = stage_url(r.get("run_id"))
        tracking.set_tags(parent, {f"stage.{r['stage']}": r.get("run_id") or r["status"]
                                   for r in records})
        if chosen is not None:
            tracking.log_metrics(parent, {"chosen_lr": chosen}, step=0)
        if final is not None:
            _log_final(parent, final)
        text = print_pipeline(records, parent, time.perf_counter() - start)
        tracking.log_text(parent, text, "summary.txt")
        table = pd.DataFrame([{k: r.get(k, "") for k in ("stage", "status", "answer", "url")}
                              for r in records])
        publish_flow_report(parent, EXPERIMENT, "lrpipe pipeline",
                            final_answer(final, chosen), table,
                            evidence=["no rate chosen" if chosen is None
                                      else f"chosen rate {chosen:.3g}"]
                            + [f"{r['stage']}: {r.get('answer', '')}" for r in records],
            key=EXPERIMENT)
    return {"parent_run_id": parent, "chosen_lr": chosen, "final": final, "stages": records}


def _log_final(parent: str, final: dict) -> None:
    """The final model's test metrics and registry URI on the pipeline's run."""
    win, const = final["winner"], final["constant"]
    tracking.set_tags(parent, {"final_model": final.get("model_uri") or "",
                               "final_schedule": final["schedule"]})
    metrics = {"final_epochs": final["epochs"]}
    for prefix, result in (("final_", win), ("final_constant_", const)):
        if result is not None and result["status"] != "diverged":
            metrics.update({f"{prefix}test_accuracy": result["test_accuracy"],
                            f"{prefix}test_loss": result["test_loss"]})
    tracking.log_metrics(parent, metrics, step=0)


def staged(parent: str, stage: str, run) -> dict:
    """A stage's result: the one an earlier run of this pipeline recorded under ``parent``
    before it was cut short (a resume), else ``run()``'s, recorded now."""
    saved = tracking.read_text(parent, f"stages/{stage}.json")
    if saved is not None:
        print(f"pipeline: {stage} finished before this run was cut short; reused", flush=True)
        return json.loads(saved)
    result = run()
    tracking.log_text(parent, tracking.to_json(result), f"stages/{stage}.json")
    return result


def _run_stages(lrs, epochs, skip, overrides, search, runner, workers, parent,
                final_epochs=None, prune=None):
    """(stage records, chosen rate): each stage feeds the rate to the next."""
    records, found, chosen = [], None, None
    if "search" in skip:
        records.append({"stage": "search", "status": "skipped", "answer": "--skip"})
    else:
        found = staged(parent, "search", lambda: _with_runner(
            search_flow.lr_search, runner, workers)(
                **(search or {}), overrides=overrides, runner=runner, workers=workers))
        chosen = found["chosen_lr"]
        lo, hi = found["band"]
        records.append({"stage": "search", "status": "done", "run_id": found["parent_run_id"],
                        "answer": f"lr {chosen:.3g} (band {lo:.3g}..{hi:.3g}, chosen by "
                                  f"{found['chosen_by']}){_confirmed(found)}", "result": found})
    if "sweep" in skip:
        records.append({"stage": "sweep", "status": "skipped", "answer": "--skip"})
    else:
        swept = staged(parent, "sweep", lambda: _with_runner(lr_sweep, runner, workers)(
            lrs=full_training_rates(lrs, found), epochs=epochs, overrides=overrides,
            highlight=chosen, runner=runner, workers=workers))
        chosen = chosen if chosen is not None else swept["best_lr"]
        records.append({"stage": "sweep", "status": "done", "run_id": swept["parent_run_id"],
                        "answer": _sweep_answer(swept, chosen, epochs), "result": swept,
                        "check": sweep_regret(swept["summary"], chosen)})
    # Transfer does not get the chosen rate: its lr is the fine-tuning base rate of a momentum
    # optimizer on another network and task (a 10x head on top), another quantity.
    done: dict[str, dict] = {}
    later = {"decay": lambda: _with_runner(decay_flow.decay_compare, runner, workers)(
                 lr=chosen, overrides=dict(overrides or {}), runner=runner, workers=workers,
                 prune=check_prune(prune)),
             "final": lambda: _with_runner(final_flow.final_training, runner, workers)(
                 lr=chosen, best_schedule=done.get("decay", {}).get("best_schedule"),
                 decay_epochs=decay_flow.DEFAULT_EPOCHS, epochs=final_epochs,
                 overrides=dict(overrides or {}), runner=runner, workers=workers),
             "transfer": lambda: _with_runner(transfer_flow.transfer, runner, workers)(
                 overrides=dict(overrides or {}), runner=runner, workers=workers)}
    for stage, run in later.items():
        if stage in skip:
            records.append({"stage": stage, "status": "skipped", "answer": "--skip"})
            continue
        if stage == "final" and chosen is None:
            records.append({"stage": stage, "status": "skipped",
                            "answer": "no rate chosen (search and sweep skipped)"})
            continue
        if stage == "final" and "decay" not in done:
            print("pipeline: final: the decay comparison was skipped; the final training "
                  "uses the constant rate", flush=True)
        done[stage] = result = staged(parent, stage, run)
        records.append({"stage": stage, "status": "done", "run_id": result["parent_run_id"],
                        "answer": _answer(result), "result": result})
    return records, chosen


def _confirmed(found: dict) -> str:
    """The search's out-of-sample verdict, for its stage line."""
    conf = found.get("confirmation")
    if not conf:
        return ""
    return (f"; on fresh seeds against lr {conf['rival']:.3g}: {conf['verdict']} "
            f"(margin {conf['margin']:+.1%}, seed band {conf['band']:.1%})")


def _sweep_answer(swept: dict, chosen: float | None, epochs: int) -> str:
    check = sweep_regret(swept["summary"], chosen)
    if check is None:
        return f"best lr {swept['best_lr']} after {epochs} epochs"
    return (f"{epochs} epochs: chosen lr {check['lr']:.3g} val loss {check['val_loss']:.4f}; "
            f"best lr {check['best_lr']:.3g} {check['best_val_loss']:.4f} "
            f"(chosen {check['regret']:+.1%})")


def check(lrs=None, epochs=DEFAULT_EPOCHS, skip=(), overrides=None,
          search=None, final_epochs=None, prune=None) -> tuple[dict, list[TrainConfig]]:
    """The search's and the full training's checks, before anything is recorded (the later
    stages validate their own settings when they start): the flow's keyword arguments and
    the configs to preflight."""
    skip = check_skip(skip)
    check_number("epochs", epochs, low=1, integer=True)
    check_final_epochs(decay_flow.DEFAULT_EPOCHS, final_epochs)
    prune = None if prune is None else check_prune(prune)
    base = merge(TrainConfig(), {**(overrides or {}), "epochs": epochs})
    cfgs = [base] if lrs is None else sweep_configs(base, list(lrs))
    if "transfer" not in skip and (is_plugin(base.model.name) or is_plugin(base.data.dataset)):
        print("pipeline: transfer skipped: it pretrains lrpipe's own networks on a source task "
              "of Fashion-MNIST; your --model/--data have none", flush=True)
        skip = [*skip, "transfer"]
    if "search" not in skip:
        search = check_search_settings(search, overrides)
        if "subset" not in search:  # the default follows the data: all of a smaller set
            search["subset"] = min(search_plan.DEFAULT_SUBSET, len(dataset_for(base).train))
        cfgs.append(base.replace(**{"data.subset": search.get("subset",
                                                              search_plan.DEFAULT_SUBSET)}))
    if "transfer" not in skip:  # its own settings, before the search spends minutes
        transfer_flow.validate(overrides=dict(overrides or {}))
    return {"lrs": None if lrs is None else list(lrs), "epochs": epochs, "skip": skip,
            "overrides": overrides, "search": dict(search or {}),
            "final_epochs": final_epochs, "prune": prune}, cfgs
