"""A run's lifecycle: every run ends, FINISHED, KILLED or FAILED, and training runs are children.

``ending`` ends a run as its block ends, whatever happened in it (a stopped training: KILLED)
and keeps the runs still open in this process, so that a command giving up after Ctrl-C can
end them (``end_open_runs``). ``training_run`` is the child run of one training, and
``watch_children`` remembers the children a new sweep finishes here, so resume needs no
search. Every MLflow call goes through ``lrpipe.tracking``, the one mlflow importer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from lrpipe.engine.config import TrainConfig, flatten
from lrpipe.engine.loop import Stopped, stop_requested
from lrpipe.tracking import end_run, set_tags, start_run


@contextmanager
def ending(run_id: str, uri: str | None = None) -> Iterator[str]:
    """End ``run_id`` as the block ends: FINISHED; KILLED when it was stopped (the engine's
    ``Stopped``, KeyboardInterrupt, or any error after a stop was requested: a stopping
    command's services may go first); FAILED on any other exception, which is re-raised. No
    run is left RUNNING by the body."""
    _OPEN[run_id] = uri
    try:
        yield run_id
    except (Stopped, KeyboardInterrupt):
        _end_open(run_id, "KILLED")
        raise
    except BaseException as exc:
        if not stop_requested():
            _note_failure(run_id, exc)
        _end_open(run_id, "KILLED" if stop_requested() else "FAILED")
        raise
    _end_open(run_id, "FINISHED")


FAILURE_TAG = "lrpipe.failure"  # on a FAILED run: the error that ended it, in one line


def _note_failure(run_id: str, exc: BaseException) -> None:
    """Tag ``run_id`` with why it failed; a store that is itself what failed is let be."""
    try:
        set_tags(run_id, {FAILURE_TAG: f"{type(exc).__name__}: {exc}"[:500]}, uri=_OPEN.get(run_id))
    except Exception:  # noqa: BLE001 - the reason is a courtesy; ending the run is not
        pass


# Runs this process has open through ``ending``: run id -> store. A command that gives up
# waiting for its flow after Ctrl-C ends what is still open (``end_open_runs``).
_OPEN: dict[str, str | None] = {}


def _end_open(run_id: str, status: str) -> None:
    if run_id in _OPEN:
        end_run(run_id, status, uri=_OPEN.pop(run_id))


def end_open_runs(status: str = "KILLED") -> list[str]:
    """End every run still open in this process's ``ending`` blocks with ``status``."""
    ended = list(_OPEN)
    for run_id in ended:
        _end_open(run_id, status)
    return ended


def training_run_name(cfg: TrainConfig, prefix: str = "") -> str:
    """``lr=0.1 sgd mlp seed=0``: a name that says what the run is, the same in every flow."""
    return f"{prefix}lr={cfg.optim.lr:g} {cfg.optim.name} {cfg.model.name} seed={cfg.seed}"


@contextmanager
def training_run(
    cfg: TrainConfig,
    experiment: str,
    parent_run_id: str | None,
    *,
    name: str | None = None,
    tags: Mapping[str, str] | None = None,
    uri: str | None = None,
) -> Iterator[str]:
    """A child run for one training: params = flattened config, tag ``config_hash``.

    Yields the run id. Ends FINISHED on success, KILLED when the training was stopped
    (``Stopped``, KeyboardInterrupt) and FAILED on any other exception (re-raised), so no run is
    left RUNNING by an error in the body.
    """
    run_id = start_run(
        experiment, name or training_run_name(cfg), params=flatten(cfg),
        tags={"config_hash": cfg.hash(), **(tags or {})}, parent_run_id=parent_run_id, uri=uri,
    )
    with ending(run_id, uri):
        yield run_id
    if (here := children_finished_here(parent_run_id)) is not None:
        here[cfg.hash()] = run_id


# Parents whose children only this process finishes (lrpipe.resume.open_sweep watches the new
# sweeps it starts): config hash -> child run id, filled by training_run. Keyed by pid as
# well: a forked process inherits a copy it must not trust.
_CHILDREN_HERE: dict[tuple[int, str], dict[str, str]] = {}


def watch_children(parent_run_id: str, watch: bool = True) -> None:
    """Start (or, with ``watch`` False, stop) remembering the children that training_run
    finishes under ``parent_run_id`` in this process."""
    if watch:
        _CHILDREN_HERE[os.getpid(), parent_run_id] = {}
    else:
        _CHILDREN_HERE.pop((os.getpid(), parent_run_id), None)


def children_finished_here(parent_run_id: str | None) -> dict[str, str] | None:
    """config hash -> run id of the children finished under a watched parent; None if this
    process does not watch it."""
    return _CHILDREN_HERE.get((os.getpid(), parent_run_id))


STATUS_NOTES = {
    "ok": "trained to its last epoch",
    "diverged": "DIVERGED in epoch {epoch}: stopped, its curves end at the last finite epoch",
    "no_progress": "NO PROGRESS: trained to its last epoch but ended near its initial loss "
                   "(chance level)",
}


def record_result(run_id: str, result, uri: str | None = None) -> None:
    """What a finished training says of itself, logged the same way by every flow: the tags
    ``status`` (ok | diverged | no_progress), ``device`` and ``diverged_epoch`` (empty when it
    did not), NaN losses at the epoch it blew up, its step log (``train_loss_step``, when
    ``log_every`` kept one), and the run's description in MLflow's UI saying the same."""
    from lrpipe import tracking

    status, epoch = result.status, result.diverged_epoch
    tracking.set_tags(run_id, {
        "status": status, "device": result.device,
        "diverged_epoch": "" if epoch is None else epoch,
        "mlflow.note.content": STATUS_NOTES.get(status, status).format(epoch=epoch)}, uri=uri)
    if status == "diverged":
        tracking.log_divergence(run_id, epoch, uri=uri)
    if len(result.step_log):
        tracking.log_step_losses(run_id, result.step_log, uri=uri)
