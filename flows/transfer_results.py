"""The transfer flow's results: frames from the task results, the head rule against its
rivals, what goes on the parent run and what is printed at the end."""

from __future__ import annotations

import pandas as pd

from lrpipe import tracking
from lrpipe.experiments.transfer import TransferConfig, grid_table


def result_frames(results: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(strategy histories, grid histories): long-form, labelled as experiments.transfer's are."""
    strategy, grid = [], []
    for r in results:
        rows = pd.DataFrame(r["history"]).assign(
            seed=r["seed"], base_lr=r["base_lr"], head_mult=r["head_mult"], status=r["status"])
        strategy += [rows.assign(strategy=s) for s in r["strategies"]]
        if r["grid"]:
            grid.append(rows.assign(strategy="head_mult"))
    return (pd.concat(strategy, ignore_index=True),
            pd.concat(grid, ignore_index=True) if grid else pd.DataFrame())


def compare(summary: pd.DataFrame, name: str, rival: str) -> dict | None:
    """``name`` against ``rival`` on mean final val_error: beat (lower mean), gap, and clear
    (the gap exceeds both seed standard deviations); None if either is missing."""
    rows = summary.set_index("strategy")
    if name not in rows.index or rival not in rows.index:
        return None
    a, b = rows.loc[name], rows.loc[rival]
    gap = float(b["mean"] - a["mean"])
    spread = max(float(a["std"]), float(b["std"]))  # NaN with one seed: never "clear"
    return {"strategy": name, "rival": rival, "mean": float(a["mean"]), "std": float(a["std"]),
            "rival_mean": float(b["mean"]), "rival_std": float(b["std"]), "gap": gap,
            "beat": gap > 0, "clear": bool(abs(gap) > spread), "seeds": int(a["seeds"])}


def verdict_line(c: dict, tc: TransferConfig) -> str:
    """One sentence: did the head rule beat the rival, by how much, beyond seed noise or not."""
    word = "beat" if c["beat"] else "did not beat"
    how = "a clear gap, > 1 sd" if c["clear"] else "a gap within 1 sd: seed noise"
    if c["seeds"] < 2:
        how = "one seed: no spread to judge the gap by"
    return (f"head_mult (head x{tc.head_mult:g}, base lr {tc.base_lr:g}) {word} {c['rival']}: "
            f"final val error {c['mean']:.4f} ± {c['std']:.4f} vs {c['rival_mean']:.4f} ± "
            f"{c['rival_std']:.4f} (mean ± sd over {c['seeds']} seed(s); {how})")


def log_outcome(parent: str, strategy_df: pd.DataFrame, grid_df: pd.DataFrame,
                summary: pd.DataFrame) -> None:
    """Figures, tables and per-strategy final errors on the parent run."""
    from lrpipe.plots import transfer as transfer_plots  # drawing libraries load here

    tracking.log_figure(parent, transfer_plots.plot_strategy_curves(strategy_df),
                        "strategy_curves")
    tracking.log_table(parent, summary, "summary.csv")
    tracking.log_table(parent, strategy_df, "strategy_history.csv")
    if not grid_df.empty:
        tracking.log_figure(parent, transfer_plots.plot_head_mult(grid_df), "head_mult")
        tracking.log_figure(parent, transfer_plots.plot_grid_heatmap(grid_df), "grid_heatmap")
        tracking.log_table(parent, grid_frame(grid_df), "grid.csv")
    tracking.log_metrics(parent, {f"final_val_error/{row.strategy}": row.mean
                                  for row in summary.itertuples()}, step=0)


def grid_frame(grid_df: pd.DataFrame) -> pd.DataFrame:
    """grid_table as a flat frame: one row per base rate, one ``x<mult>`` column each."""
    table = grid_table(grid_df)
    table.columns = [f"x{m:g}" for m in table.columns]
    return table.reset_index()


def print_summary(tc, summary, grid_df, pre, verdicts, parent, experiment, seconds,
                  grid_seeds) -> None:
    """The end-of-flow summary on stdout: strategies, grid, answers, where to click next."""
    seeds = len(tc.seeds)
    how = "reused" if pre["reused"] else f"source val error {pre['source_val_error']:.4f}"
    print(f"\ntransfer: {len(summary)} strategies x {seeds} seeds in {seconds:.0f} s; pretrained"
          f" model {pre['model_uri']} ({how})")
    print(summary.to_string(index=False, float_format="%.4f"))
    if not grid_df.empty:
        note = (f"on the first {grid_seeds} seed(s) only, to fit the default budget"
                if grid_seeds < seeds else f"over {seeds} seeds")
        print(f"\nGrid: final val error, base rate x head multiplier ({note}):")
        print(grid_frame(grid_df).to_string(index=False, float_format="%.4f"))
    print()
    for c in verdicts:
        print(f"Answer: {verdict_line(c, tc)}")
    if not verdicts:
        print("Answer: head_mult and uniform/scratch were not both run; no comparison.")
    print(f"MLflow: {tracking.run_url(parent, experiment)}  (start the UI with `make ui`)")
