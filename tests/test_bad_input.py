"""Bad input, table-driven, through the real entry points (flows.lr_sweep.run, flows.serve.run
and the ``lrpipe`` CLI): each gives an error naming the field (and what is allowed) before any
flow starts, and leaves no MLflow run behind."""

from __future__ import annotations

import math

import pytest

from flows import cli
from flows.commands import COMMANDS
from lrpipe import tracking
from lrpipe.engine.config import ConfigError
from lrpipe.engine.data import DataUnavailable

DIGITS = {"data.dataset": "digits", "data.val_size": 300, "model.hidden": [32],
          "batch_size": 64, "device": "cpu"}
BASE = {"lrs": [0.1], "epochs": 1, "workers": 1}


def with_overrides(**changes):
    return {"overrides": {**DIGITS, **changes}}


# (id, run() keyword changes, error type, pattern the message must match)
SWEEP_CASES = [
    ("lr-zero", {"lrs": [0.0]}, ConfigError, r"lrs: got 0\.0; allowed: .*> 0"),
    ("lr-negative", {"lrs": [0.1, -0.1]}, ConfigError, r"lrs: got -0\.1; allowed"),
    ("lr-nan", {"lrs": [math.nan]}, ConfigError, r"lrs: got nan; allowed: a finite"),
    ("lr-inf", {"lrs": [math.inf]}, ConfigError, r"lrs: got inf; allowed: a finite"),
    ("lr-string", {"lrs": ["fast"]}, ConfigError, r"lrs: got 'fast'; allowed"),
    ("lrs-not-a-list", {"lrs": "0.1"}, ConfigError, r"lrs: got '0\.1'; allowed: a non-empty"),
    ("lrs-empty", {"lrs": []}, ConfigError, r"lrs: got \[\]; allowed: a non-empty"),
    ("lrs-duplicate", {"lrs": [0.1, 0.1]}, ConfigError, r"lrs: .*allowed: distinct"),
    ("base-lr-negative", with_overrides(**{"optim.lr": -1}), ConfigError,
     r"optim\.lr: got -1; allowed"),
    ("epochs-zero", {"epochs": 0}, ConfigError, r"epochs: got 0; allowed: an integer >= 1"),
    ("epochs-string", {"epochs": "3"}, ConfigError, r"epochs: got '3'; allowed: an integer"),
    ("batch-larger-than-data", with_overrides(batch_size=5000), ConfigError,
     r"batch_size: got 5000; allowed: <= 1200"),
    ("unknown-optimizer", with_overrides(**{"optim.name": "lion"}), ConfigError,
     r"optim\.name: got 'lion'; allowed: sgd, momentum"),
    ("unknown-schedule", with_overrides(**{"schedule.name": "zigzag"}), ConfigError,
     r"schedule\.name: got 'zigzag'; allowed: constant"),
    ("unknown-model", with_overrides(**{"model.name": "resnet"}), ConfigError,
     r"model\.name: got 'resnet'; allowed: softmax, mlp, cnn"),
    ("unknown-dataset", with_overrides(**{"data.dataset": "cifar10"}), ConfigError,
     r"data\.dataset: got 'cifar10'; allowed: fashion_mnist"),
    ("unknown-layer-in-lr-mult", with_overrides(**{"optim.lr_mult": {"fc9": 2.0}}), ConfigError,
     r"optim\.lr_mult: unknown layer 'fc9'; allowed: fc1, head"),
    ("negative-lr-mult", with_overrides(**{"optim.lr_mult": {"head": -1.0}}), ConfigError,
     r"optim\.lr_mult\[head\]: got -1\.0; allowed"),
    ("rprop-weight-decay", with_overrides(**{"optim.name": "rprop", "optim.weight_decay": 0.1}),
     ConfigError, r"optim\.weight_decay: .*allowed: 0 for rprop"),
    ("unknown-config-field", with_overrides(**{"optim.foo": 1}), ConfigError,
     r"optim\.foo: got 'unknown field'; allowed: lr, lr_mult"),
    ("val-size-larger-than-data", with_overrides(**{"data.val_size": 5000}), ValueError,
     r"data\.val_size: got 5000; allowed: < 1500"),
    ("unknown-device", with_overrides(device="tpu"), ConfigError,
     r"device: got 'tpu'; allowed: auto, cpu"),
    ("unknown-runner", {"runner": "ray"}, ConfigError, r"runner: got 'ray'; allowed: threads"),
    ("zero-workers", {"workers": 0}, ConfigError, r"workers: got 0; allowed: an integer >= 1"),
]


def run_count(uri: str) -> int:
    c = tracking.client(uri)
    exps = [e.experiment_id for e in c.search_experiments(view_type=3)]
    return len(c.search_runs(exps, run_view_type=3, max_results=50000)) if exps else 0


class FlowMustNotStart:
    """Stands in for a flow: being called (or served) means validation let bad input through."""

    def __init__(self, real):
        self.fn, self.name = real.fn, real.name

    def with_options(self, **_):
        return self

    def __call__(self, *args, **kwargs):
        raise AssertionError("the flow started: a bad input passed validation")

    serve = __call__


@pytest.fixture
def guarded(mlflow_store, monkeypatch):
    """No flow or server may start; yields a function counting the runs in the store."""
    import flows.lr_sweep
    import flows.server

    monkeypatch.setattr(flows.lr_sweep, "lr_sweep", FlowMustNotStart(flows.lr_sweep.lr_sweep))

    def refuse(*_, **__):
        raise AssertionError("a server started: a bad input passed validation")

    monkeypatch.setattr(flows.server, "start", refuse)
    before = run_count(mlflow_store)
    yield
    assert run_count(mlflow_store) == before  # nothing recorded


@pytest.mark.parametrize("changes, error, pattern", [c[1:] for c in SWEEP_CASES],
                         ids=[c[0] for c in SWEEP_CASES])
def test_sweep_refuses_bad_settings(guarded, changes, error, pattern):
    from flows.commands import COMMANDS
    run = COMMANDS["sweep"].run

    settings = {**BASE, **with_overrides(), **changes}
    with pytest.raises(error, match=pattern):
        run(**settings)


def test_missing_data_folder_without_debian_files_or_download(guarded, tmp_path, monkeypatch):
    import torchvision

    import lrpipe.engine.data
    from flows.commands import COMMANDS
    run = COMMANDS["sweep"].run

    def offline(self):
        raise RuntimeError("no network")

    monkeypatch.setattr(lrpipe.engine.data, "prepare_fashion_mnist", lambda root: None)
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", offline)
    overrides = {**DIGITS, "data.dataset": "fashion_mnist", "data.root": str(tmp_path / "none")}
    with pytest.raises(DataUnavailable, match=r"data\.dataset='fashion_mnist': not found under"):
        run(**{**BASE, "overrides": overrides})


@pytest.mark.parametrize("uri, pattern", [
    ("mlruns", r"tracking_uri: got 'mlruns'; allowed: sqlite:///"),
    ("sqlite:/relative.db", r"tracking_uri: got 'sqlite:/relative.db'; allowed"),
    ("ftp://host/store", r"tracking_uri: got 'ftp://host/store'; allowed"),
], ids=["bare-folder", "sqlite-two-slashes", "unknown-scheme"])
def test_malformed_tracking_uri(guarded, monkeypatch, uri, pattern):
    from flows.commands import COMMANDS
    run = COMMANDS["sweep"].run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(tracking.TrackingError, match=pattern):
        run(**BASE, **with_overrides())


def test_unwritable_mlruns(guarded, monkeypatch, tmp_path):
    from flows.commands import COMMANDS
    run = COMMANDS["sweep"].run

    blocker = tmp_path / "file-not-folder"  # unwritable even for root: a file in the way
    blocker.write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker / 'mlruns' / 'mlflow.db'}")
    with pytest.raises(tracking.TrackingError, match=r"tracking_uri: cannot create"):
        run(**BASE, **with_overrides())


SCHEDULE_CASES = [
    ("cron-minute-61", {"cron": "61 * * * *"}, r"cron: got '61 \* \* \* \*'; allowed: five"),
    ("cron-words", {"cron": "every night"}, r"cron: got 'every night'; allowed: five"),
    ("cron-four-fields", {"cron": "0 3 * *"}, r"cron: got '0 3 \* \*'; allowed: five"),
    ("cron-and-interval", {"cron": "0 3 * * *", "interval": 60}, r"cron: .*allowed: one of"),
    ("interval-negative", {"interval": -5}, r"interval: got -5; allowed: a finite number > 0"),
    ("interval-zero", {"interval": 0}, r"interval: got 0; allowed"),
    ("schedule-bad-lr", {"interval": 60, "lrs": [0.0]}, r"lrs: got 0\.0; allowed"),
    ("schedule-unknown-flow", {"flow": "nightly"}, r"flow: got 'nightly'; allowed:"),
]


@pytest.mark.parametrize("changes, pattern", [c[1:] for c in SCHEDULE_CASES],
                         ids=[c[0] for c in SCHEDULE_CASES])
def test_schedule_refuses_bad_settings(guarded, changes, pattern):
    from flows.commands import COMMANDS
    run = COMMANDS["schedule"].run

    settings = {"flow": "sweep", "epochs": 1, "overrides": DIGITS, **changes}
    with pytest.raises(ConfigError, match=pattern):
        run(**settings)


def test_min_rate_above_max_rate():
    """Range-test rates: the search command does not take them (they are fixed constants,
    lrpipe.search.plan.RANGE_OPTS: giving one is an error naming it); the library check every
    range test goes through refuses a ramp that goes down."""
    with pytest.raises(ConfigError,
                       match=r"max_lr: not a setting of `lrpipe search`; allowed: subset"):
        COMMANDS["search"].run(min_lr=1.0, max_lr=1e-3, overrides=DIGITS)
    from lrpipe.search.rangetest import ramp

    with pytest.raises(ConfigError, match=r"max_lr: got 0\.001; allowed: a finite number > 1"):
        ramp(1.0, 1e-3, 10)


# The CLI: the same checks, a one-line message on stderr and exit status 2.
CLI_BASE = ["--lrs", "0.1", "--epochs", "1", "--workers", "1", "--set", "data.dataset=digits",
            "--set", "data.val_size=300", "--set", "model.hidden=[32]", "--set", "batch_size=64",
            "--set", "device=cpu"]
CLI_CASES = [
    ("lr-zero", ["sweep", *CLI_BASE, "--lrs", "0"], "lrs: got 0.0"),
    ("lr-negative", ["sweep", *CLI_BASE, "--lrs=-1,0.1"], "lrs: got -1.0"),
    ("lr-nan", ["sweep", *CLI_BASE, "--lrs", "nan"], "lrs: got nan"),
    ("lr-inf", ["sweep", *CLI_BASE, "--lrs", "inf"], "lrs: got inf"),
    ("lr-string", ["sweep", *CLI_BASE, "--lrs", "fast"], "lrs: got 'fast'"),
    ("epochs-zero", ["sweep", *CLI_BASE, "--epochs", "0"], "epochs: got 0"),
    ("batch-larger-than-data", ["sweep", *CLI_BASE, "--set", "batch_size=5000"],
     "batch_size: got 5000"),
    ("unknown-optimizer", ["sweep", *CLI_BASE, "--set", "optim.name=lion"], "optim.name"),
    ("unknown-schedule", ["sweep", *CLI_BASE, "--set", "schedule.name=zigzag"], "schedule.name"),
    ("unknown-model", ["sweep", *CLI_BASE, "--set", "model.name=resnet"], "model.name"),
    ("unknown-dataset", ["sweep", *CLI_BASE, "--set", "data.dataset=cifar10"], "data.dataset"),
    ("unknown-layer", ["sweep", *CLI_BASE, "--set", "optim.lr_mult={fc9: 2}"],
     "optim.lr_mult: unknown layer 'fc9'; allowed: fc1, head"),
    ("unknown-runner", ["sweep", *CLI_BASE, "--runner", "ray"], "runner: got 'ray'"),
    ("zero-workers", ["sweep", *CLI_BASE, "--workers", "0"], "workers: got 0"),
    ("malformed-cron", ["schedule", "--flow", "sweep", "--cron", "61 * * * *"], "cron: got"),
    ("negative-interval", ["schedule", "--flow", "sweep", "--interval=-5"], "interval: got -5"),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in CLI_CASES],
                         ids=[c[0] for c in CLI_CASES])
def test_cli_exits_2_naming_the_field(guarded, capsys, argv, message):
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own refusals exit 2 too
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and ("allowed" in err or "invalid" in err)


def test_cli_malformed_tracking_uri_exits_2(guarded, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "mlruns")
    assert cli.main(["sweep", *CLI_BASE]) == 2
    assert "tracking_uri: got 'mlruns'" in capsys.readouterr().err
