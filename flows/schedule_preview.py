"""``lrpipe schedules``: every default decay schedule's rate against epoch, without training.

Also the planning shared with ``flows.decay_compare`` (which schedules, at which rate, over how
many updates, and how far each one decays), so the preview shows exactly what
``lrpipe decay`` would run. A plain function, not a Prefect flow: there is nothing to fan out,
and starting Prefect's temporary API server would cost more than the preview itself.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pandas as pd

from flows.common import dataset_for
from flows.harness import flow_parent
from lrpipe import tracking
from lrpipe.engine.config import (
    ConfigError,
    ScheduleConfig,
    TrainConfig,
    check_number,
    is_plugin,
    merge,
)
from lrpipe.engine.schedules import decay_warning, plateau_max_decay, total_decay
from lrpipe.experiments import decay
from lrpipe.search.plan import SEARCHED_TAG, describe_searched, search_command, searched_identity

EXPERIMENT = "lr-decay"
SEARCH_EXPERIMENT = "lr-search"
FALLBACK_LR = 0.1  # the MLP's best SGD rate on Fashion-MNIST in the lr-sweep
DEFAULT_EPOCHS = 8
DEFAULT_FINAL_DECAY = 100.0  # peak/last rate: the usual ~100x target
# 27 runs (9 schedules x 3 seeds) + 3 squared-error runs of 8 epochs on a 20,000-example
# training subset: about 0.85 s of CPU per epoch, so ~2 minutes on 2 quiet cores.
DEFAULT_SUBSET = 20_000
DEFAULT_OUT = "out/schedules.png"


def check_names(field: str, names, allowed) -> list[str]:
    """``names`` as a list, each one of ``allowed`` and distinct; else ConfigError naming
    ``field`` and the allowed names."""
    allowed_text = ", ".join(allowed)
    if isinstance(names, str) or not hasattr(names, "__iter__") or len(names) == 0:
        raise ConfigError(f"{field}: got {names!r}; allowed: a non-empty list of {allowed_text}")
    bad = [n for n in names if n not in allowed]
    if bad or len(set(names)) != len(names):
        raise ConfigError(f"{field}: got {list(names)}; allowed: distinct names among "
                          f"{allowed_text}")
    return list(names)


def base_config(epochs: int, overrides: dict | None) -> TrainConfig:
    """Default config + ``overrides``; Fashion-MNIST/MNIST train on ``DEFAULT_SUBSET`` examples
    unless the overrides say otherwise (``data.subset``, or a whole ``data`` section); digits
    and a plug-in loader's data (``--data``) train on all of theirs."""
    overrides = dict(overrides or {})
    cfg = merge(TrainConfig(), {"epochs": epochs, **overrides})
    if ("data.subset" in overrides or "data" in overrides or cfg.data.dataset == "digits"
            or is_plugin(cfg.data.dataset)):
        return cfg
    return merge(cfg, {"data.subset": DEFAULT_SUBSET})


def select_schedules(names, final_decay: float, epochs: int) -> dict[str, ScheduleConfig]:
    """The named entries of ``decay.default_schedules`` (all when ``names`` is None)."""
    check_number("final_decay", final_decay, low=1.0)
    try:
        available = decay.default_schedules(final_decay=final_decay, epochs=epochs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    chosen = list(available) if names is None else check_names("schedules", names, available)
    return {name: available[name] for name in chosen}


def steps_per_epoch(cfg: TrainConfig, load: bool = True) -> int:
    """Updates per epoch of ``cfg``. Loads the dataset (once per process), which also checks
    the split sizes; with ``load=False`` a plain ``data.subset`` is taken at its word."""
    d = cfg.data
    if not load and d.subset is not None and d.classes is None and d.per_class is None:
        n = d.subset
    else:
        n = len(dataset_for(cfg).train)
    if cfg.batch_size > n:
        raise ConfigError(f"batch_size: got {cfg.batch_size}; allowed: <= {n} (training examples)")
    return -(-n // cfg.batch_size)


def decay_table(schedules: dict[str, ScheduleConfig], epochs: int, spe: int) -> pd.DataFrame:
    """Per schedule: total_decay (peak/last, NaN for plateau), max_decay (plateau: the most it
    can reach) and the decay warning ('' when it decays >= 10x). Raises ConfigError when a
    schedule does not fit the budget."""
    rows = []
    for name, cfg in schedules.items():
        planned = total_decay(cfg, epochs, spe)
        most = plateau_max_decay(cfg, epochs, spe) if planned is None else planned
        rows.append({"schedule": name, "total_decay": math.nan if planned is None else planned,
                     "max_decay": most, "warning": decay_warning(cfg, epochs, spe) or ""})
    return pd.DataFrame(rows)


def latest_chosen_lr(experiment: str = SEARCH_EXPERIMENT,
                     identity: str | None = None) -> tuple[float, str] | None:
    """The ``chosen_lr`` (metric, else tag) of the newest finished parent run of ``experiment``
    whose ``searched_identity`` tag is ``identity`` (any parent when None), and that run's id;
    None when there is none."""
    c = tracking.client()
    exp = tracking.retry_locked(c.get_experiment_by_name, experiment)
    if exp is None:
        return None
    runs = tracking.retry_locked(c.search_runs, [exp.experiment_id],
                                 "attributes.status = 'FINISHED'", max_results=200,
                                 order_by=["attributes.start_time DESC"])
    for run in runs:
        if tracking.PARENT_TAG in run.data.tags:
            continue
        if identity is not None and run.data.tags.get(SEARCHED_TAG) != identity:
            continue
        value = run.data.metrics.get("chosen_lr", run.data.tags.get("chosen_lr"))
        try:
            lr = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(lr) and lr > 0:
            return lr, run.info.run_id
    return None


def resolve_lr(lr: float | None, base: TrainConfig, overrides: dict | None = None, *,
               required: bool = True) -> tuple[float, str]:
    """(rate, where it came from): ``lr`` if given, else the newest ``lr-search`` choice made
    for ``base``'s searched part (``lrpipe.search.plan.searched_identity``: same dataset,
    model, optimizer, loss and batch size). With none, a ConfigError saying which search to
    run; or, when not ``required`` (a preview that trains nothing), ``FALLBACK_LR`` labelled
    as not searched."""
    if lr is not None:
        check_number("lr", lr, low=0.0, low_open=True)
        return float(lr), "given"
    found = latest_chosen_lr(identity=searched_identity(base))
    if found is not None:
        return found[0], f"{SEARCH_EXPERIMENT} run {found[1]} ({describe_searched(base)})"
    if not required:
        return FALLBACK_LR, (f"fallback, not searched: no {SEARCH_EXPERIMENT} run for "
                             f"{describe_searched(base)}")
    raise ConfigError(f"lr: no finished {SEARCH_EXPERIMENT} run searched "
                      f"{describe_searched(base)}; run `{search_command(base, overrides)}` "
                      f"first, or give the rate (--lr)")


def preview_schedules(epochs: int = DEFAULT_EPOCHS, schedules=None,
                      final_decay: float = DEFAULT_FINAL_DECAY, lr: float | None = None,
                      out: str = DEFAULT_OUT, overrides: dict | None = None,
                      experiment: str = EXPERIMENT) -> dict:
    """Draw every schedule's per-update rate, save it to ``out`` and log it to MLflow.

    Returns:
        {"path", "run_id", "lr", "decays"}: the PNG written, the run "schedule preview" of
        ``experiment`` (figure ``figures/schedules.png``, table ``total_decay.csv``, metrics
        ``total_decay/<schedule>``), the base rate drawn and the decay table records.
    Raises:
        ConfigError: a bad name, number or budget, before anything is written.
    """
    base = base_config(epochs, overrides)
    selected = select_schedules(schedules, final_decay, base.epochs)
    rate, source = resolve_lr(lr, base, overrides, required=False)
    spe = steps_per_epoch(base, load=False)  # the preview needs no images
    table = decay_table(selected, base.epochs, spe)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    from lrpipe.plots import decay as decay_plots  # drawing libraries load here, when drawn

    fig = decay_plots.plot_schedules(decay.schedule_previews(selected, base.epochs, spe, rate))
    fig.savefig(path, dpi=100)
    with flow_parent("schedule-preview", experiment, "schedule preview", params={
        "lr": rate, "lr_source": source, "epochs": base.epochs, "final_decay": final_decay,
        "steps_per_epoch": spe, "schedules": list(selected), "out": str(path.resolve())}) as run_id:
        tracking.log_metrics(run_id, {f"total_decay/{r.schedule}": r.total_decay
                                      for r in table.itertuples()
                                      if not math.isnan(r.total_decay)}, step=0)
        tracking.log_table(run_id, table, "total_decay.csv")
        tracking.log_figure(run_id, fig, "schedules")
    return {"path": str(path), "run_id": run_id, "lr": rate, "lr_source": source,
            "epochs": base.epochs, "steps_per_epoch": spe, "decays": table.to_dict("records")}


def print_table(table: pd.DataFrame) -> None:
    """The decay table, then one warning line per schedule decaying < 10x."""
    print(table[["schedule", "total_decay", "max_decay"]].to_string(
        index=False, float_format="%.4g"))
    for warning in table["warning"]:
        if warning:
            print(f"warning: {warning}", flush=True)


def check(epochs=DEFAULT_EPOCHS, schedules=None, final_decay=DEFAULT_FINAL_DECAY, lr=None,
          out=DEFAULT_OUT, overrides=None, experiment=EXPERIMENT) -> tuple[dict, list]:
    """The preview's settings checked (names, budget, rate), before anything is written."""
    base = base_config(epochs, overrides)
    select_schedules(schedules, final_decay, base.epochs)
    if lr is not None:
        check_number("lr", lr, low=0.0, low_open=True)
    steps_per_epoch(base, load=False)
    return {"epochs": epochs, "schedules": schedules, "final_decay": final_decay, "lr": lr,
            "out": out, "overrides": overrides, "experiment": experiment}, []


def preview(epochs=DEFAULT_EPOCHS, schedules=None, final_decay=DEFAULT_FINAL_DECAY, lr=None,
            out=DEFAULT_OUT, overrides=None, runner="threads", workers=None,
            experiment=EXPERIMENT) -> dict:
    """Preview, print the decay table and where the figure went. ``runner`` and ``workers``
    (common to every command) are accepted and unused: nothing is fanned out."""
    del runner, workers
    start = time.perf_counter()
    result = preview_schedules(epochs, schedules, final_decay, lr, out, overrides, experiment)
    print(f"schedule preview: lr={result['lr']:g} ({result['lr_source']}), "
          f"{result['epochs']} epochs x {result['steps_per_epoch']} updates")
    print_table(pd.DataFrame(result["decays"]))
    print(f"Figure: {Path(result['path']).resolve()}  ({time.perf_counter() - start:.1f} s)")
    print(f"MLflow: {tracking.run_url(result['run_id'], experiment)}  "
          "(start the UI with `make ui`)")
    return result


if __name__ == "__main__":
    preview()
