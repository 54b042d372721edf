"""The entries of an optimizer comparison: each a name and the ``OptimConfig`` fields it sets.

Most entries are one of the engine's optimizers (``lrpipe.engine.config.OPTIMIZERS``) at the
config's settings. Adaptive gains (Hinton's lecture 6d) enter twice because the engine's
``gains`` takes the config's momentum (0.9 by default): ``gains`` is the plain gained descent
(momentum 0) and ``gains_momentum`` the same with momentum 0.9. On Rosenbrock plain gains end
0.046 from the minimum and gains with momentum 2.7e-9: one entry would credit momentum to the
gains.
"""

from __future__ import annotations

from lrpipe.engine.config import OPTIMIZERS, TrainConfig, check_choice

GAINS_MOMENTUM = 0.9  # the momentum of ``gains_momentum``: the engine's default momentum

# entry name -> OptimConfig fields it sets (always ``name``; others as the entry needs)
ENTRIES: dict[str, dict] = {
    **{name: {"name": name} for name in OPTIMIZERS if name != "gains"},
    "gains": {"name": "gains", "momentum": 0.0},
    "gains_momentum": {"name": "gains", "momentum": GAINS_MOMENTUM},
}
ENTRY_NAMES: tuple[str, ...] = tuple(ENTRIES)


def entry_fields(entry: str, field: str = "optimizer") -> dict:
    """The OptimConfig fields of ``entry`` (a copy); ValueError naming ``field`` and the
    allowed entries otherwise."""
    check_choice(field, entry, ENTRY_NAMES)
    return dict(ENTRIES[entry])


def entry_config(cfg: TrainConfig, entry: str) -> TrainConfig:
    """``cfg`` with ``entry``'s optimizer fields set (its name, and momentum where the entry
    fixes it)."""
    return cfg.replace(**{f"optim.{k}": v for k, v in entry_fields(entry).items()})
