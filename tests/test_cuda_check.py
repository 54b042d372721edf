"""bench/cuda_check.py, the prepared CUDA run, works: its code path on the CPU, tiny, with
batching on (what auto chooses on a GPU), so the day a GPU is lent it runs as written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import cuda_check  # noqa: E402


def test_the_cuda_check_runs_its_path_on_the_cpu(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    out = tmp_path / "cuda.json"
    assert cuda_check.main(["--device", "cpu", "--quick", "--batching", "on",
                            "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["rates"] == 4
    assert report["plan"] == ["batched k=4"]
    assert report["one_run_s"] > 0 and report["batched_s"] > 0
    # the seconds are rounded to ms in the report: compare the ratio to that precision
    assert report["ratio"] == pytest.approx(report["batched_s"] / report["one_run_s"], rel=0.02)
    assert report["max_val_loss_diff"] is not None and report["max_val_loss_diff"] < 1e-3
    assert report["met"] is None  # judged on a GPU only
    assert report["command"]["rc"] == 0, report["command"]["tail"]
    assert "batching=on" in report["command"]["argv"]
