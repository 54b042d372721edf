"""What the terminal says while a command runs: its start, how long is left, how long it took.

A display only: nothing that runs, and no number that is recorded, depends on a timing taken
here (house rule 17). The arithmetic is pure (``eta_s``, ``stage_work``, ``left_text``,
``duration_text``...); ``Meter`` holds the counts of one process's progress lines (epochs
done and planned of the runs it has seen, tasks finished of the stage it waits for), under a
lock since training tasks report from their own threads.

Units: seconds of wall-clock time; work in epochs of one run (a run of 5 epochs is 5).
It sits beside the loop whose per-epoch rows it counts; it imports neither torch nor the loop.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

# argv[0] of a process that is one lrpipe command from its start: the console script,
# ``python -m lrpipe`` and ``python -m flows.cli``. Any other process (pytest, a notebook)
# times a command from the call of ``flows.harness.run_command``.
CLI_ENTRIES = ("lrpipe", os.path.join("lrpipe", "__main__.py"), os.path.join("flows", "cli.py"))


def eta_s(done: float, planned: float, elapsed_s: float) -> float | None:
    """Seconds left when ``done`` of ``planned`` units took ``elapsed_s``, at the same pace;
    None until a unit is done (nothing timed yet) or when the plan is unknown (``planned``
    <= 0). Work past the plan leaves 0 s."""
    if done <= 0 or planned <= 0 or elapsed_s < 0:
        return None
    return max(0.0, elapsed_s * (planned - done) / done)


def stage_work(runs: Mapping[str, tuple[int, int]], tasks: int) -> tuple[int, int]:
    """(epochs done, epochs planned) of a stage of ``tasks`` tasks of which the runs in
    ``runs`` (name -> (epochs done, epochs planned)) have started.

    A task not started yet counts as one run of the mean planned length of those seen (tasks
    of one stage train alike); a task holding several runs (a batched group) shows them all
    once it starts, so the plan only grows to them then."""
    if not runs:
        return 0, 0
    done = sum(d for d, _ in runs.values())
    planned = sum(p for _, p in runs.values())
    unseen = max(0, tasks - len(runs))
    return done, planned + round(unseen * planned / len(runs))


def duration_text(seconds: float) -> str:
    """``48 s``, ``3 min 10 s``, ``2 h 5 min``: whole seconds, two units at most."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s" if s % 60 else f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


def left_text(seconds: float | None) -> str:
    """``~3 min left`` (minutes rounded up), ``<1 min left``; "" when nothing is timed yet."""
    if seconds is None or not math.isfinite(seconds):
        return ""
    if seconds < 60:
        return "<1 min left"
    return f"~{math.ceil(seconds / 60)} min left"


def settings_text(settings: Mapping[str, object]) -> str:
    """The settings given, as a short ``key value`` list: lists joined by commas, empty
    values and the ``overrides`` mapping (shown as ``--set`` pairs) left out of the rest."""
    parts = []
    for key, value in settings.items():
        if value is None or value == {} or value == [] or key == "overrides":
            continue
        if isinstance(value, list | tuple):
            value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        parts.append(f"{key} {value}")
    sets = [f"--set {k}={v}" for k, v in dict(settings.get("overrides") or {}).items()]
    return ", ".join(parts + sets) or "defaults"


def start_line(command: str, flow: str, settings: Mapping[str, object]) -> str:
    """The command's first line, printed before anything slow: what will run."""
    return (f"lrpipe {command}: starting flow {flow} ({settings_text(settings)}); checking the "
            "settings, then the store and the Prefect API")


def plan_line(command: str, configs: int, epochs: int | None, uri: str,
              experiment: str | None, ui: str) -> str:
    """The second line, once the settings are checked: what was checked and where the runs
    go. ``configs`` are the training configs checked (for ``sweep``, one per run); each
    stage says its own task count as it starts (``stage_line``)."""
    what = f"{configs} training config{'s' if configs != 1 else ''} checked"
    if epochs is not None:
        what += f", {epochs} epoch{'s' if epochs != 1 else ''} each"
    where = f"experiment {experiment!r} in {uri}" if experiment else uri
    return f"lrpipe {command}: {what}; recording to {where}; MLflow UI {ui} (`make ui`)"


def stage_line(label: str, tasks: int) -> str:
    """A stage's first line, the count its ``[k/N]`` lines go up to."""
    return f"[0/{tasks}] {label} started: {tasks} task{'s' if tasks != 1 else ''}"


def wall_line(command: str, wall_s: float, flow_s: float) -> str:
    """The last line: the whole command's wall-clock time from its start, and its parts."""
    return (f"lrpipe {command}: done in {duration_text(wall_s)} wall (start-up and checks "
            f"{duration_text(wall_s - flow_s)}, the work {duration_text(flow_s)})")


def process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``); None where unknown."""
    try:
        started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    return max(0.0, uptime - started / os.sysconf("SC_CLK_TCK"))


def command_start(argv0: str | None = None, clock: Callable[[], float] = time.monotonic
                  ) -> float:
    """When the command started, on ``clock``: the process's start for an lrpipe command
    line (``CLI_ENTRIES``: its imports and start-up count), else now."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    age = process_age_s() if argv0.endswith(CLI_ENTRIES) else None
    return clock() - (age or 0.0)


@dataclass
class _Run:
    done: int
    planned: int
    seen: float


class Meter:
    """The progress of one process's current stage: the tasks ``collect`` waits for and the
    epochs its training runs report. Thread-safe; a display only."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._tasks = self._finished = 0
        self._label = ""
        self._stage_start = clock()

    def start_stage(self, label: str, tasks: int) -> None:
        """A new stage of ``tasks`` tasks; the runs seen so far are forgotten (a run that
        diverged reports no last epoch: kept, it would count as unfinished work, from its
        stage's start, in every later stage). A run of this stage that reported before the
        stage started is seen again at its next epoch."""
        with self._lock:
            self._runs = {}
            self._label, self._tasks, self._finished = label, tasks, 0
            self._stage_start = self._clock()

    def epoch(self, run: str, epoch: int, epochs: int, ended: bool = False) -> str:
        """Run ``run`` reported epoch ``epoch`` of ``epochs`` (0: before training); ``ended``:
        it stops here (diverged). Returns the ``~N min left`` text, "" until timed."""
        with self._lock:
            now = self._clock()
            seen = self._runs.get(run)
            first = seen.seen if seen else now
            self._runs[run] = _Run(epochs if ended else min(epoch, epochs), epochs, first)
            return self._left(now)

    def task_done(self) -> str:
        """A task of the stage finished; the ``~N min left`` text ("" after the last)."""
        with self._lock:
            self._finished += 1
            return self._left(self._clock()) if self._finished < self._tasks else ""

    def _left(self, now: float) -> str:
        runs = {n: (r.done, r.planned) for n, r in self._runs.items()}
        done, planned = stage_work(runs, self._tasks)
        if done > 0:  # epochs timed: from the first run's start in this stage
            start = min(r.seen for r in self._runs.values())
            left = eta_s(done, planned, now - start)
        else:  # tasks without epoch lines (range tests, other processes' workers)
            left = eta_s(self._finished, self._tasks, now - self._stage_start)
        text = left_text(left)
        return f"{text} in {self._label}" if text and self._label else text


METER = Meter()  # this process's progress lines (flows.common.collect and epoch_printer)
