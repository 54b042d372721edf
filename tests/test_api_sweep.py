"""``lrpipe.sweep``: the learning-rate grid on a user's model, recorded as ``lrpipe sweep``.

1. End to end on an MLP and scikit-learn's digits, fed tensors and fed DataLoaders: three
   rates (50.0 diverges), two epochs: one parent, one FINISHED child per rate with its params,
   per-epoch metrics at steps 0..2 equal to the History (NaN where it blew up, status tag
   diverged), figures, summary.csv and report.md on the parent; summary and best_lr right;
   torch's and the loader's generators untouched, and a shuffling loader repeats exactly.
2. workers=2 gives workers=1's numbers on tensors, and leaves torch's threads as they were.
3. Bad input: a one-line error naming the argument before any run exists.
4. A loss that raises midway: the error propagates, no run is left RUNNING.
5. Seeds: the per-rate table and the figures' curves are means over seeds (hand-made table).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lrpipe
from lrpipe.api.sweep import rate_summary, seed_mean

torch.set_num_threads(1)
RATES = [0.05, 0.5, 50.0]  # 50.0 blows up in the first epoch


def build(seed: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def data(digits32):
    """(train, val) as (x, y) tensors: 1200 and 300 digits."""
    return ((digits32.train.x, digits32.train.y), (digits32.val.x, digits32.val.y))


def as_loaders(data):
    (xt, yt), (xv, yv) = data
    return (DataLoader(TensorDataset(xt, yt), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(7)),
            DataLoader(TensorDataset(xv, yv), batch_size=100))


def runs_of(experiment: str) -> list:
    from lrpipe import tracking

    exp = tracking.client().get_experiment_by_name(experiment)
    return [] if exp is None else tracking.client().search_runs([exp.experiment_id])


# 1. End to end ---------------------------------------------------------------------------

def check_child(client, run, parent_id: str, history: pd.DataFrame) -> None:
    """Params, status tags and every per-epoch metric of one child equal its History rows."""
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent_id
    lr, seed = float(run.data.params["optim.lr"]), int(run.data.params["seed"])
    assert run.data.params["epochs"] == "2" and run.data.params["optim.name"] == "SGD"
    rows = history[(history["lr"] == lr) & (history["seed"] == seed)]
    assert list(rows["run_id"].unique()) == [run.info.run_id]
    status = rows["status"].iloc[0]
    assert run.data.tags["status"] == status
    for name in ("train_loss", "val_loss", "train_error", "val_error"):
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        for epoch, value in zip(rows["epoch"], rows[name], strict=True):
            assert logged.pop(int(epoch)) == pytest.approx(value, rel=1e-12)
        if status == "ok":
            assert logged == {} and set(rows["epoch"]) == {0, 1, 2}
        elif name.endswith("loss"):  # NaN at the epoch that blew up
            at = int(run.data.tags["diverged_epoch"])
            assert list(logged) == [at] and math.isnan(logged[at])
    if status == "diverged":
        assert run.data.metrics["diverged"] == 1.0


@pytest.mark.parametrize("kind", ["tensors", "dataloader"])
def test_sweep_records_a_parent_and_a_child_per_rate(mlflow_store, data, kind):
    from lrpipe import tracking

    train, val = data if kind == "tensors" else as_loaders(data)
    experiment, rng_before = f"api-sweep-{kind}", torch.get_rng_state()
    gen_before = None if kind == "tensors" else train.generator.get_state()
    result = lrpipe.sweep(build, train, val, F.cross_entropy, lrs=RATES[::-1], epochs=2,
                          batch_size=64 if kind == "tensors" else None, experiment=experiment)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's streams untouched
    if gen_before is not None:
        assert torch.equal(train.generator.get_state(), gen_before)

    summary, client = result.summary, tracking.client()
    assert list(summary["lr"]) == RATES and list(summary["status"]) == ["ok", "ok", "diverged"]
    assert summary["diverged_epoch"].iloc[2] == 1
    assert summary["diverged_epoch"].iloc[:2].isna().all()
    ok = summary[summary["status"] == "ok"]
    assert result.best_lr == ok.loc[ok["val_loss"].idxmin(), "lr"] == 0.5
    last = result.history.groupby("lr").tail(1).set_index("lr")
    assert np.allclose(summary["val_loss"], last.loc[RATES, "val_loss"], rtol=0)

    runs = runs_of(experiment)
    assert {r.info.status for r in runs} == {"FINISHED"} and len(runs) == 4
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.run_id == result.parent_run_id
    children = [r for r in runs if r is not parent]
    assert sorted(r.info.run_id for r in children) == sorted(summary["run_id"])
    for child in children:
        check_child(client, child, parent.info.run_id, result.history)

    assert parent.data.metrics["best_lr"] == 0.5
    files = {f.path for f in client.list_artifacts(parent.info.run_id, "figures")}
    assert files == {f"figures/{n}.png" for n in ("loss_vs_epoch", "error_vs_epoch",
                                                   "final_vs_lr", "gap_vs_epoch")}
    report = tracking.read_text(parent.info.run_id, "report.md")
    assert "**Use lr=0.5: the lowest validation loss of 3 rates.**" in report
    assert "1 of 3 rates diverged (lr=50)" in report
    assert tracking.read_text(parent.info.run_id, "summary.csv").count("\n") == 4
    figures = result.figures()
    assert all(isinstance(f, Figure) for f in figures.values()) and len(figures) == 4
    if kind == "dataloader":  # a shuffling loader repeats exactly with workers=1
        again = lrpipe.sweep(build, train, val, F.cross_entropy, lrs=RATES, epochs=2,
                             track=False)
        pd.testing.assert_frame_equal(again.summary.drop(columns="run_id"),
                                      summary.drop(columns="run_id"), check_exact=True)


# 2. Threads --------------------------------------------------------------------------------

def test_two_workers_give_one_workers_numbers_on_tensors(data):
    threads = torch.get_num_threads()
    one = lrpipe.sweep(build, *data, F.cross_entropy, lrs=RATES, epochs=2, seeds=2,
                       track=False)
    two = lrpipe.sweep(build, *data, F.cross_entropy, lrs=RATES, epochs=2, seeds=2,
                       workers=2, track=False)
    assert torch.get_num_threads() == threads
    assert len(two.summary) == 6 and one.best_lr == two.best_lr
    # Bit for bit here (one torch thread per training either way); with other thread counts
    # a float reduction may round differently, hence the tolerance.
    pd.testing.assert_frame_equal(one.summary, two.summary, check_exact=False, rtol=1e-6)
    pd.testing.assert_frame_equal(one.history.drop(columns="time_s"),
                                  two.history.drop(columns="time_s"), check_exact=False,
                                  rtol=1e-6)


# 3. Bad input ------------------------------------------------------------------------------

def wrong_width(seed: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(10, 10))


BAD = {
    "no rates": ({"lrs": []}, "lrs: got \\[\\]"),
    "negative rate": ({"lrs": [0.1, -1.0]}, "lrs: got -1.0"),
    "same rate twice": ({"lrs": [0.1, 0.1]}, "lrs: got \\[0.1, 0.1\\]; allowed: distinct"),
    "rates as text": ({"lrs": "0.1,1"}, "lrs: got '0.1,1'"),
    "no epochs": ({"epochs": 0}, "epochs: got 0"),
    "no workers": ({"workers": 0}, "workers: got 0"),
    "seeds": ({"seeds": [0, 0]}, "seeds: got \\[0, 0\\]"),
    "batch_size": ({"batch_size": 0}, "batch_size: got 0"),
    "diverge_factor": ({"diverge_factor": 1.0}, "diverge_factor: got 1.0"),
    "experiment": ({"experiment": " "}, "experiment: got ' '"),
    "track": ({"track": "yes"}, "track: got 'yes'"),
    "loss_fn": ({"loss_fn": "mse"}, "loss_fn: got a str"),
    "loss_fn output": ({"loss_fn": lambda o, y: F.cross_entropy(o, y, reduction="none")},
                       "loss_fn: returned a tensor of shape \\(64,\\)"),
    "loss_fn fails": ({"loss_fn": lambda o, y: o[:, 20].mean()},
                      "loss_fn: fails on the model's output \\(a tensor of shape \\(64, 10\\)\\)"),
    "model_fn": ({"model_fn": lambda seed: 3}, "model_fn\\(seed\\): got an int"),
    "model width": ({"model_fn": wrong_width}, "model_fn: its model fails on a batch of "
                    "train \\(x a tensor of shape \\(64, 1, 8, 8\\)\\): RuntimeError"),
    "optimizer_fn": ({"optimizer_fn": lambda m: "sgd"}, "optimizer: got a str"),
    "train": ({"train": iter([])}, "train: got a one-shot iterator"),
    "val": ({"val": 3}, "val: got an int"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_naming_it_before_any_run(mlflow_store, data, case):
    kwargs, message = BAD[case]
    args = {"model_fn": build, "train": data[0], "val": data[1], "loss_fn": F.cross_entropy,
            "lrs": RATES, "epochs": 2, "experiment": "api-sweep-bad", **kwargs}
    with pytest.raises(ValueError, match=f"^{message}") as err:
        lrpipe.sweep(**args)
    assert "\n" not in str(err.value)
    assert runs_of("api-sweep-bad") == []


# 4. A failing training --------------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_a_loss_that_raises_midway_leaves_no_run_running(mlflow_store, data, workers):
    calls = itertools.count()

    def flaky(output, y):
        if next(calls) == 40:  # in the first epoch of the first trainings
            raise RuntimeError("loss server went away")
        return F.cross_entropy(output, y)

    experiment = f"api-sweep-fails-{workers}"
    with pytest.raises(RuntimeError, match="loss server went away"):
        lrpipe.sweep(build, *data, flaky, lrs=RATES, epochs=2, workers=workers,
                     experiment=experiment)
    runs = runs_of(experiment)
    statuses = {r.info.run_name: r.info.status for r in runs}
    assert "RUNNING" not in statuses.values()
    assert statuses["sweep SGD Sequential 3 rates"] == "FAILED"
    assert list(statuses.values()).count("FAILED") == 2  # the parent and one training
    assert len(runs) <= 1 + workers  # trainings not started when it failed record nothing


# 5. Seeds: per-rate means, hand-made -------------------------------------------------------

def test_rates_and_curves_are_means_over_seeds():
    history = pd.DataFrame({
        "lr": [0.1] * 4 + [1.0] * 3, "seed": [0, 0, 1, 1, 0, 0, 1],
        "epoch": [0, 1, 0, 1, 0, 1, 0],
        "train_loss": [2.0, 1.0, 4.0, 3.0, 2.0, 5.0, 2.0],
        "val_loss": [2.0, 1.5, 4.0, 2.5, 2.0, 6.0, 2.0],
        "train_error": [0.9, 0.5, 0.7, 0.3, 0.9, 0.8, 0.9],
        "val_error": [0.9, 0.6, 0.7, 0.4, 0.9, 0.8, 0.9],
        "status": ["ok"] * 4 + ["ok", "ok", "diverged"],
        "diverged_epoch": pd.array([None] * 6 + [1], dtype="Int64")})
    curves = seed_mean(history)
    assert list(zip(curves["lr"], curves["epoch"], strict=True)) == [(0.1, 0), (0.1, 1), (1.0, 0)]
    assert list(curves["val_loss"]) == [3.0, 2.0, 2.0]  # lr=1.0 ends where seed 1 blew up
    assert list(curves["status"]) == ["ok", "ok", "diverged"]
    summary = pd.DataFrame({"lr": [0.1, 0.1, 1.0, 1.0], "seed": [0, 1, 0, 1],
                            "status": ["ok", "ok", "ok", "diverged"],
                            "val_loss": [1.5, 2.5, 6.0, 2.0], "val_error": [0.6, 0.4, 0.8, 0.9],
                            "best_val_error": [0.6, 0.4, 0.8, 0.9],
                            "diverged_epoch": pd.array([None, None, None, 1], dtype="Int64"),
                            "run_id": ["a", "b", "c", "d"]})
    by_rate = rate_summary(summary)
    assert list(by_rate["status"]) == ["ok", "diverged"]
    assert list(by_rate["val_loss"]) == [2.0, 4.0] and list(by_rate["seeds"]) == [2, 2]
    assert list(by_rate["run_id"]) == ["a", "c"] and by_rate["diverged_epoch"].iloc[1] == 1
