"""lrpipe: a learning-rate laboratory for PyTorch.

Subpackages by concept: ``engine`` (config, data, models, optimizers, schedules, the one
training loop), ``search`` (range test, suggestion rules, halving, regret), ``experiments``
(decay, transfer, optimizers, surfaces), ``plots`` (pure figures); and the tracking edge:
``tracking`` (the only module that imports mlflow), ``runs``, ``resume``, ``report``, ``procs``.

The public API is imported on first use (PEP 562): importing a light module such as
``lrpipe.engine.config`` (the ``lrpipe`` command's checks) does not pay for torch, pandas and
matplotlib, which ``lrpipe.api`` pulls in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["find_lr", "FindLRResult", "choose_lr", "ChooseLRResult", "sweep", "SweepResult"]

if TYPE_CHECKING:
    from lrpipe.api.choose import ChooseLRResult, choose_lr
    from lrpipe.api.find import FindLRResult, find_lr
    from lrpipe.api.sweep import SweepResult, sweep


def __getattr__(name: str):
    """``lrpipe.find_lr`` and the rest of ``__all__``, imported when first asked for, each
    from its own module (static imports: no import by name at run time)."""
    if name in ("find_lr", "FindLRResult"):
        from lrpipe.api import find as module
    elif name in ("choose_lr", "ChooseLRResult"):
        from lrpipe.api import choose as module
    elif name in ("sweep", "SweepResult"):
        from lrpipe.api import sweep as module
    else:
        raise AttributeError(f"module 'lrpipe' has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
