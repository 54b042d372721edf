"""Case (k): the decay comparison raced over seeds (the default) against every schedule on
every seed (``--prune off``), on the default config over three seed sets: the same winning
schedule is the condition, the CPU and wall seconds saved the gain. Each side is a fresh
``lrpipe decay`` process timed from outside (start-up, Prefect's API server and exit
included), both into one temporary MLflow store (a raced and an unraced comparison are
different parents: neither reuses the other's runs)."""

from __future__ import annotations

import io
import statistics
import sys
import tempfile
from pathlib import Path

import pandas as pd
from kit import Row, say
from sweep_cases import CommandFailed, whole_command

SEED_SETS = ((0, 1, 2), (3, 4, 5), (6, 7, 8))


def newest_answer(uri: str) -> dict:
    """The newest finished lr-decay parent's answer: best schedule, runner-up, runs trained."""
    from lrpipe import tracking

    c = tracking.client(uri)
    exp = c.get_experiment_by_name("lr-decay")
    parent = [r for r in c.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                                       order_by=["attributes.start_time DESC"], max_results=50)
              if tracking.PARENT_TAG not in r.data.tags][0]
    ranking = pd.read_csv(io.StringIO(tracking.read_text(parent.info.run_id, "ranking.csv",
                                                         uri)))
    kids = c.search_runs([exp.experiment_id],
                         f"tags.`{tracking.PARENT_TAG}` = '{parent.info.run_id}'",
                         max_results=200)
    return {"best": parent.data.tags["best_schedule"], "second": ranking["schedule"].iloc[1],
            "runs": len(kids)}


def case_k(log: Path, quick: bool) -> list[Row]:
    """Both sides per seed set, alternating which goes first."""
    epochs, extra = (2, ["--set", "data.subset=5000"]) if quick else (8, [])
    sets = SEED_SETS[:1] if quick else SEED_SETS
    lrpipe = str(Path(sys.executable).parent / "lrpipe")

    def argv(seeds, prune):
        return [lrpipe, "decay", "--lr", "0.1", "--epochs", str(epochs), "--seeds",
                ",".join(map(str, seeds)), "--losses", "cross_entropy", "--confirm-seeds",
                "none", "--prune", prune, *extra]

    measured: dict[str, list] = {"seeds": [], "off": []}
    answers: list[tuple[dict, dict]] = []
    with tempfile.TemporaryDirectory(prefix="lrpipe-race-") as folder:
        uri = f"sqlite:///{folder}/mlflow.db"
        try:
            for i, seeds in enumerate(sets):
                pair = {}
                for prune in ("seeds", "off")[::1 if i % 2 == 0 else -1]:
                    say(f"  (k) seeds {seeds}, --prune {prune} ...")
                    wall, cpu = whole_command(argv(seeds, prune), log,
                                              {"MLFLOW_TRACKING_URI": uri})
                    measured[prune].append((wall, cpu))
                    pair[prune] = newest_answer(uri)
                answers.append((pair["seeds"], pair["off"]))
        except CommandFailed as failed:
            say(f"  (k) {failed}")
            return [Row("k", "decay comparison raced vs --prune off", None, None,
                        float("nan"), met=False, note=str(failed))]
    same = [a["best"] == b["best"] for a, b in answers]
    wall = {k: statistics.median(w for w, _ in v) for k, v in measured.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in measured.items()}
    detail = "; ".join(
        f"seeds {','.join(map(str, s))}: {a['best']} (runner-up {a['second']}, {a['runs']} "
        f"runs) vs {b['best']} (runner-up {b['second']}, {b['runs']} runs)"
        for s, (a, b) in zip(sets, answers, strict=True))
    what = (f"`lrpipe decay --lr 0.1 --epochs {epochs} --losses cross_entropy --confirm-seeds "
            f"none` raced over seeds (default) vs `--prune off`, {len(sets)} seed sets, fresh "
            "processes timed from outside")
    return [Row("k", what, wall["seeds"], wall["off"], wall["off"] / wall["seeds"],
                target="same winner", met=all(same),
                note=f"winner raced vs unraced, {detail}; CPU s (RUSAGE_CHILDREN, medians) "
                     f"{cpu['seeds']:.0f} vs {cpu['off']:.0f} = "
                     f"{cpu['seeds'] / cpu['off']:.0%} of the unraced; same winner in "
                     f"{sum(same)} of {len(same)} seed sets",
                cpu_value=cpu["off"] / cpu["seeds"])]
