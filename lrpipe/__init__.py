"""lrpipe: a learning-rate laboratory for PyTorch.

Subpackages by concept: ``engine`` (config, data, models, optimizers, schedules, the one
training loop), ``search`` (range test, suggestion rules, halving, regret), ``experiments``
(decay, transfer, optimizers, surfaces), ``plots`` (pure figures); and the tracking edge:
``tracking`` (the only module that imports mlflow), ``runs``, ``resume``, ``report``, ``procs``.
"""

from lrpipe.api.choose import ChooseLRResult, choose_lr
from lrpipe.api.find import FindLRResult, find_lr
from lrpipe.api.sweep import SweepResult, sweep

__all__ = ["find_lr", "FindLRResult", "choose_lr", "ChooseLRResult", "sweep", "SweepResult"]
