"""What ``lrpipe optimizers`` tells its user: the terminal summary and the report.

From the comparison's results (``flows.optimizer_compare``: the surface race, the rate
searches, the real-data table and its winner against the runner-up, the Rprop arms and the
second-order sentences), the lines printed at the end and the markdown report on the parent
run (the winner's test figure, from its retraining on fresh seeds, reported beside the
choice). Nothing here trains or decides.
"""

from __future__ import annotations

import pandas as pd

from flows import optimizer_second_order as second
from flows.optimizer_surfaces import surface_answer
from flows.report import publish_flow_report
from lrpipe import tracking
from lrpipe.experiments import optimizers as real
from lrpipe.experiments.final import TEST_HEADING, test_table
from lrpipe.experiments.surfaces import FRESH_STARTS, LR_GRID

SEARCH_NOTE = ("Every optimizer's rate comes from the same search: 8 one-epoch trainings from "
               "the same initial weights and batch order (seed 0) at 1e-5, 1e-4, ..., 1 and "
               "then at the best decade's half-decade neighbours; the lowest validation loss "
               "wins. Same budget for all; a short budget favours fast starters.")


def second_order_lines(out: dict) -> list[str]:
    """One sentence each on the race, full-batch L-BFGS and the step cost (those that ran)."""
    lines = []
    if not out.get("race", pd.DataFrame()).empty:
        lines.append(second.race_sentence(out["race"]))
    if not out.get("full_batch", pd.DataFrame()).empty:
        lines.append(second.full_batch_sentence(out["full_batch"]))
    if not out.get("cost", pd.DataFrame()).empty:
        lines.append(second.cost_sentence(out["cost"]))
    return lines


def print_summary(out: dict, parent: str, experiment: str, seconds: float) -> None:
    print(f"\noptimizer_compare: done in {seconds:.0f} s")
    if not out["surfaces"].empty:
        print(f"\nSurfaces: each optimizer's rate tuned on the same {len(LR_GRID)}-rate grid "
              "with the same step budget, from the same start\n(lr = tuned rate, "
              "final_distance = distance to the nearest minimum after the budget, in-sample: "
              "from the start the rate was tuned on;\nfresh_median_distance = the median from "
              f"{FRESH_STARTS} start points around it, out of sample):")
        print(surface_answer(out["surfaces"]).to_string(float_format="%.3g"))
    if "searches" in out:
        print(f"\nReal data: {out['data']}. {SEARCH_NOTE}")
        for s in out["searches"]:
            print(f"  {s['optimizer']:<14} {s['reason']}")
    if not out.get("real", pd.DataFrame()).empty:
        print("\nFinal validation error at each optimizer's own rate (mean ± std over seeds):")
        print(out["real"][["optimizer", "lr", "val_error", "val_loss_mean", "diverged"]]
              .to_string(index=False, float_format="%.4g"))
        best = out["real"].iloc[0]
        print(f"Best on real data: {best['optimizer']} at lr {best['lr']:.3g}, validation "
              f"error {best['val_error']}")
        if out.get("real_versus"):
            print(out["real_versus"])
        if out.get("test_line"):
            print(out["test_line"])
    if not out.get("rprop", pd.DataFrame()).empty:
        print("\nRprop full batch against mini-batch (same subset, rate and seeds):")
        print(out["rprop"][["batch", "epochs", "updates", "val_error", "val_loss_mean",
                            "diverged"]].to_string(index=False, float_format="%.4g"))
        print(real.rprop_claim(out["rprop"]))
    for line in second_order_lines(out):
        print(f"\n{line}")
    print(f"MLflow: {tracking.run_url(parent, experiment)}  (start the UI with `make ui`)")


def report_optimizers(out: dict, parent: str, experiment: str) -> None:
    """The flow's report: the real-data winner (or the surfaces' table) and the evidence."""
    real_table = out.get("real", pd.DataFrame())
    if not real_table.empty:
        best = real_table.iloc[0]
        answer = (f"Best on real data: {best['optimizer']} at its own rate {best['lr']:.3g} "
                  f"(validation error {best['val_error']})")
        if out.get("real_versus"):
            answer += f"; {out['real_versus']}"
        table = real_table
    else:
        answer, table = "Tuned rate and final distance to the minimum per surface", \
            out["surfaces"]
    evidence = [out["test_line"]] if out.get("test_line") else []
    evidence += [f"{s['optimizer']}: {s['reason']}" for s in out.get("searches", [])]
    if not out.get("rprop", pd.DataFrame()).empty:
        evidence.append(real.rprop_claim(out["rprop"]))
    tables = {"Rprop: full batch vs mini-batch": out["rprop"]} if not out.get(
        "rprop", pd.DataFrame()).empty else {}
    if out.get("test"):
        tables[TEST_HEADING] = test_table(out["test"])
    if not out.get("race", pd.DataFrame()).empty:
        tables["Second order beside the race (no rate; evals = gradient evaluations)"] = \
            out["race"]
    publish_flow_report(parent, experiment, "Optimizers side by side", answer, table,
                        evidence=[SEARCH_NOTE, *evidence, *second_order_lines(out)],
                        tables=tables, key="optimizers")
