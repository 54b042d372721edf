"""What every bench case shares: a result row, interleaved median timing, the machine's load."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path


def descendants_cpu(pids: list[int] | None = None) -> float:
    """CPU seconds of this process's live descendants (Prefect's API server, worker processes;
    with threads, the server alone), or of ``pids`` only, without a scan of /proc (~6 ms): on
    a loaded machine CPU time moves far less than wall time."""
    return sum(_cpu(pid) for pid in (descendants() if pids is None else pids))


def descendants() -> list[int]:
    """The pids of this process's live descendants."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], list(children.get(os.getpid(), []))
    while todo:
        found.append(pid := todo.pop())
        todo += children.get(pid, [])
    return found


def _cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # ended meanwhile
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _HZ


_HZ = os.sysconf("SC_CLK_TCK")


def load_average() -> float:
    """The 1-minute load average (runnable processes; 2.0 fills this 2-core machine)."""
    return float(Path("/proc/loadavg").read_text().split()[0])


# What matmul_ms() read on this machine with quiet and with busy neighbours on the host.
MATMUL_SEEN = "0.7-0.8 ms: quiet host; 1.5-1.8 ms: busy"


def matmul_ms(calls: int = 300) -> float:
    """Median milliseconds of the MLP's first-layer matmul (128x784 @ 784x256) on one thread:
    the state of a shared host's core (the step of (a), (b) and (c) is mostly this product;
    MATMUL_SEEN says what it reads here)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a, b = torch.randn(128, 784), torch.randn(784, 256)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    return 1000 * statistics.median(times)


@dataclass
class Row:
    """One measured comparison. ``value`` is a speed-up (baseline s / lrpipe s, ``unit`` "x")
    or a share (``unit`` "%"); ``met`` compares it with the target (None: no target)."""

    case: str
    what: str
    lrpipe_s: float | None
    baseline_s: float | None
    value: float
    unit: str = "x"
    target: str = ""
    met: bool | None = None
    note: str = ""
    load: float = field(default_factory=load_average)
    cpu_value: float | None = None  # the same ratio in process CPU seconds (load-robust)
    # The physical floor of lrpipe's side: its GEMMs timed alone in the same run (floor.py).
    floor_s: float | None = None

    def value_text(self) -> str:
        if self.value != self.value:  # NaN: the measurement failed (the note says why)
            return "failed"
        return {"%": f"{self.value:.1f}%", "s": f"{self.value:.1f} s"}.get(
            self.unit, f"{self.value:.2f}x")

    def floor_multiple(self) -> float | None:
        """lrpipe's seconds over its floor's (None without both)."""
        if self.floor_s is None or self.lrpipe_s is None or self.floor_s <= 0:
            return None
        return self.lrpipe_s / self.floor_s


def speedup_row(case: str, what: str, lrpipe_s: float, baseline_s: float,
                target: float | None = None, note: str = "",
                cpu: tuple[float, float] | None = None, floor_s: float | None = None) -> Row:
    """A row whose value is baseline_s / lrpipe_s, met when it is >= ``target``; ``cpu``:
    (lrpipe, baseline) process CPU seconds, for single-threaded cases on a loaded machine;
    ``floor_s``: the GEMMs of lrpipe's side timed alone (``floor.GemmFloor``)."""
    ratio = baseline_s / lrpipe_s
    return Row(case, what, lrpipe_s, baseline_s, ratio,
               target="" if target is None else f">= {target:g}x",
               met=None if target is None else ratio >= target, note=note,
               cpu_value=None if cpu is None else cpu[1] / cpu[0], floor_s=floor_s)


def floor_row(case: str, what: str, lrpipe_s: float, floor_s: float, target: float,
              note: str = "", cpu: tuple[float, float] | None = None) -> Row:
    """A row whose value is lrpipe_s / floor_s (lower is better), met when it is <= ``target``;
    ``cpu``: (lrpipe, floor) CPU seconds, giving the same multiple in CPU time."""
    multiple = lrpipe_s / floor_s
    return Row(case, what, lrpipe_s, None, multiple, unit="x floor",
               target=f"<= {target:g}x floor", met=multiple <= target, note=note,
               cpu_value=None if cpu is None else cpu[0] / cpu[1], floor_s=floor_s)


def cpu_pair(t: dict[str, float], ours: str, theirs: str) -> tuple[float, float]:
    """(ours, theirs) process CPU seconds from an ``interleaved`` result."""
    return t[f"{ours}.cpu"], t[f"{theirs}.cpu"]


def interleaved_samples(fns: dict[str, Callable[[], dict | None]],
                        repeats: int) -> dict[str, list[float]]:
    """Every round's seconds of each measurement, over ``repeats`` rounds.

    Each round runs every function once, in alternating order (a load change on the shared
    machine then hits both sides). A function's wall time is ``<name>``, the CPU time of this
    process and its live descendants ``<name>.cpu``, that of the descendants alone
    ``<name>.children`` (``descendants_cpu``); a function may also return
    its own measurements ``{"part": seconds}``, reported as ``<name>.<part>``.
    """
    samples: dict[str, list[float]] = {}
    for r in range(repeats):
        for name in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            start, own, children = time.perf_counter(), time.process_time(), descendants_cpu()
            parts = fns[name]() or {}
            samples.setdefault(name, []).append(time.perf_counter() - start)
            children = descendants_cpu() - children
            samples.setdefault(f"{name}.cpu", []).append(time.process_time() - own + children)
            samples.setdefault(f"{name}.children", []).append(children)
            for part, seconds in parts.items():
                samples.setdefault(f"{name}.{part}", []).append(seconds)
    return samples


def interleaved(fns: dict[str, Callable[[], dict | None]], repeats: int) -> dict[str, float]:
    """Median seconds of each measurement over ``repeats`` rounds (``interleaved_samples``)."""
    return medians(interleaved_samples(fns, repeats))


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    """Each measurement's median over its rounds."""
    return {name: statistics.median(values) for name, values in samples.items()}


@contextlib.contextmanager
def quiet(log: Path) -> Iterator[None]:
    """Send everything written to file descriptors 1 and 2 (this process and the worker
    processes it starts) to ``log``: flows print a line per epoch."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "a") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def say(text: str) -> None:
    print(text, flush=True)
