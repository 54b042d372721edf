"""Case (f) measured inside one flow run: where the sweep's wall time goes.

Timing the flow against plain train() calls means subtracting two 25-35 s timings that, on a
shared VM, move by 10-25% from one minute to the next. Attributing inside the same run does
not depend on how fast the machine happened to be:

  start    flow call -> first train() begins (Prefect's flow run, validation, the MLflow parent)
  end      last train() ends -> flow call returns, less the figures (the last tasks' Prefect and
           MLflow closing, the summary, the report, Prefect's flow end)
  during   CPU seconds spent while training runs that are not training: Prefect's API server,
           Prefect's and MLflow's threads, the per-epoch MLflow hook; divided by the number of
           parallel tasks (cores taken from training)
  overhead = start + end + during / tasks; share = overhead / flow wall time

Training is train()'s own thread CPU less its on_epoch hooks (MLflow logging, a printed line);
figures are lrpipe's drawing and their PNG rendering inside tracking.log_figure. Everything that
is not training or figures counts against the flow, lrpipe's own bookkeeping included.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from kit import descendants, descendants_cpu


class FlowClock:
    """Wraps flows.common.train, lrpipe's figure functions and tracking.log_figure while a
    flow runs; ``measure(call, tasks)`` returns the parts of one run (see the module doc)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.train_cpu = self.hooks_cpu = self.figures_cpu = self.figures_wall = 0.0
        self.first: tuple[float, float] | None = None  # (wall, tree CPU) at the first start
        self.last: tuple[float, float] | None = None  # ... at the latest end
        self.calls = 0
        self._pids: list[int] = []

    def measure(self, call: Callable[[], None], tasks: int) -> dict[str, float]:
        self._reset()
        self._pids = descendants()  # with threads: the API server, started by the warm-up
        start, cpu = time.perf_counter(), self._tree_cpu()
        with self._wrapped():
            call()
        wall = time.perf_counter() - start
        born = [pid for pid in descendants() if pid not in self._pids]  # none with threads
        cpu = self._tree_cpu() + descendants_cpu(born) - cpu
        if not self.calls:
            raise RuntimeError("flow clock: no train() call seen (the sweep trained batched); "
                               "it needs one train() per rate: the default MLP sweep on the "
                               "CPU, or batching=off (lrpipe.engine.many.batching_rule)")
        first_wall, first_cpu = self.first
        last_wall, last_cpu = self.last
        training = self.train_cpu - self.hooks_cpu
        during = (last_cpu - first_cpu) - training
        head = first_wall - start
        tail = start + wall - last_wall - self.figures_wall
        overhead = head + tail + during / tasks
        return {"overhead": overhead, "share": 100.0 * overhead / wall, "head": head,
                "tail": tail, "during": during, "training_cpu": training,
                "cpu_share": 100.0 * (cpu - training - self.figures_cpu) / cpu,
                "figures_wall": self.figures_wall}

    def _tree_cpu(self) -> float:
        return time.process_time() + descendants_cpu(self._pids)

    @contextmanager
    def _wrapped(self) -> Iterator[None]:
        import flows.common
        import flows.lr_sweep
        from lrpipe import tracking
        from lrpipe.plots import sweep as plots

        patched = [(flows.common, "train", self._train(flows.common.train)),
                   (plots, "sweep_figures", self._figures(plots.sweep_figures)),
                   (flows.lr_sweep, "plot_update_ratio_by_lr",
                    self._figures(flows.lr_sweep.plot_update_ratio_by_lr)),
                   (tracking, "log_figure", self._figures(tracking.log_figure))]
        saved = [(module, name, getattr(module, name)) for module, name, _ in patched]
        for module, name, wrapper in patched:
            setattr(module, name, wrapper)
        try:
            yield
        finally:
            for module, name, original in saved:
                setattr(module, name, original)

    def _train(self, train):
        def timed(cfg, data=None, *, on_epoch=None, **kwargs):
            with self._lock:
                if self.first is None:
                    self.first = (time.perf_counter(), self._tree_cpu())
            hooks = [0.0]

            def hook(row: dict) -> None:
                began = time.thread_time()
                on_epoch(row)
                hooks[0] += time.thread_time() - began

            began = time.thread_time()
            try:
                return train(cfg, data, on_epoch=hook if on_epoch else None, **kwargs)
            finally:
                spent = time.thread_time() - began
                with self._lock:
                    self.calls += 1
                    self.train_cpu += spent
                    self.hooks_cpu += hooks[0]
                    self.last = (time.perf_counter(), self._tree_cpu())
        return timed

    def _figures(self, draw):
        def timed(*args, **kwargs):
            began, cpu = time.perf_counter(), time.thread_time()
            try:
                return draw(*args, **kwargs)
            finally:
                self.figures_wall += time.perf_counter() - began
                self.figures_cpu += time.thread_time() - cpu
        return timed
