"""The optimizers flow's 2-D surface part: one task per (surface, optimizer) that tunes the
rate on the shared grid and logs a child run, and what the parent run gets per surface
(contour with every path, loss against step, animated GIF, summary table).

Each child logs its path (``paths.csv``) and carries ``lrpipe.resume.TASK_TAG`` (``surface_key``):
under a resumed parent a FINISHED one is reused and its result rebuilt from the path."""

from __future__ import annotations

import pandas as pd
import torch
from prefect import task

from lrpipe import procs, resume, runs, tracking
from lrpipe.experiments.surfaces import (
    LR_GRID,
    Surface,
    compare_on_surface,
    confirm_on_starts,
    fresh_summary,
    get_surface,
    summarize_paths,
)
from lrpipe.plots.surfaces import animate_paths, plot_contour_paths, plot_surface_losses

SERIES_POINTS = 21  # points of a surface child's loss series (one sqlite transaction each)


def series_steps(last: int, points: int = SERIES_POINTS) -> list[int]:
    """At most ``points`` steps evenly spread over 0..last, both ends included."""
    return sorted({round(last * i / max(1, points - 1)) for i in range(points)})


def _log_surface_run(run_id: str, paths: pd.DataFrame, summary: dict | None) -> None:
    if summary is None:
        tracking.set_tags(run_id, {"status": "diverged at every rate"})
        return
    tracking.log_metrics(run_id, {k: float(summary[k]) for k in (
        "lr", "final_loss", "final_distance", "success", "steps_to_success")
        if pd.notna(summary[k])}, step=0)
    by_step = paths.set_index("step")
    for step in series_steps(int(by_step.index.max())):
        tracking.log_metrics(run_id, {"loss": by_step.at[step, "loss"],
                                      "distance": by_step.at[step, "distance"]}, step=step)
    tracking.set_tags(run_id, {"status": "ok", "success": summary["success"]})


def surface_key(surface: Surface, optimizer: str) -> str:
    """The task key of ``optimizer`` on ``surface``: the surface's name, start and budget,
    the optimizer and the rate grid."""
    return resume.task_key("surface", {"surface": surface.name, "optimizer": optimizer,
                                       "start": list(surface.start), "steps": surface.steps,
                                       "lr_grid": list(LR_GRID)})


def _surface_result(surface: Surface, optimizer: str, paths: pd.DataFrame, run_id: str | None,
                    reused: bool = False) -> dict:
    summary = (summarize_paths(paths, surface.success_radius).iloc[0].to_dict()
               if len(paths) else None)
    lr = None if summary is None else float(summary["lr"])
    # out of sample: the tuned rate from start points it was not tuned on (cheap, and a
    # function of the surface and the rate, so a reused run recomputes it)
    fresh = None if lr is None else fresh_summary(confirm_on_starts(surface, optimizer, lr))
    return {"surface": surface.name, "optimizer": optimizer, "lr": lr, "run_id": run_id,
            "summary": summary, "paths": paths, "reused": reused, "fresh": fresh}


def reused_surface(surface: Surface, optimizer: str, parent_run_id: str) -> dict | None:
    """The result of ``optimizer`` on ``surface`` rebuilt from its FINISHED child under
    ``parent_run_id`` (its ``paths.csv``: the summary is a function of the path), or None."""
    key = surface_key(surface, optimizer)
    run = resume.finished_task(parent_run_id, key) if parent_run_id else None
    paths = None if run is None else resume.logged_table(run.info.run_id, "paths.csv")
    if paths is None:
        return None
    return _surface_result(surface, optimizer, paths, run.info.run_id, reused=True)


@task(name="surface", task_run_name="{surface_name} {optimizer}")
def compare_on_surface_task(surface_name: str, optimizer: str, parent_run_id: str,
                            experiment: str, threads: int = 1) -> dict:
    """Tune ``optimizer``'s rate on one surface (same grid and budget for all), run it from the
    surface's start, log it as a child run; return its summary row and path. Under a resumed
    parent, a FINISHED child of the same task is reused (``reused`` True)."""
    torch.set_num_threads(threads)
    surface = get_surface(surface_name)
    if (done := reused_surface(surface, optimizer, parent_run_id)) is not None:
        return done
    result = _surface_result(surface, optimizer, compare_on_surface(surface, [optimizer]), None)
    lr, paths = result["lr"], result["paths"]
    name = f"{surface_name} {optimizer} " + ("diverged" if lr is None else f"lr={lr:.3g}")
    run_id = tracking.start_run(
        experiment, name, parent_run_id=parent_run_id,
        params={"surface": surface_name, "optimizer": optimizer, "lr": lr,
                "steps": surface.steps, "start": list(surface.start),
                "lr_grid": f"{len(LR_GRID)} rates {LR_GRID[0]:g}..{LR_GRID[-1]:g}"},
        tags={"optimizer": optimizer, "surface": surface_name, "part": "surface",
              resume.TASK_TAG: surface_key(surface, optimizer), **procs.process_tags()})
    with runs.ending(run_id):
        _log_surface_run(run_id, paths, result["summary"])
        tracking.log_table(run_id, paths, "paths.csv")  # what a resumed flow rebuilds from
    return {**result, "run_id": run_id}


def describe_surface(result: dict) -> str:
    s = result["summary"]
    reused = " (finished before, reused)" if result.get("reused") else ""
    if s is None:
        return f"{result['surface']} {result['optimizer']}: every rate diverged{reused}"
    return (f"{result['surface']} {result['optimizer']}: lr {s['lr']:.3g}, distance to the "
            f"minimum {s['final_distance']:.3g}{reused}")


def log_surfaces(parent: str, results: list[dict]) -> pd.DataFrame:
    """Per surface on the parent: contour with paths, loss against step, GIF, summary table."""
    tables = []
    for name in dict.fromkeys(r["surface"] for r in results):
        frames = [r["paths"] for r in results if r["surface"] == name and len(r["paths"])]
        if not frames:
            continue  # every optimizer diverged at every rate: nothing to draw
        surface, paths = get_surface(name), pd.concat(frames, ignore_index=True)
        table = summarize_paths(paths, surface.success_radius)
        fresh = pd.DataFrame([{"optimizer": r["optimizer"], **r["fresh"]} for r in results
                              if r["surface"] == name and r.get("fresh")])
        if not fresh.empty:
            table = table.merge(fresh, on="optimizer", how="left")
        tables.append(table)
        tracking.log_figure(parent, plot_contour_paths(surface, paths), f"{name}_paths")
        tracking.log_figure(parent, plot_surface_losses(paths), f"{name}_loss")
        tracking.log_bytes(parent, animate_paths(surface, paths), f"figures/{name}.gif")
        tracking.log_table(parent, table, f"surfaces/{name}.csv")
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def surface_answer(table: pd.DataFrame) -> pd.DataFrame:
    """optimizer x surface: the tuned rate, the final distance to the minimum from the start
    it was tuned on (in-sample) and the median from the fresh starts (out of sample)."""
    if table.empty:
        return table
    values = ["lr", "final_distance"] + (["fresh_median_distance"]
                                         if "fresh_median_distance" in table else [])
    wide = table.pivot(index="optimizer", columns="surface", values=values)
    wide = wide.swaplevel(axis=1).sort_index(axis=1, level=0, sort_remaining=False)
    return wide.reindex(pd.unique(table["optimizer"]))
