"""bench/floor.py and the bench's floor columns: the arithmetic that turns timed GEMMs into
a floor, and the products it times (shapes as autograd's for nn.Linear). No timings asserted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import floor  # noqa: E402
from kit import Row, floor_row, speedup_row  # noqa: E402


def test_seconds_scales_steps_evaluation_and_members():
    sample = {"step": 0.002, "example": 1e-6}
    assert floor.GemmFloor.seconds(sample, 100) == pytest.approx(0.2)
    assert floor.GemmFloor.seconds(sample, 100, 20_000) == pytest.approx(0.22)
    assert floor.GemmFloor.seconds(sample, 100, 20_000, members=16) == pytest.approx(3.52)


def test_step_equivalents_and_evaluated_examples():
    assert floor.step_equivalents(50_000, 128) == pytest.approx(390.625)
    assert floor.evaluated_examples(10_000, 10_000, 2) == 40_000


def test_floor_of_reads_interleaved_medians():
    t = {"floor.step": 1.0, "floor.example": 2.0, "floor.step_cpu": 3.0,
         "floor.example_cpu": 4.0}
    assert floor.floor_of(t) == {"step": 1.0, "example": 2.0}
    assert floor.floor_of(t, cpu=True) == {"step": 3.0, "example": 4.0}


def test_gemm_shapes_are_autograds_for_the_mlp():
    gemms = floor.GemmFloor(floor.DIMS["mlp"], batch=8, steps=1, eval_examples=40, eval_rows=16)
    assert [tuple(w.shape) for w in gemms.weights] == [(256, 784), (10, 256)]
    assert [tuple(x.shape) for x in gemms.inputs] == [(8, 784), (8, 256)]
    # The products of one step equal autograd's gradients of a Linear-ReLU-Linear net.
    model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10))
    x = torch.randn(8, 784)
    model(x).sum().backward()
    assert model[0].weight.grad.shape == torch.mm(torch.ones(8, 256).t(), x).shape
    sample = gemms.sample()
    assert set(sample) == {"step", "example", "step_cpu", "example_cpu"}
    assert all(v > 0 for v in sample.values())


def test_rows_carry_the_floor_multiple():
    row = speedup_row("b", "x", 2.0, 3.0, 1.2, floor_s=1.0)
    assert row.value == pytest.approx(1.5) and row.met and row.floor_multiple() == 2.0
    assert Row("f", "share", None, None, 3.0, unit="%").floor_multiple() is None
    over = floor_row("i", "epoch", 2.5, 1.0, 2.2, cpu=(2.0, 1.0))
    assert over.met is False and over.value_text() == "2.50x" and over.cpu_value == 2.0
    assert floor_row("i", "epoch", 2.1, 1.0, 2.2).met is True


def test_previous_rows_drop_an_older_layout(tmp_path):
    import bench

    new = bench.table([speedup_row("a", "kept", 1.0, 1.0, floor_s=0.5)]).splitlines()[-1]
    old = "| c | older layout | 1 | 1 | 1x | | | | 0.1 | note |"
    path = tmp_path / "results.md"
    path.write_text("\n".join([new, old, new.replace("| a |", "| e |")]))
    assert bench.previous_rows(path, {"e"}) == [new]


def test_whole_command_reads_cpu_from_outside_and_names_a_failure(tmp_path):
    import sweep_cases

    log = tmp_path / "log"
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.2: pass"
    wall, cpu = sweep_cases.whole_command([sys.executable, "-c", burn], log)
    assert cpu >= 0.15 and wall >= 0.15  # the child's CPU, read after it was reaped
    with pytest.raises(sweep_cases.CommandFailed, match="exited 3: boom"):
        sweep_cases.whole_command([sys.executable, "-c", "print('boom'); raise SystemExit(3)"],
                                  log)
    assert Row("j", "failed", None, None, float("nan"), met=False).value_text() == "failed"


def test_the_floor_is_timed_at_the_works_length():
    gemms = floor.GemmFloor(floor.DIMS["softmax"], steps=390.6, eval_examples=20_000)
    assert (gemms.steps, gemms.chunks) == (391, 5)  # 20k examples in chunks of 4096
