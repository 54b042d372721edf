"""Figures of optimizers on 2-D surfaces: contour paths, loss curves and a GIF of the race.

Input: the long-form paths of ``surfaces.compare_on_surface`` (columns surface, optimizer, lr,
step, x, y, loss, diverged), one run per (optimizer, lr). Every optimizer keeps the same colour
in every figure. Plot functions return a Figure and never save, show or log; the animation
returns GIF bytes (rendered with Pillow, in memory), which the caller persists.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import io  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from PIL import Image  # noqa: E402

from lrpipe.experiments.entries import ENTRY_NAMES  # noqa: E402
from lrpipe.experiments.surfaces import DTYPE, Surface  # noqa: E402

GRID_POINTS = 200  # contour resolution per axis
LEVELS = 24  # log-spaced contour levels
FLOOR = 1e-16  # loss axes stop at 1e-16 x the largest loss: float64's precision


def optimizer_palette() -> dict[str, tuple]:
    """A fixed colour per entry of the race (the optimizers, gains with and without
    momentum), the same in every figure."""
    return dict(zip(ENTRY_NAMES, sns.color_palette("tab10", len(ENTRY_NAMES)), strict=True))


def _axes(ax, figsize=(6.4, 5.0)):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize, layout="constrained")
        return fig, ax
    return ax.figure, ax


def _runs(surface: Surface | None, paths: pd.DataFrame):
    """(optimizer, lr, run rows by step) for every run; checks columns and the surface."""
    missing = {"optimizer", "lr", "step", "x", "y", "loss"} - set(paths.columns)
    if missing:
        raise ValueError(f"paths_df: missing columns {sorted(missing)}; allowed: the output of "
                         "compare_on_surface")
    if surface is not None and "surface" in paths and (paths["surface"] != surface.name).any():
        raise ValueError(f"paths_df: holds surfaces {sorted(paths['surface'].unique())}; "
                         f"allowed: only {surface.name!r}")
    for (name, lr), run in paths.groupby(["optimizer", "lr"], sort=False):
        yield name, float(lr), run.sort_values("step")


def _draw_surface(ax, surface: Surface, filled: bool = True) -> list:
    """Log-spaced contours of the surface within its bounds, its start and its minima.

    ``filled=False`` draws the contour lines only (GIF frames: flat colours compress well).
    Returns the marker artists (start, minima), which the animation redraws above the paths.
    """
    (x0, x1), (y0, y1) = surface.bounds
    xs, ys = np.linspace(x0, x1, GRID_POINTS), np.linspace(y0, y1, GRID_POINTS)
    gx, gy = np.meshgrid(xs, ys)
    z = surface.fn(torch.tensor(np.stack([gx, gy], axis=-1), dtype=DTYPE)).numpy()
    top = float(z.max())
    low = max(float(z[z > 0].min()), top * 1e-6)
    if filled:
        ax.contourf(gx, gy, np.clip(z, low, top), levels=np.geomspace(low, top, LEVELS),
                    norm=LogNorm(low, top), cmap="Greys_r", alpha=0.35)
    ax.contour(gx, gy, np.clip(z, low, top), levels=np.geomspace(low, top, LEVELS),
               colors="0.45", linewidths=0.5)
    markers = [ax.scatter(*surface.start, marker="o", s=60, color="black", zorder=5,
                          label="start")]
    if surface.minima:
        mx, my = zip(*surface.minima, strict=True)
        markers.append(ax.scatter(mx, my, marker="*", s=220, color="gold", edgecolors="black",
                                  zorder=5, label="minimum"))
    ax.set(xlim=(x0, x1), ylim=(y0, y1), xlabel="x", ylabel="y")
    ax.set_title(f"{surface.name}: {surface.note}" if surface.note else surface.name)
    return markers


def _label(name: str, lr: float, run: pd.DataFrame) -> str:
    diverged = "diverged" in run and bool(run["diverged"].any())
    return f"{name} (lr {lr:.2g}){', diverged' if diverged else ''}"


def plot_contour_paths(surface: Surface, paths_df: pd.DataFrame, ax=None):
    """Every run's path over the surface's contours, one colour per optimizer.

    One line per (optimizer, lr) run, labelled with its rate; the start (circle) and minima
    (stars) are markers, not lines. Paths leaving the plot bounds are clipped.
    """
    fig, ax = _axes(ax)
    _draw_surface(ax, surface)
    colours = optimizer_palette()
    for name, lr, run in _runs(surface, paths_df):
        ax.plot(run["x"], run["y"], "-", color=colours.get(name), lw=1.6, alpha=0.9,
                label=_label(name, lr, run))
    ax.legend(fontsize=7, loc="best", framealpha=0.8)
    return fig


def plot_surface_losses(paths_df: pd.DataFrame, ax=None):
    """Loss (the gap to the minimum's value 0) against step, log y, one line per run.

    The y axis stops at 1e-16 x the largest loss; exact zeros are not drawn.
    """
    fig, ax = _axes(ax, figsize=(6.4, 4.2))
    colours = optimizer_palette()
    for name, lr, run in _runs(None, paths_df):
        ax.plot(run["step"], run["loss"], "-", color=colours.get(name), lw=1.4,
                label=_label(name, lr, run))
    ax.set_yscale("log")
    positive = paths_df.loc[paths_df["loss"] > 0, "loss"]
    if len(positive):
        ax.set_ylim(bottom=max(float(positive.min()), FLOOR * float(positive.max())) / 2)
    names = sorted(paths_df["surface"].unique()) if "surface" in paths_df else []
    ax.set(xlabel="step (updates)", ylabel="loss - minimum", title=", ".join(names) or None)
    ax.legend(fontsize=7, loc="best")
    return fig


def _frame_steps(paths: pd.DataFrame, frames: int) -> np.ndarray:
    return np.unique(np.round(np.linspace(0, int(paths["step"].max()), frames)).astype(int))


def animate_paths(surface: Surface, paths_df: pd.DataFrame, frames: int = 60, fps: int = 12,
                  dpi: int = 70) -> bytes:
    """The paths drawn step by step, as the bytes of a looping GIF (the caller persists them).

    ``frames`` evenly spaced steps from 0 to the last; each run is a growing line with a dot at
    its current point. The contours, markers and legend are drawn once and only the moving
    artists are redrawn per frame (blitting): a full redraw costs ~0.3 s of CPU a frame, this
    ~10 ms. About 0.1-0.2 MB at 60 frames and dpi 70 (504 x 322 pixels).
    """
    for name, value, low in (("frames", frames, 2), ("fps", fps, 1), ("dpi", dpi, 10)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}: got {value!r}; allowed: an integer >= {low}")
    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=dpi, layout="constrained")
    try:
        markers = _draw_surface(ax, surface, filled=False)
        colours, artists = optimizer_palette(), []
        for name, lr, run in _runs(surface, paths_df):
            (line,) = ax.plot([], [], "-", color=colours.get(name), lw=1.5, animated=True,
                              label=_label(name, lr, run))
            (head,) = ax.plot([], [], "o", color=colours.get(name), ms=5, animated=True)
            artists.append((run, line, head))
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        clock = ax.text(0.02, 0.03, "", transform=ax.transAxes, fontsize=9, animated=True,
                        bbox=dict(facecolor="white", alpha=0.8, edgecolor="none"))
        images = _render_frames(ax, artists, [*markers, clock],
                                _frame_steps(paths_df, frames))
    finally:
        plt.close(fig)
    return _encode_gif(images, fps)


def _render_frames(ax, artists: list, on_top: list, steps: np.ndarray) -> list[Image.Image]:
    """One RGB image per step: the static background once, then only the moving artists."""
    fig = ax.figure
    fig.canvas.draw()
    fig.set_layout_engine("none")  # freeze the layout: the background is reused as is
    background = fig.canvas.copy_from_bbox(fig.bbox)
    clock, images = on_top[-1], []
    for step in steps:
        fig.canvas.restore_region(background)
        for run, line, head in artists:
            seen = run[run["step"] <= step]
            line.set_data(seen["x"], seen["y"])
            head.set_data(seen["x"].iloc[-1:], seen["y"].iloc[-1:])
            ax.draw_artist(line)
            ax.draw_artist(head)
        clock.set_text(f"step {step}")
        for artist in on_top:
            ax.draw_artist(artist)
        images.append(Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB"))
    return images


def _encode_gif(images: list[Image.Image], fps: int) -> bytes:
    # One palette (from the last, fullest frame) and no dithering: the unchanged background
    # is then pixel-identical between frames and Pillow stores only the changed region.
    palette = images[-1].quantize(colors=255, method=Image.Quantize.FASTOCTREE)
    frames = [im.quantize(palette=palette, dither=Image.Dither.NONE) for im in images]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:],
                   duration=round(1000 / fps), loop=0)
    return out.getvalue()
