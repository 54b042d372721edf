"""The learning-rate sweep: one training per rate, overlaid (the article's Figure 2).

Pure design and analysis: the configs to train (``check``), the per-rate summary and the best
rate. The flow ``flows.lr_sweep`` trains, logs and draws what this module plans.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from lrpipe.engine.config import ConfigError, TrainConfig, check_number, merge

EXPERIMENT = "lr-sweep"
# 1.0 and 3.0 diverge for the default MLP, within its first 13 and 3 updates: shown, marked
DEFAULT_LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
DEFAULT_EPOCHS = 5
SUMMARY_COLUMNS = ["lr", "status", "val_loss", "val_error", "best_val_error", "diverged_epoch",
                   "run_id"]


def sweep_configs(base: TrainConfig, lrs) -> list[TrainConfig]:
    """One config per rate; bad rates are a ConfigError naming ``lrs`` before any work."""
    if isinstance(lrs, (str, bytes)) or not hasattr(lrs, "__iter__") or len(lrs) == 0:
        raise ConfigError(f"lrs: got {lrs!r}; allowed: a non-empty list of finite rates > 0")
    for lr in lrs:
        check_number("lrs", lr, low=0.0, low_open=True)
    if len(set(lrs)) != len(lrs):
        raise ConfigError(f"lrs: got {list(lrs)}; allowed: distinct rates")
    return [merge(base, {"optim.lr": float(lr)}) for lr in sorted(lrs)]


def base_config(epochs: int, overrides: Mapping | None) -> TrainConfig:
    """The default config with ``epochs`` and the user's overrides."""
    return merge(TrainConfig(), {"epochs": epochs, **(overrides or {})})


def check(lrs: Sequence[float] | None = None, epochs: int = DEFAULT_EPOCHS,
          overrides: Mapping | None = None,
          experiment: str = EXPERIMENT) -> tuple[dict, list[TrainConfig]]:
    """The flow's keyword arguments and its configs, or a ConfigError naming the field."""
    lrs = list(DEFAULT_LRS) if lrs is None else lrs
    cfgs = sweep_configs(base_config(epochs, overrides), lrs)
    return {"lrs": list(lrs), "epochs": epochs, "overrides": overrides,
            "experiment": experiment}, cfgs


def summarize(results: list[dict]) -> pd.DataFrame:
    """One row per rate, sorted by rate."""
    return pd.DataFrame(results)[SUMMARY_COLUMNS].sort_values("lr").reset_index(drop=True)


def best_rate(summary: pd.DataFrame) -> pd.Series | None:
    """The finished ("ok") rate of lowest final validation loss; None when none finished."""
    ok = summary[summary["status"] == "ok"]
    return None if ok.empty else ok.loc[ok["val_loss"].idxmin()]


def summary_text(summary: pd.DataFrame, seconds: float) -> str:
    """The per-rate table and the best rate, as the terminal shows them."""
    n = len(summary)
    lines = [f"\nlr_sweep: {n} rate{'s' if n != 1 else ''} in {seconds:.0f} s",
             summary.drop(columns=["run_id"]).to_string(index=False, float_format="%.4g")]
    best = best_rate(summary)
    if best is None:
        lines.append("Every rate diverged: lower the rates (e.g. LRS=0.0001,0.001,0.01).")
    else:
        lines.append(f"Best rate: lr={best['lr']:g}  validation loss {best['val_loss']:.4f}, "
                     f"validation accuracy {1 - best['val_error']:.4f}")
    return "\n".join(lines)


# The pipeline's sweep stage draws the landscape around the chosen rate, as the article's
# Figure 2 does: from clearly too small to a rate that blows up. Decades below and above the
# chosen rate, half a decade apart: for the default MLP (chosen about 0.1) that is 0.001 to
# 3.16, where 1 oscillates and 3.16 diverges (measured: bench/divergence_probe.py).
LANDSCAPE_BELOW = 2.0  # decades below the chosen rate
LANDSCAPE_ABOVE = 1.5  # decades above it
LANDSCAPE_PER_DECADE = 2


def landscape_rates(chosen: float, also: Sequence[float] = (),
                    below: float = LANDSCAPE_BELOW, above: float = LANDSCAPE_ABOVE,
                    per_decade: int = LANDSCAPE_PER_DECADE) -> list[float]:
    """``chosen`` x 10^(k / per_decade) from ``below`` decades under it to ``above`` over it,
    with the rates in ``also`` (the search's neighbours), sorted, each once (a rate within
    1% of another is the same rate: the one already listed is kept, the chosen rate first).
    Spans below + above decades (3.5 by default; the issue asks for at least two)."""
    check_number("chosen", chosen, low=0.0, low_open=True)
    lo, hi = round(-below * per_decade), round(above * per_decade)
    steps = [chosen * 10 ** (k / per_decade) for k in range(lo, hi + 1) if k != 0]
    out: list[float] = [float(chosen)]
    for r in [float(x) for x in also] + steps:
        if not any(abs(r / o - 1) < 0.01 for o in out):
            out.append(r)
    return sorted(out)
