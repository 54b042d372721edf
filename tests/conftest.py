"""Shared fixtures: small real data, a throwaway MLflow store, one Prefect test server."""

from __future__ import annotations

import os

import pytest
import torch

import flows  # noqa: F401  (sets Prefect/MLflow environment defaults before they are imported)
from lrpipe.engine.config import DataConfig, ModelConfig, TrainConfig

torch.set_num_threads(1)


@pytest.fixture
def digits_cfg() -> TrainConfig:
    """scikit-learn's real 8x8 digits, a small MLP, 2 epochs: a training run in ~0.2 s."""
    return TrainConfig(data=DataConfig(dataset="digits", val_size=300),
                       model=ModelConfig(name="mlp", hidden=(32,)), epochs=2, batch_size=64,
                       device="cpu")


@pytest.fixture
def f64():
    """Float64 models (make_model follows the default dtype) for exact comparisons: batched
    and separate runs then agree to ~1e-15."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="session")
def digits32():
    """The digits Dataset (float32, 300 validation examples) on the CPU."""
    from lrpipe.engine.data import load_data

    return load_data(DataConfig(dataset="digits", val_size=300), "cpu")


@pytest.fixture(scope="session")
def digits64(digits32):
    """The same examples in float64."""
    from lrpipe.engine.data import Dataset, Split

    d = digits32
    return Dataset(*(Split(s.x.double(), s.y) for s in (d.train, d.val, d.test)),
                   d.num_classes, d.input_shape, d.class_names)


@pytest.fixture(scope="session")
def _session_store(tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlruns') / 'mlflow.db'}"
    from lrpipe import tracking

    tracking.experiment_id("warm-up", uri)  # pay the schema migrations (~3-10 s) once
    return uri


@pytest.fixture
def mlflow_store(_session_store, monkeypatch) -> str:
    """A throwaway sqlite MLflow store shared by the session (creating one costs seconds);
    MLFLOW_TRACKING_URI points at it. Tests keep apart by experiment name or run id."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _session_store)
    return _session_store


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (building it costs 15-20 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def api(prefect_harness) -> str:
    """The test session's Prefect API URL, for commands run as subprocesses (each would
    start its own otherwise)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def pytest_configure(config):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
