"""Cases (d), (f), (g), (j): the default sweep through Prefect and MLflow (threads, serial,
Dask) against the same trainings as plain train() calls, the whole pipeline's wall time, and a
small `lrpipe sweep` as a fresh process against a hand-loop script, timed from outside."""

from __future__ import annotations

import io
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import torch
from kit import Row, interleaved, interleaved_samples, quiet, say, speedup_row

from flows.commands import COMMANDS
from lrpipe.engine.config import TrainConfig, merge
from lrpipe.engine.train import train

ROOT = Path(__file__).resolve().parent.parent


def sweep_settings(quick: bool) -> dict:
    """flows.lr_sweep's defaults (8 rates x 5 epochs, MLP, SGD, Fashion-MNIST), or a smoke
    size with --quick."""
    from lrpipe.experiments.sweep import DEFAULT_EPOCHS, DEFAULT_LRS

    if quick:
        return {"lrs": list(DEFAULT_LRS[:4]), "epochs": 1,
                "overrides": {"data": {"subset": 5000}}}
    return {"lrs": list(DEFAULT_LRS), "epochs": DEFAULT_EPOCHS, "overrides": {}}


def configs(settings: dict) -> list[TrainConfig]:
    from lrpipe.experiments.sweep import sweep_configs

    base = merge(TrainConfig(), {"epochs": settings["epochs"], **settings["overrides"]})
    return sweep_configs(base, settings["lrs"])


def warm_up(log: Path) -> None:
    """Pay the one-time costs outside the timings: the MLflow store's schema, Prefect's API
    server (started by the first flow), the Fashion-MNIST tensors (cached per process)."""
    from flows.common import dataset_for
    run = COMMANDS["sweep"].run

    digits = {"data": {"dataset": "digits", "val_size": 300}, "batch_size": 64}
    with quiet(log):
        run(lrs=[0.1], epochs=1, overrides=digits, runner="threads", workers=1)
    dataset_for(TrainConfig())


def plain_sweep(settings: dict, workers: int) -> dict:
    """The sweep's trainings as plain train() calls on ``workers`` threads of one torch thread
    each: the flow's arrangement without Prefect, MLflow or figures."""
    from flows.common import dataset_for

    cfgs = configs(settings)
    data = dataset_for(cfgs[0])

    def one(cfg: TrainConfig) -> pd.DataFrame:
        torch.set_num_threads(1)
        return train(cfg, data).history.assign(lr=cfg.optim.lr)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        histories = list(pool.map(one, cfgs))
    return figures_seconds(pd.concat(histories, ignore_index=True))


def figures_seconds(history: pd.DataFrame) -> dict[str, float]:
    """Wall and CPU seconds to draw the sweep's figures and render them as PNGs (what
    log_figure does before the upload): flow time that is neither Prefect nor MLflow."""
    import matplotlib.pyplot as plt

    from lrpipe.plots import sweep as plots
    from lrpipe.plots.ratios import plot_update_ratio_by_lr

    start, cpu = time.perf_counter(), time.process_time()
    figures = list(plots.sweep_figures(history.assign(status="ok", diverged_epoch=None))
                   .values())
    if any(c.startswith("ratio/") for c in history.columns):  # as the flow draws them
        figures.append(plot_update_ratio_by_lr(history))
    for fig in figures:
        fig.savefig(io.BytesIO(), format="png")
        plt.close(fig)
    return {"figures": time.perf_counter() - start, "figures_cpu": time.process_time() - cpu}


def case_d_f(settings: dict, workers: int, repeats: int, log: Path,
             cases: str = "df") -> list[Row]:
    """(d) the sweep per runner and (f) Prefect + MLflow's share of it, for the cases named in
    ``cases``. The sweep trains one task per rate: the default MLP with batching auto is not
    batched on the CPU (``lrpipe.engine.many.batching_rule``), which (f)'s clock needs."""
    run = COMMANDS["sweep"].run

    def flow(runner: str):
        def call() -> None:
            with quiet(log):
                run(lrs=settings["lrs"], epochs=settings["epochs"],
                    overrides=settings["overrides"], runner=runner, workers=workers)
        return call

    def one_at_a_time() -> None:
        """The default sweep's own tasks (1 torch thread each, the same batching plan), run
        one after another: a task runner of one thread instead of ``workers``."""
        from prefect.task_runners import ThreadPoolTaskRunner

        from flows.lr_sweep import lr_sweep
        from lrpipe.experiments.sweep import check

        check(settings["lrs"], settings["epochs"], settings["overrides"])
        with quiet(log):
            lr_sweep.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))(
                lrs=settings["lrs"], epochs=settings["epochs"],
                overrides=settings["overrides"], runner="threads", workers=workers)

    rows: list[Row] = []
    size = f"{len(settings['lrs'])} rates x {settings['epochs']} epochs"
    if "d" in cases:
        t = interleaved({"threads": flow("threads"), "one": one_at_a_time,
                         "serial": flow("serial"), "dask": flow("dask")}, repeats)
        faster = "threads" if t["threads"] <= t["dask"] else "dask"
        rows += [
            speedup_row("d", f"default sweep ({size}), {workers} thread tasks x 1 torch thread "
                        "vs the same sweep run serially (the same tasks one after another)",
                        t["threads"], t["one"], 1.7, "whole flow: Prefect, MLflow, figures"),
            speedup_row("d", f"the same, {workers} thread tasks vs runner=serial (1 task x "
                        f"{workers} torch threads: serial given every core)", t["threads"],
                        t["serial"], note="no target: a serial run that uses both cores as "
                        "torch threads; see the 2-threads-vs-1 row"),
            speedup_row("d", f"the same sweep, runner=threads vs runner=dask ({workers} worker "
                        "processes, cluster start-up included)", t["threads"], t["dask"],
                        note=f"faster: {faster}"),
        ]
    if "f" in cases:
        rows.append(case_f(settings, workers, 2 * repeats + 1, flow("threads"), size))
    return rows


def case_f(settings: dict, workers: int, rounds: int, flow, size: str) -> Row:
    """Prefect and MLflow's share of the threads flow, attributed inside each run
    (``flow_clock``: start, end and non-training CPU while training, against the flow's wall
    time); judged on the median over rounds. Next to it, as a cross-check, the old estimate:
    the same trainings as plain train() calls (and the same figures) in every round, share =
    (flow - plain) / flow, which on this shared machine moves by tens of percent per round."""
    from flow_clock import FlowClock

    clock = FlowClock()
    f = interleaved_samples({"threads": lambda: clock.measure(flow, workers),
                             "plain": lambda: plain_sweep(settings, workers)}, rounds)
    med = {k: statistics.median(v) for k, v in f.items()}
    share = med["threads.share"]
    ab = 100.0 * (med["threads"] - med["plain"]) / med["threads"]
    paired = sorted(100.0 * (a - b) / a for a, b in zip(f["threads"], f["plain"], strict=True))
    server = med["threads.children"]
    return Row("f", f"Prefect + MLflow share of the default sweep's wall time ({size}), "
               "attributed inside each flow run", med["threads"],
               med["threads"] - med["threads.overhead"], share, unit="%", target="<= 5%",
               met=share <= 5.0, cpu_value=med["threads.cpu_share"],
               note=f"medians of {rounds} rounds, round by round "
                    f"{', '.join(f'{p:.1f}' for p in sorted(f['threads.share']))}%: start "
                    f"{med['threads.head']:.2f} s + end {med['threads.tail']:.2f} s (figures "
                    f"excluded) + {med['threads.during']:.2f} CPU s of non-training work while "
                    f"training / {workers} tasks; Prefect's API server {server:.2f} CPU s per "
                    f"flow; figures {med['threads.figures_wall']:.1f} s "
                    f"({100 * med['threads.figures_wall'] / med['threads']:.1f}%, lrpipe's). "
                    f"Cross-check, flow - plain train() on {workers} threads with the same "
                    f"figures ({med['plain']:.1f} s): {ab:.1f}% of the medians, round by round "
                    f"{', '.join(f'{p:.1f}' for p in paired)}%")


def case_d_threads(n: int, repeats: int) -> Row:
    """Why runner=serial is not 2x slower: it gives its one task both cores as torch threads.
    One MLP training run on ``n`` examples with 2 torch threads vs 1."""
    from speed_cases import subset

    from flows.common import dataset_for

    cfg = TrainConfig(epochs=1, device="cpu")
    data = subset(dataset_for(cfg), n)

    def run(threads: int):
        def call() -> None:
            torch.set_num_threads(threads)
            try:
                train(cfg, data)
            finally:
                torch.set_num_threads(1)
        return call

    t = interleaved({"two": run(2), "one": run(1)}, repeats)
    return speedup_row("d", f"one MLP run (1 epoch x {n}), 2 torch threads vs 1: what serial "
                       "gains from the second core", t["two"], t["one"],
                       note="serial vs 2 parallel tasks can reach at most 2 / this")


def case_g(log: Path) -> Row:
    """``lrpipe pipeline`` (what `make sweep` runs after setup) as a fresh process."""
    cli = Path(sys.executable).with_name("lrpipe")
    start = time.perf_counter()
    with open(log, "a") as out:
        rc = subprocess.run([str(cli), "pipeline"], cwd=ROOT, stdout=out, stderr=out,
                            env=os.environ.copy()).returncode
    seconds = time.perf_counter() - start
    say(f"  (g) lrpipe pipeline: {seconds:.0f} s, exit status {rc}")
    return Row("g", "`make sweep` (lrpipe pipeline), setup excluded", seconds, None, seconds,
               unit="s", target="<= 10 min (600 s)", met=rc == 0 and seconds <= 600,
               note=f"exit status {rc}; wall seconds")


class CommandFailed(RuntimeError):
    """A timed command exited non-zero."""


def whole_command(argv: list[str], log: Path,
                  env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall, CPU) seconds of ``argv`` run as a fresh process (``env``: variables added to
    this process's), measured from outside it: start-up and exit included; CPU = user + sys
    of it and every descendant it waited for (``RUSAGE_CHILDREN``; Prefect's temporary API
    server is one). Raises CommandFailed."""
    import resource

    def used() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    cpu, start = used(), time.perf_counter()
    with open(log, "a") as out:
        rc = subprocess.run(argv, cwd=ROOT, stdout=out, stderr=out,
                            env={**os.environ, **(env or {})}).returncode
    if rc:
        raise CommandFailed(f"`{' '.join(Path(a).name for a in argv[:2])}` exited {rc}: "
                            + log.read_text().strip().splitlines()[-1][:300])
    return time.perf_counter() - start, used() - cpu


def case_j(log: Path, rounds: int, lrs: str = "0.03,0.1,0.3", subset: int = 5000) -> Row:
    """A small ``lrpipe sweep`` (one epoch per rate) as a fresh process against a user's
    script doing the same trainings with hand-written loops (``hand_sweep.py``), both timed
    from outside, the two alternating per round; the floor is the trainings' GEMMs."""
    from floor import DIMS, GemmFloor, evaluated_examples, step_equivalents

    from flows.common import dataset_for
    from lrpipe.engine.train import eval_train_split

    bin_dir = Path(sys.executable).parent
    ours = [str(bin_dir / "lrpipe"), "sweep", "--lrs", lrs, "--epochs", "1",
            "--set", f"data.subset={subset}"]
    theirs = [sys.executable, str(ROOT / "bench" / "hand_sweep.py"), "--lrs", lrs, "--epochs",
              "1", "--subset", str(subset)]
    what = (f"`lrpipe sweep --lrs {lrs} --epochs 1 --set data.subset={subset}` as a fresh "
            f"process vs a script of {len(lrs.split(','))} hand torch.optim loops "
            "(bench/hand_sweep.py), timed from outside")
    samples: dict[str, list[float]] = {}
    try:
        for r in range(rounds):
            for name, argv in (("ours", ours), ("hand", theirs))[::1 if r % 2 == 0 else -1]:
                wall, cpu = whole_command(argv, log)
                samples.setdefault(name, []).append(wall)
                samples.setdefault(f"{name}.cpu", []).append(cpu)
    except CommandFailed as failed:
        say(f"  (j) {failed}")
        return Row("j", what, None, None, float("nan"), met=False, note=str(failed))
    med = {k: statistics.median(v) for k, v in samples.items()}
    cfg = merge(TrainConfig(), {"epochs": 1, "data": {"subset": subset}})
    data = dataset_for(cfg)
    k = len(lrs.split(","))
    steps = step_equivalents(len(data.train), cfg.batch_size)
    evaluated = evaluated_examples(len(data.val), len(eval_train_split(data, cfg)), 2)
    floor = GemmFloor.seconds(GemmFloor(DIMS["mlp"], cfg.batch_size, steps, evaluated).sample(),
                              steps, evaluated, k)
    return speedup_row(
        "j", what, med["ours"], med["hand"],
        note=f"lrpipe runs its default 2 thread tasks, the script one loop after another; "
             f"start-up and exit included; CPU s (user + sys, RUSAGE_CHILDREN: the process and "
             f"what it reaped, Prefect's API server included) {med['ours.cpu']:.1f} vs "
             f"{med['hand.cpu']:.1f}; medians of {rounds} rounds; floor: the {k} trainings' "
             "GEMMs (training + 2 evaluations each)",
        cpu=(med["ours.cpu"], med["hand.cpu"]), floor_s=floor)


def case_j_startup(log: Path, rounds: int) -> Row:
    """What any command pays before its work: ``lrpipe sweep --help`` (imports, argument
    parsing, exit) against ``python -c "import torch"``, both timed from outside."""
    ours = [str(Path(sys.executable).parent / "lrpipe"), "sweep", "--help"]
    theirs = [sys.executable, "-c", "import torch"]
    samples: dict[str, list[float]] = {}
    for r in range(rounds):
        for name, argv in (("ours", ours), ("torch", theirs))[::1 if r % 2 == 0 else -1]:
            wall, cpu = whole_command(argv, log)
            samples.setdefault(name, []).append(wall)
            samples.setdefault(f"{name}.cpu", []).append(cpu)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return speedup_row("j", "start-up and exit alone: `lrpipe sweep --help` vs `python -c "
                       "'import torch'`, timed from outside", med["ours"], med["torch"],
                       note=f"CPU s {med['ours.cpu']:.1f} vs {med['torch.cpu']:.1f}; medians of "
                            f"{rounds} rounds; floor: none (no training)",
                       cpu=(med["ours.cpu"], med["torch.cpu"]))
