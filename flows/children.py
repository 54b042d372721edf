"""The one task that opens training child runs: ``train_children``.

Every flow trains through it (``flows.batched.train_planned`` plans and submits it). A task
trains a group of members, each a plain dict (``member``) and each one MLflow child run of the
flow's parent. What differs between flows is data on the member, not another task:

- ``cfg``, ``name``, ``tags``: the TrainConfig (as a dict), the run's name and extra tags;
- ``key``: a ``resume.task_key`` that identifies the member where its config hash does not
  (transfer's ``finetune_key``: gradual unfreezing ends at discriminative's config);
- ``init``: ``{"model_uri", "strategy", "tc"}``: fine-tuned from that registered model under
  that strategy (``lrpipe.experiments.finetuning``);
- ``test``: trained without the test split, then scored once on it (issue 27);
- ``register``: a registration (``lrpipe.experiments.registration``): the model is registered
  as it says (the final model, the transfer flow's pretrained network);
- ``extras``: ``{"total_decay", "updates_per_epoch"}``: a schedule's total decay and its
  per-update rate curve on the run (the decay comparison);
- ``labels``: copied into the result (a strategy, a schedule label).

Plain members train through ``lrpipe.engine.many.train_many`` (batched where the declared policy
says so); a member that needs its model kept (``init``, ``test``, ``register``) trains alone. A
member that already has a FINISHED child of the parent (a resumed flow) is reused: nothing is
trained, its result is rebuilt from MLflow (``reused`` True).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field

import torch
from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

from flows.common import RESULTS, both, dataset_for, epoch_printer, history_records
from lrpipe import procs, resume, runs, tracking
from lrpipe.engine.config import TrainConfig, from_dict, to_dict
from lrpipe.engine.loop import Stopped, stop_requested
from lrpipe.engine.many import plan_many, train_many
from lrpipe.engine.schedules import preview
from lrpipe.engine.train import TrainResult, resolve_device, train
from lrpipe.experiments.final import TEST_KEYS, score_once, without_test
from lrpipe.experiments.finetuning import finetune_from
from lrpipe.experiments.registration import filled
from lrpipe.experiments.transfer import TransferConfig, trainable_layers

KINDS = ("key", "init", "test", "register", "extras", "labels")


def member(cfg: TrainConfig, name: str, tags: dict | None = None, **kinds) -> dict:
    """One member of a ``train_children`` task: ``cfg`` as a dict, its run name and tags, and
    any of ``KINDS``.
    Raises:
        ValueError: a keyword that is not one of ``KINDS``.
    """
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"member: unknown {unknown}; allowed: {', '.join(KINDS)}")
    return {"cfg": to_dict(cfg), "name": name, "tags": dict(tags or {}), **kinds}


def keeps_model(m: dict) -> bool:
    """Whether a member needs its trained model after training: it trains alone."""
    return bool(m.get("init") or m.get("test") or m.get("register") is not None)


@dataclass
class ResumeCache(CachePolicy):
    """Prefect's cache key for training tasks: the inputs (minus ``threads``, which changes no
    number) and the task's source. Not the flow run id: the parent run id is an input, so a
    resumed sweep (same parent) hits the cache and a new sweep does not. No parent, no cache;
    nor for a member that is more than a config (any of ``KINDS`` but labels): those resume
    from MLflow alone, where their logged test figures, models and extras are."""

    inner: CachePolicy = field(default_factory=lambda: (INPUTS - "threads") + TASK_SOURCE)

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str | None:
        if not inputs.get("parent_run_id") or any(
                m.get(k) not in (None, False) for m in inputs.get("members", [])
                for k in KINDS if k != "labels"):
            return None
        return self.inner.compute_key(task_ctx, inputs, flow_parameters, **kwargs)


def logged_result(run, cfg: TrainConfig, uri: str | None = None) -> TrainResult:
    """The TrainResult of a FINISHED child run, rebuilt from its metric histories and tags."""
    tags = run.data.tags
    diverged = tags.get("diverged_epoch", "")
    steps = tracking.run_step_log(run.info.run_id, uri)
    if len(steps):  # the fractional epoch of each logged step, as the loop wrote it
        per_epoch = -(-len(dataset_for(cfg).train) // cfg.batch_size)
        steps.insert(1, "epoch", steps["step"] / per_epoch)
    return TrainResult(history=tracking.run_history(run.info.run_id, uri), step_log=steps,
                       status=tags.get("status", "ok"),
                       diverged_epoch=int(diverged) if diverged.isdigit() else None,
                       device=tags.get("device", "cpu"))


def result_from_run(run, cfg: TrainConfig, name: str, uri: str | None = None) -> dict:
    """The task result of a FINISHED child run (``task_result``, ``reused`` True)."""
    return task_result(run.info.run_id, name, cfg, logged_result(run, cfg, uri), reused=True)


def task_result(run_id: str, name: str, cfg: TrainConfig, result: TrainResult,
                reused: bool = False) -> dict:
    return {"run_id": run_id, "name": name, "lr": cfg.optim.lr, "seed": cfg.seed,
            "config_hash": cfg.hash(), **result.final(), "reused": reused,
            "history": history_records(result.history, lr=cfg.optim.lr, seed=cfg.seed,
                                       status=result.status,
                                       diverged_epoch=result.diverged_epoch),
            "steps": history_records(result.step_log, lr=cfg.optim.lr, seed=cfg.seed)}


def group_run_name(parameters: dict) -> str:
    """A task's run name from its members' names."""
    names = [m["name"] for m in parameters["members"]]
    return f"train {names[0]}" if len(names) == 1 else \
        f"train {len(names)} together: {names[0]} .. {names[-1]}"


def check_group(cfgs: list[TrainConfig], members: list[dict]) -> None:
    if not members:
        raise ValueError("members: got none; allowed: at least one")
    for cfg in cfgs:
        if (cfg.data, cfg.device) != (cfgs[0].data, cfgs[0].device):
            raise ValueError("members: they differ in data or device; allowed: one dataset "
                             "and device per group (they train on one loaded copy)")


@task(name="train-group", task_run_name=group_run_name, cache_policy=ResumeCache(),
      persist_result=True, result_storage=RESULTS)
def train_children(members: list[dict], parent_run_id: str, experiment: str,
                   threads: int = 1, uri: str | None = None) -> list[dict]:
    """Train ``members`` (``member``) in one task, each its own MLflow child run of
    ``parent_run_id``: params (the flattened config), per-epoch metrics (step=epoch), tags
    status, config_hash, device, diverged_epoch, ``trained`` (batched k=N | alone) and the
    member's tags. ``uri`` names the tracking store (default: the process's own).
    Returns:
        One dict per member, in order: ``task_result``'s, plus the member's labels, the test
        figures (``test``) and ``model_uri`` (``register``).
    Raises:
        ValueError: no members, or members that differ in data or device.
        Stopped: a stop was requested before the task started (nothing is recorded).
    """
    torch.set_num_threads(threads)  # per OS thread under OpenMP: set it in the task's thread
    if stop_requested():
        raise Stopped(f"{members[0]['name'] if members else 'train'} ..: not started")
    cfgs = [from_dict(m["cfg"]) for m in members]
    check_group(cfgs, members)
    results = [reused(m, cfg, parent_run_id, uri) for m, cfg in zip(members, cfgs, strict=True)]
    todo = [i for i, r in enumerate(results) if r is None]
    process = procs.process_tags()
    tags = {i: {**process, **members[i]["tags"], **(
        {resume.TASK_TAG: members[i]["key"]} if members[i].get("key") else {})} for i in todo}
    plain = [i for i in todo if not keeps_model(members[i])]
    if plain:
        trained = train_plain([cfgs[i] for i in plain], [members[i]["name"] for i in plain],
                              parent_run_id, experiment, [tags[i] for i in plain], uri)
        for i, out in zip(plain, trained, strict=True):
            results[i] = out
    for i in todo:
        if i not in plain:
            results[i] = train_kept(members[i], cfgs[i], parent_run_id, experiment, tags[i], uri)
    return [finish(m, cfg, r, uri) for m, cfg, r in zip(members, cfgs, results, strict=True)]


def reused(m: dict, cfg: TrainConfig, parent_run_id: str, uri: str | None) -> dict | None:
    """A member's result from its FINISHED child of the parent (by its ``key``, else its
    config hash), or None when there is none."""
    if not parent_run_id:
        return None
    done = (resume.finished_task(parent_run_id, m["key"], uri) if m.get("key")
            else resume.finished_child(parent_run_id, cfg.hash(), uri))
    if done is None:
        return None
    result = logged_result(done, cfg, uri)
    if m.get("init"):  # a fine-tuning's trainable layers, read back from its per-layer rates
        result.history = result.history.assign(
            trainable_layers=trainable_layers(result.history))
    out = task_result(done.info.run_id, m["name"], cfg, result, reused=True)
    if m.get("test"):
        out.update({k: float(done.data.metrics.get(k, math.nan)) for k in TEST_KEYS})
    if "register" in m:
        out["model_uri"] = done.data.tags.get("registered_model")
    return out


def train_plain(cfgs: list[TrainConfig], names: list[str], parent_run_id: str,
                experiment: str, tags: list[dict], uri: str | None) -> list[dict]:
    """Open every member's child run, train them all with train_many, log, close the runs."""
    data = dataset_for(cfgs[0])
    plan = plan_many(cfgs)
    trained = {i: f"batched k={len(idxs)}" if batched else "alone"
               for idxs, batched in plan for i in idxs}
    with contextlib.ExitStack() as stack:  # every child ends FAILED if training raises
        run_ids = [stack.enter_context(runs.training_run(
            cfg, experiment, parent_run_id, name=name, tags={**tags[i], "trained": trained[i]},
            uri=uri)) for i, (cfg, name) in enumerate(zip(cfgs, names, strict=True))]
        hooks = [both(tracking.epoch_logger(run_id, uri), epoch_printer(name, cfg.epochs))
                 for run_id, name, cfg in zip(run_ids, names, cfgs, strict=True)]
        results = train_many(cfgs, data, on_epoch=lambda i, row: hooks[i](row), plan=plan)
        for run_id, result in zip(run_ids, results, strict=True):
            runs.record_result(run_id, result, uri)
    return [task_result(run_id, name, cfg, result)
            for run_id, name, cfg, result in zip(run_ids, names, cfgs, results, strict=True)]


def train_kept(m: dict, cfg: TrainConfig, parent_run_id: str, experiment: str, tags: dict,
               uri: str | None) -> dict:
    """One member trained alone with its model kept: fine-tuned from ``init``, scored once
    on the test split (``test``: it trains without it), registered (``register``)."""
    data, name = dataset_for(cfg), m["name"]
    seen = without_test(data) if m.get("test") else data
    with runs.training_run(cfg, experiment, parent_run_id, name=name,
                           tags={**tags, "trained": "alone"}, uri=uri) as run_id:
        log = tracking.epoch_logger(run_id, uri)
        if m.get("init"):
            result = finetune_from(TransferConfig(**m["init"]["tc"]), m["init"]["strategy"], cfg,
                                   initial_model(m["init"], cfg), data, seen, keeps_model(m))
            for row in result.history.to_dict("records"):  # staged: logged once it ended
                log(row)
        else:
            result = train(cfg, seen, keep_model=True,
                           on_epoch=both(log, epoch_printer(name, cfg.epochs)))
        runs.record_result(run_id, result, uri)
        out = task_result(run_id, name, cfg, result)
        if m.get("test"):
            out.update(score_once(result.model, data, result.status))
            log_scored(run_id, out, int(result.history["epoch"].iloc[-1]), uri)
        if "register" in m:
            out["model_uri"] = None if m["register"] is None else register(
                run_id, cfg, result, data, out, m["register"], uri)
    return out


def initial_model(init: dict, cfg: TrainConfig) -> torch.nn.Module | None:
    """The registered model a fine-tuning starts from (None for scratch)."""
    if init["strategy"] == "scratch":
        return None
    return _registered(init["model_uri"], tracking.tracking_uri(),
                       str(resolve_device(cfg.device)))


@functools.lru_cache(maxsize=4)
def _registered(model_uri: str, store: str, device: str) -> torch.nn.Module:
    """Loaded once per process, store and device (a registered version never changes;
    fine-tuning works on transplant()'s deep copy, never on this one)."""
    return tracking.load_registered(model_uri, device, uri=store)


def log_scored(run_id: str, scored: dict, step: int, uri: str | None = None) -> None:
    """The finite test figures of one run at ``step`` (its last epoch); the tag ``test_set``
    says they were scored once, after training."""
    finite = {k: scored[k] for k in TEST_KEYS if math.isfinite(scored[k])}
    if finite:
        tracking.log_metrics(run_id, finite, step=step, uri=uri)
    tracking.set_tags(run_id, {"test_set": "scored once after training" if finite
                               else "not scored (diverged)"}, uri=uri)


def register(run_id: str, cfg: TrainConfig, result: TrainResult, data, figures: dict,
             registration: dict, uri: str | None = None) -> str | None:
    """Register ``result``'s model as ``registration`` (``lrpipe.experiments.registration``)
    with ``figures`` filled in; the ``models:/`` URI, None when it diverged (or the error
    ``registration["diverged"]`` names, raised: the run ends FAILED)."""
    if result.status == "diverged":
        if registration["diverged"]:
            raise ValueError(registration["diverged"].format(epoch=result.diverged_epoch))
        return None
    if registration["files"]:
        tracking.log_text(run_id, tracking.to_json(cfg.to_dict()), "final/config.json", uri=uri)
        spe = -(-len(data.train) // cfg.batch_size)
        tracking.log_table(run_id, preview(cfg.schedule, cfg.epochs, spe, cfg.optim.lr),
                           "final/rate_plan.csv", uri=uri)
    tags, description = filled(registration, figures)
    return tracking.register_model(
        run_id, result.model, registration["name"], cfg.hash(), model_cfg=cfg.model,
        input_shape=data.input_shape, num_classes=data.num_classes, tags=tags,
        description=description, uri=uri)


def finish(m: dict, cfg: TrainConfig, result: dict, uri: str | None) -> dict:
    """A member's result with its labels and, for ``extras``, its schedule extras logged."""
    result = {**result, **m.get("labels", {})}
    return log_extras(result, cfg, m["extras"], uri) if m.get("extras") else result


def log_extras(result: dict, cfg: TrainConfig, extras: dict, uri: str | None = None) -> dict:
    """A schedule run's extras: its total decay as a metric, its per-update rate curve
    (``schedules.preview``) as ``schedule/lr_per_step.csv``; returns ``result``.

    A reused run (a resumed comparison found it FINISHED) may have been killed between its
    end and its extras, so the curve is written again (the same file) and the total decay
    logged where it is missing. Its history, rebuilt from every metric of the run, loses
    ``total_decay`` (no epoch metric): the rows a fresh run returns.
    """
    history, planned = result["history"], extras.get("total_decay")
    logged = bool(history) and "total_decay" in history[0]
    if planned is not None and not logged:
        tracking.log_metrics(result["run_id"], {"total_decay": planned}, step=0, uri=uri)
    curve = preview(cfg.schedule, cfg.epochs, extras["updates_per_epoch"], cfg.optim.lr)
    tracking.log_table(result["run_id"], curve, "schedule/lr_per_step.csv", uri=uri)
    if not logged:
        return result
    return {**result, "history": [{k: v for k, v in row.items() if k != "total_decay"}
                                  for row in history]}
