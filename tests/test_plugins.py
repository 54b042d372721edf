"""Your model and your data through the flows: ``--model package.module:factory`` and
``--data package.module:loader`` (lrpipe.engine.plugins), checked before anything is recorded,
and the whole pipeline run on examples/digits_cnn.py from the command line."""

import subprocess
import sys
import types

import pytest
import torch
import yaml
from killing import ROOT, all_runs, by_status
from torch import nn

from flows import cli
from lrpipe import tracking
from lrpipe.engine.config import ConfigError, DataConfig, ModelConfig, TrainConfig, merge
from lrpipe.engine.data import load_data
from lrpipe.engine.models import make_model

CNN, LOAD = "examples.digits_cnn:build", "examples.digits_cnn:load"
DATA, MODEL = r"data\.dataset \(--data\): ", r"model\.name \(--model\): "  # field and flag


@pytest.fixture
def fake_plugins(monkeypatch):
    """A module ``fake_plugins`` holding good and bad factories and loaders."""
    module = types.ModuleType("fake_plugins")
    x = torch.randn(60, 1, 8, 8)
    y = torch.arange(60) % 3
    module.good_data = lambda: ((x[:50], y[:50]), (x[50:], y[50:]))
    module.loader_data = lambda: (
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:50], y[:50]),
                                    batch_size=16), (x[50:], y[50:]))
    module.one_split = lambda: (x, y, x)
    module.float_labels = lambda: ((x[:50], y[:50].float()), (x[50:], y[50:]))
    module.good_model = lambda seed: nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    module.wrong_width = lambda seed: nn.Sequential(nn.Flatten(), nn.Linear(64, 7))
    module.not_a_model = lambda seed: "model"
    module.not_callable = 3
    monkeypatch.setitem(sys.modules, "fake_plugins", module)
    return module


def test_a_plugin_dataset_is_read_split_and_kept_unscaled(fake_plugins):
    data = load_data(DataConfig(dataset="fake_plugins:good_data"))
    assert (len(data.train), len(data.val), len(data.test)) == (40, 10, 10)  # val: a fifth
    assert data.num_classes == 3 and data.input_shape == (1, 8, 8)
    assert torch.equal(data.test.x, fake_plugins.good_data()[1][0])  # no normalization
    same = load_data(DataConfig(dataset="fake_plugins:loader_data", val_size=5))
    assert len(same.val) == 5 and len(same.train) == 45


def test_a_plugin_model_is_built_by_its_factory(fake_plugins):
    model = make_model(ModelConfig(name="fake_plugins:good_model"), (1, 8, 8), 3, seed=4)
    assert isinstance(model, nn.Sequential) and model(torch.zeros(2, 1, 8, 8)).shape == (2, 3)


def test_dataset_defaults_follow_the_dataset():
    assert len(load_data(DataConfig(dataset="digits")).val) == 300
    assert DataConfig().val_size is None  # fashion_mnist and mnist then hold out 10,000


@pytest.mark.parametrize(("field", "spec", "message"), [
    ("data.dataset", "no_such_module_xyz:load", DATA + r"cannot import"),
    ("data.dataset", "fake_plugins:missing", DATA + r"fake_plugins has no callable"),
    ("data.dataset", "fake_plugins:not_callable", DATA + r".* no callable"),
    ("data.dataset", "fake_plugins:one_split", DATA + r".*allowed: \(train, held_out\)"),
    ("data.dataset", "fake_plugins:float_labels", DATA + r".*integer class labels"),
    ("data.dataset", ":load", DATA + r"got ':load'; allowed: package\.module"),
    ("model.name", "fake_plugins:not_a_model", MODEL + r".*returned str"),
    ("model.name", "fake_plugins:wrong_width", MODEL + r".*maps inputs .* allowed: "
                                                r"\(2, 3\)"),
])
def test_a_bad_plugin_is_one_line_naming_the_field(fake_plugins, field, spec, message):
    from flows.common import preflight

    other = {"model.name": "fake_plugins:good_model", "data.dataset": "fake_plugins:good_data"}
    cfg = merge(TrainConfig(), {**other, field: spec, "batch_size": 8})
    with pytest.raises(ConfigError, match=message):
        preflight([cfg])


def test_the_cli_refuses_a_bad_plugin_before_recording_anything(mlflow_store, capsys):
    before = len(all_runs(mlflow_store))
    code = cli.main(["sweep", "--model", "no_such_module_xyz:build", "--data", LOAD,
                     "--lrs", "0.1", "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "model.name (--model): cannot import 'no_such_module_xyz'" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert len(all_runs(mlflow_store)) == before  # nothing recorded


def test_model_and_data_flags_set_the_config_fields():
    parser = cli.build_parser()
    settings = cli.settings_from(parser.parse_args(
        ["sweep", "--model", CNN, "--data", LOAD, "--set", "optim.name=adam"]))
    assert settings["overrides"] == {"optim.name": "adam", "model.name": CNN,
                                     "data.dataset": LOAD}
    assert "model" not in settings and "data" not in settings
    with pytest.raises(SystemExit):  # no abbreviations: --mod is not --model
        parser.parse_args(["sweep", "--mod", CNN])


@pytest.mark.slow
def test_the_pipeline_runs_on_the_example_model_and_data(tmp_path):
    """What the README promises: make sweep ARGS="--model ... --data ..."."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.client(uri)
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"search": {"seeds": [0, 1], "range_steps": 20,
                                                 "regret_epochs": 1}}))
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "pipeline", "--model", CNN, "--data", LOAD,
         "--epochs", "1", "--config", str(config), "--workers", "2"],
        cwd=ROOT, env={**__import__("os").environ, "MLFLOW_TRACKING_URI": uri},
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "transfer skipped" in proc.stdout
    runs = all_runs(uri)
    assert by_status(runs) == {"FINISHED": len(runs)}
    trained = [r for r in runs if r.data.params.get("model.name") == CNN]
    assert trained and all(r.data.params["data.dataset"] == LOAD for r in trained)
    (pipeline,) = [r for r in runs if r.info.run_name.startswith("pipeline ")]
    assert pipeline.data.metrics["chosen_lr"] > 0
    stages = {k: v for k, v in pipeline.data.tags.items() if k.startswith("stage.")}
    assert stages["stage.transfer"] == "skipped"
    assert all(v != "skipped" for k, v in stages.items() if k != "stage.transfer")  # search,
    # full training and the decay comparison all ran on the user's model and data
