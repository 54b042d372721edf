"""lrpipe's speed, side by side with what people usually write, in one run.

  (a) one train() run vs a minimal hand-written loop (same model, data, batch order)
  (b) lrpipe's data path vs DataLoader(TensorDataset) and a hand index gather (what a
      competent user writes); the tutorial's DataLoader + ToTensor as a second row (MLP)
  (c) K=16 rates batched vs 16 sequential runs (softmax regression, MLP), with what the
      declared rule (batching=auto, lrpipe.engine.many.batching_rule) chooses next to the ratio
  (d) the default sweep with parallel thread tasks vs runner=serial; threads vs Dask processes
  (e) lrpipe's range test vs torch-lr-finder fed DataLoader(TensorDataset) (and ToTensor,
      and lrpipe's own batches)
  (f) the share of the default sweep's wall time spent in Prefect and MLflow
  (g) with --pipeline: the whole `make sweep` (lrpipe pipeline), setup excluded
  (h) lrpipe.find_lr on a user's model vs torch-lr-finder (same DataLoader; given tensors)
  (i) one epoch of the MLP through train() vs its GEMM floor (target within 2.2x)
  (j) a small `lrpipe sweep` as a fresh process vs a script of hand loops, wall and CPU
      seconds measured from outside (start-up and exit included), and start-up alone
      (`lrpipe sweep --help` vs `python -c "import torch"`)
  (k) the decay comparison raced over seeds (the default) vs every schedule on every seed
      (`--prune off`), default config, three seed sets: the same winner, and the seconds saved

Every row states its physical floor: the GEMMs of lrpipe's side timed alone in the same run
(bench/floor.py), and lrpipe's multiple of it.

Every timing is the median of several rounds, the two sides alternating within a round; each
row notes the 1-minute load average when it was measured (2.0 fills this 2-core machine).
Results go to the terminal and to bench/results.md. Usage: `make bench ARGS="--quick"`, or
`.venv/bin/python bench/bench.py [--quick] [--only a,c] [--pipeline]`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

# isort: off
import flows  # noqa: F401  (sets OMP_WAIT_POLICY and Prefect/MLflow defaults before torch loads)
import torch
# isort: on

from kit import MATMUL_SEEN, Row, load_average, matmul_ms, say

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.md"
CASES = "abcdefghijk"
PIPELINE_MARK = "<!-- pipeline -->"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--only", default="abcdefhijk",
                        help="cases to run, e.g. a,c,e (default: all but g; g needs --pipeline)")
    parser.add_argument("--pipeline", action="store_true",
                        help="also (g): time `lrpipe pipeline` (takes minutes)")
    parser.add_argument("--repeats", type=int, help="rounds per timing (default 3; 2 quick)")
    parser.add_argument("--sweep-repeats", type=int,
                        help="rounds per sweep timing in (d), 2n+1 in (f) (default 2; 1 quick)")
    parser.add_argument("--workers", type=int, default=2, help="parallel tasks in (d)/(f)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown results file")
    args = parser.parse_args(argv)
    args.only = set(args.only.replace(",", "")) | ({"g"} if args.pipeline else set())
    if not args.only <= set(CASES):
        parser.error(f"--only: got {sorted(args.only - set(CASES))}; allowed: letters of "
                     f"{CASES}")
    if "g" in args.only and not args.pipeline:
        parser.error("--only g: allowed only with --pipeline (it takes minutes)")
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.sweep_repeats = args.sweep_repeats or (1 if args.quick else 2)
    return args


MATMUL = f"128x784 @ 784x256 matmul, 1 thread, at start ({MATMUL_SEEN})"


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    cpu = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        cpu = found.group(1).strip() if found else cpu
    return {
        "CPU": cpu,
        "cores (usable / machine)": f"{len(os.sched_getaffinity(0))} / {os.cpu_count()}",
        "load average at start (1, 5, 15 min)": " ".join(
            Path("/proc/loadavg").read_text().split()[:3]),
        "torch": torch.__version__,
        "device": "cpu" + (f" (cuda available: {torch.cuda.get_device_name(0)}, unused)"
                           if torch.cuda.is_available() else ""),
        "torch threads per worker": "1 (set_num_threads), OMP_WAIT_POLICY="
                                    + os.environ.get("OMP_WAIT_POLICY", "unset"),
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        MATMUL: f"{matmul_ms():.2f} ms",
    }


def run_cases(args: argparse.Namespace, log: Path) -> list[Row]:
    import api_cases
    import speed_cases
    import sweep_cases

    from lrpipe.engine.config import DataConfig
    from lrpipe.engine.data import load_data

    torch.set_num_threads(1)
    rows: list[Row] = []
    quick = args.quick
    if args.only & set("abcehi"):
        data = load_data(DataConfig(root="data"), "cpu")
        small = speed_cases.subset(data, 10_000 if quick else None)
    if "a" in args.only:
        say("(a) train() vs a hand-written loop ...")
        rows += speed_cases.case_a(small, 1 if quick else 2, args.repeats)
    if "b" in args.only:
        say("(b) data path vs DataLoader(TensorDataset), a hand gather, ToTensor ...")
        rows += speed_cases.case_b(speed_cases.subset(data, 5_000 if quick else 20_000),
                                   "data", args.repeats)
    if "c" in args.only:
        say("(c) 16 rates batched vs sequential ...")
        rows += speed_cases.case_c(speed_cases.subset(data, 5_000 if quick else None),
                                   speed_cases.subset(data, 2_000 if quick else 10_000), 16,
                                   args.repeats)
    if "e" in args.only:
        say("(e) range test vs torch-lr-finder ...")
        rows += speed_cases.case_e(data, "data", 30 if quick else 100, max(3, args.repeats),
                                   max(5 * args.repeats, 6 if quick else 15))
    if "h" in args.only:
        say("(h) find_lr vs torch-lr-finder ...")
        rows += api_cases.case_h(data, 30 if quick else 100, max(3, args.repeats))
    if "i" in args.only:
        say("(i) one MLP epoch vs its GEMM floor ...")
        rows += speed_cases.case_i(small, max(3, args.repeats))
    if args.only & set("dfgj"):
        sweep_cases.warm_up(log)
    if "j" in args.only:
        say("(j) a small lrpipe sweep as a fresh process vs a hand-loop script ...")
        rows.append(sweep_cases.case_j(log, max(2, args.sweep_repeats)))
        rows.append(sweep_cases.case_j_startup(log, 3))
    if args.only & set("df"):
        say(f"(d, f) the default sweep: threads, serial, dask, plain train() "
            f"({args.sweep_repeats} rounds) ...")
        rows += sweep_cases.case_d_f(sweep_cases.sweep_settings(quick), args.workers,
                                     args.sweep_repeats, log,
                                     "".join(sorted(args.only & set("df"))))
        if "d" in args.only:
            rows.append(sweep_cases.case_d_threads(5_000 if quick else 20_000, args.repeats))
    if "k" in args.only:
        import race_case

        say("(k) the decay comparison raced over seeds vs --prune off ...")
        rows += race_case.case_k(log, quick)
    if "g" in args.only:
        say("(g) lrpipe pipeline ...")
        rows.append(sweep_cases.case_g(log))
    return rows


def table(rows: list[Row], kept: list[str] = ()) -> str:
    """The results table; ``kept``: rows (markdown lines) of earlier runs, placed by case."""
    lines = ["| case | comparison | lrpipe s | baseline s | result | target | met | "
             "result in CPU s | floor s | lrpipe x floor | load | notes |",
             "|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|---|"]
    body = []
    for r in rows:
        def sec(v):
            return "" if v is None else f"{v:.2f}"

        met = "" if r.met is None else ("yes" if r.met else "**no**")
        cpu = "" if r.cpu_value is None else {
            "%": f"{r.cpu_value:.1f}%", "s": f"{r.cpu_value:.1f} CPU s"}.get(
                r.unit, f"{r.cpu_value:.2f}x")
        multiple = r.floor_multiple()
        body.append(f"| {r.case} | {r.what} | {sec(r.lrpipe_s)} | {sec(r.baseline_s)} | "
                    f"{r.value_text()} | {r.target} | {met} | {cpu} | {sec(r.floor_s)} | "
                    f"{'' if multiple is None else f'{multiple:.2f}x'} | {r.load:.1f} | "
                    f"{r.note} |")
    # sorted() is stable: within a case, rows keep their order; case g stays on its own line.
    return "\n".join(lines + sorted([*body, *kept], key=lambda line: line[2]))


def previous_rows(path: Path, cases_run: set[str]) -> list[str]:
    """Table rows of an earlier results file for the cases this run skipped (not g)."""
    if not path.exists():
        return []
    columns = table([]).splitlines()[0].count("|")  # rows of an older layout are dropped
    return [line for line in path.read_text().splitlines()
            if re.match(r"\| [a-fh-k] \|", line) and line[2] not in cases_run
            and line.count("|") == columns]


def previous_pipeline(path: Path) -> str | None:
    """The pipeline line of an earlier results file (kept when this run skips (g))."""
    if not path.exists():
        return None
    lines = [ln for ln in path.read_text().splitlines() if ln.endswith(PIPELINE_MARK)]
    return lines[0] if lines else None


def report(rows: list[Row], info: dict, args: argparse.Namespace, seconds: float) -> str:
    pipeline = next((r for r in rows if r.case == "g"), None)
    if pipeline is not None:
        g_line = (f"- (g) `make sweep` (lrpipe pipeline, setup excluded): {pipeline.value:.0f} s "
                  f"on {info['date']}, load {pipeline.load:.1f}; {pipeline.note} {PIPELINE_MARK}")
    else:
        g_line = previous_pipeline(args.out) or (
            f"- (g) `make sweep`: not measured yet (run `make bench ARGS=--pipeline`) "
            f"{PIPELINE_MARK}")
    kept = previous_rows(args.out, args.only)
    kept_note = (f"Rows of cases {', '.join(sorted({k[2] for k in kept}))} were not run this "
                 "time: kept from the previous results file (see their load)." if kept else "")
    mode = "quick (smoke sizes)" if args.quick else "full"
    return "\n".join([
        "# lrpipe speed bench", "",
        f"Produced by `make bench` (`bench/bench.py`), mode {mode}, cases "
        f"{','.join(sorted(args.only))}, {args.repeats} rounds per timing ({args.sweep_repeats} "
        f"per sweep in (d), {2 * args.sweep_repeats + 1} in (f)), medians; {seconds:.0f} s in "
        "all. Result = baseline s / lrpipe s (higher is faster) unless it is a share; targets "
        "are judged on wall time. The machine is shared: compare rows by their load (2.0 "
        "fills 2 cores); for one-thread cases the same ratio in CPU seconds of this process "
        "is given, which load moves less.",
        "",
        "| machine | |", "|---|---|", *[f"| {k} | {v} |" for k, v in info.items()],
        f"| load average at end | {load_average():.2f} |",
        f"| the same matmul at end | {matmul_ms():.2f} ms |", "",
        table([r for r in rows if r.case != "g"], kept), "", kept_note, "", g_line, "",
        "Cases: (a) training only = train()'s `time_s` (its evaluation and epoch-0 evaluation "
        "excluded) against the hand loop's training time; whole call = train() against the "
        "hand loop plus the same evaluation. (b) one MLP epoch and data alone. (c) whole runs "
        "(training + per-epoch evaluation), sequential = train() one after another. (d) wall "
        "time of `flows.lr_sweep.run` per runner. (e) LRFinder construction + range_test + "
        "reset vs range_test_config (snapshot and restore included on both sides). (h) "
        "the same, with lrpipe.find_lr on a plain nn.Sequential (seeds=1) fed the user's "
        "DataLoader or its tensors; target <= 1.1x LRFinder's time on the loader. (f) "
        "attributed inside each flow run (bench/flow_clock.py): (start + end without the "
        "figures + non-training CPU seconds while training / tasks) / flow wall time; "
        "lrpipe s = the flow, baseline s = the flow less that overhead. The cross-check in "
        "the note: (flow - plain) / flow, plain = the same train() calls on the same threads "
        "and the same figures. (i) one epoch of the MLP: train() (whole call, and its "
        "`time_s`) over the same work's GEMMs timed alone. (j) wall and CPU seconds of each "
        "command as a child process (resource.getrusage(RUSAGE_CHILDREN) before and after). "
        "Floor s: the GEMMs of lrpipe's side (per layer the forward addmm, the weight-gradient "
        "mm and, past the first layer, the input-gradient mm, at the step's shapes; for "
        "evaluation the forward addmm per 4096 rows) timed alone on one thread in the same run "
        "(bench/floor.py); for data-only rows, copying the epoch's bytes as contiguous slices.",
        ""])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine()
    say(f"lrpipe bench: {info['CPU']}, cores {info['cores (usable / machine)']}, load "
        f"{info['load average at start (1, 5, 15 min)']}, torch {info['torch']}, one-thread "
        f"matmul {info[MATMUL]} ({MATMUL_SEEN})")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lrpipe-bench-") as tmp:
        # A throwaway MLflow store: bench runs stay out of the project's UI.
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlruns/mlflow.db"
        Path(tmp, "mlruns").mkdir()
        log = Path(tmp) / "flows.log"
        try:
            rows = run_cases(args, log)
        finally:
            if log.exists():
                kept = HERE / "results-flows.tmp"  # git-ignored
                kept.write_text(log.read_text())
                say(f"flow output: {kept}")
    text = report(rows, info, args, time.perf_counter() - start)
    args.out.write_text(text)
    say("\n" + table(rows) + f"\n\nwritten to {args.out}")
    missed = [r for r in rows if r.met is False]
    for r in missed:
        say(f"target missed: ({r.case}) {r.what}: {r.value_text()} (target {r.target})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
