"""Racing arms over seeds: stop training the arms that cannot win, on evidence from whole runs.

A comparison of arms (decay schedules, say) over several seeds trains every arm on its first
seed (round 1), ranks the arms on that seed's final validation loss, and trains only the best
``ceil(n / RACE_ETA)`` of them (at least ``RACE_LEAST``) and the control arms on the remaining
seeds (round 2). The others are ``pruned``: their round-1 run is kept with its whole curve,
and their ranks come after every raced-through arm's, in round-1 order. This is successive
halving (Jamieson and Talwalkar 2016; Hyperband's eta = 3) whose resource is seeds, not epochs.

Why seeds, not epochs: in the default decay comparison (9 schedules, 8 epochs, 3 seeds) the
winner, plateau, ranked 4th-7th of 9 by validation loss at every epoch up to 6 and led only
from epoch 7, once it cut its rate; a median rule or ASHA on epochs would have stopped it.
Early epochs of a schedule measure its undecayed rate, not the schedule. A whole run on one
seed measures the schedule; the other seeds only narrow its band (their spread was 0.003 in
validation loss against 0.03-0.6 between schedules).

Deterministic: the rounds are synchronous (round 2 starts when round 1 has finished, whatever
order its runs finished in), so the same arms and seeds always prune the same arms. Pure
functions: tables in, names and tables out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from lrpipe.engine.config import ConfigError

RACE_ETA = 3  # keep the best third of the arms after round 1 (Hyperband's default eta)
RACE_LEAST = 2  # the best arm and a runner-up always race through (the confirmation's rival)
RACE_COLUMNS = ("arm", "round1_val_loss", "round1_rank", "race")
PRUNE_CHOICES = ("seeds", "off")


def check_prune(prune) -> str:
    """``prune`` as one of PRUNE_CHOICES (None: the default, seeds; YAML's true/false: seeds/
    off), or a ConfigError naming the field and the allowed values."""
    if prune is None or prune is True:
        return "seeds"
    if prune is False:
        return "off"
    if prune not in PRUNE_CHOICES:
        raise ConfigError(f"prune: got {prune!r}; allowed: {', '.join(PRUNE_CHOICES)}")
    return prune


def races(prune: str, arms: Sequence[str], seeds: Sequence[int],
          controls: Sequence[str] = ()) -> bool:
    """Whether a comparison of ``arms`` over ``seeds`` races: pruning on, two seeds or more,
    and more arms than race through anyway (``keep_count``) and the controls."""
    contenders = [a for a in arms if a not in controls]
    return check_prune(prune) == "seeds" and len(seeds) > 1 and \
        keep_count(len(contenders)) < len(contenders)


def planned_runs(prune: str, arms: Sequence[str], seeds: Sequence[int],
                 controls: Sequence[str] = ()) -> int:
    """How many runs the comparison trains: arms x seeds, or raced, every arm once and the
    ``keep_count`` best contenders and the controls on every other seed."""
    if not races(prune, arms, seeds, controls):
        return len(arms) * len(seeds)
    contenders = [a for a in arms if a not in controls]
    through = keep_count(len(contenders)) + len(arms) - len(contenders)
    return len(arms) + through * (len(seeds) - 1)


def keep_count(contenders: int, eta: int = RACE_ETA, least: int = RACE_LEAST) -> int:
    """How many of ``contenders`` arms (controls not counted) race through round 1:
    ``ceil(contenders / eta)``, at least ``least``, at most all of them."""
    if contenders < 0 or eta < 1 or least < 1:
        raise ValueError(f"contenders, eta, least: got {contenders}, {eta}, {least}; allowed: "
                         ">= 0, >= 1, >= 1")
    return min(contenders, max(least, math.ceil(contenders / eta)))


def round_one(finals: pd.DataFrame, controls: Sequence[str] = (), eta: int = RACE_ETA,
              least: int = RACE_LEAST) -> pd.DataFrame:
    """Round 1's verdict from each arm's first-seed final validation loss.

    Args:
        finals: one row per arm: ``arm``, ``val_loss`` (the run's last recorded epoch; NaN or
            inf for a diverged run).
        controls: arms that always race through (the baseline the verdicts compare with); they
            take no contender's place.
    Returns:
        DataFrame(RACE_COLUMNS) in round-1 order (lowest loss first, a non-finite loss last,
        ties by name): ``race`` is ``kept``, ``control`` or ``pruned``.
    """
    missing = [c for c in ("arm", "val_loss") if c not in finals.columns]
    if missing:
        raise ValueError(f"finals: missing columns {missing}; required: arm, val_loss")
    if finals["arm"].duplicated().any():
        raise ValueError("finals: one row per arm; got duplicates "
                         f"{sorted(finals.loc[finals['arm'].duplicated(), 'arm'])}")
    loss = pd.to_numeric(finals["val_loss"], errors="coerce").astype(float)
    order = finals.assign(val_loss=loss, _bad=~loss.apply(math.isfinite))
    order = order.sort_values(["_bad", "val_loss", "arm"]).reset_index(drop=True)
    contenders = [a for a in order["arm"] if a not in controls]
    kept = set(contenders[:keep_count(len(contenders), eta, least)])
    verdict = ["control" if a in controls else "kept" if a in kept else "pruned"
               for a in order["arm"]]
    return pd.DataFrame({"arm": order["arm"], "round1_val_loss": order["val_loss"],
                         "round1_rank": range(1, len(order) + 1), "race": verdict})


def racing_through(table: pd.DataFrame) -> list[str]:
    """The arms of a ``round_one`` table that train on the other seeds, in round-1 order."""
    return table.loc[table["race"] != "pruned", "arm"].tolist()


def order_ranking(ranking: pd.DataFrame, table: pd.DataFrame, arm: str = "schedule",
                  by: str = "final_val_loss_mean") -> pd.DataFrame:
    """A ranking of every arm with the race's outcome: the arms that raced through first,
    by ``by`` (ties share the lower rank), then the pruned ones in round-1 order; ``rank``
    renumbered so, and a column ``race`` (kept, control or pruned; ``table`` from
    ``round_one``). A pruned arm's figures are its one seed's, so it never outranks an arm
    measured on every seed."""
    verdict = table.set_index("arm")["race"]
    unknown = sorted(set(ranking[arm]) - set(verdict.index))
    if unknown:
        raise ValueError(f"ranking: arms {unknown} are not in the race's table")
    out = ranking.assign(race=ranking[arm].map(verdict))
    through = out[out["race"] != "pruned"].copy()
    through["rank"] = through[by].rank(method="min").astype(int)
    through = through.sort_values(["rank", arm])
    pruned = out[out["race"] == "pruned"].copy()
    pruned["_order"] = pruned[arm].map(table.set_index("arm")["round1_rank"])
    pruned = pruned.sort_values("_order").drop(columns="_order")
    pruned["rank"] = range(len(through) + 1, len(through) + len(pruned) + 1)
    return pd.concat([through, pruned], ignore_index=True)


def race_line(table: pd.DataFrame, seeds: Sequence[int], what: str = "schedules") -> str:
    """The race in one sentence, for the terminal and the report."""
    kept = table.loc[table["race"] == "kept", "arm"].tolist()
    controls = table.loc[table["race"] == "control", "arm"].tolist()
    pruned = table.loc[table["race"] == "pruned", "arm"].tolist()
    rest = ",".join(map(str, seeds[1:]))
    line = (f"Raced over seeds: all {len(table)} {what} on seed {seeds[0]}; the best "
            f"{len(kept)} ({', '.join(kept)})"
            + (f" and the control {', '.join(controls)}" if controls else "")
            + f" also on seeds {rest}")
    if pruned:
        line += (f"; pruned after seed {seeds[0]}: {', '.join(pruned)} (ranked after the "
                 f"others, on that seed's run; --prune off trains every {what[:-1]} on every "
                 "seed)")
    return line
