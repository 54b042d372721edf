"""One frozen, validated config per training run.

Small frozen sub-configs (data, model, optimizer, schedule) compose into one
``TrainConfig``. Every field is checked on construction; a bad value raises
``ConfigError`` naming the field, the value and what is allowed, before any work
starts. The flattened config is what MLflow records as params, and its hash
(``config_hash``) identifies the run across re-runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DATASETS = ("fashion_mnist", "mnist", "digits")
MODELS = ("softmax", "mlp", "cnn")
# A model or dataset may also be the user's own: "package.module:callable" (engine.plugins).
PLUGIN_SEPARATOR = ":"
# Validation examples drawn from the training split when data.val_size is not set.
DEFAULT_VAL_SIZE = {"fashion_mnist": 10_000, "mnist": 10_000, "digits": 300}
PLUGIN_VAL_FRACTION = 0.2  # of a plug-in loader's training examples


def is_plugin(name: object) -> bool:
    """Whether a model or dataset name is a ``package.module:callable`` plug-in."""
    return isinstance(name, str) and PLUGIN_SEPARATOR in name
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "rprop", "gains")
SCHEDULES = (
    "constant", "step", "multistep", "exponential", "cosine", "onecycle", "inverse_time", "plateau",
)
LOSSES = ("cross_entropy", "mse")
BATCHING = ("auto", "on", "off")
# x initial loss, x epoch-0 validation loss, x epoch-0 validation error: TrainConfig's
# docstring has the figures (bench/divergence_probe.py).
DEFAULT_DIVERGE_FACTOR = 1000.0
DEFAULT_NO_PROGRESS_RATIO = 0.7
DEFAULT_NO_PROGRESS_ERROR_RATIO = 0.5


class ConfigError(ValueError):
    """A config field holds a value that is not allowed; the message names the field."""


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{field_name}: got {value!r}; allowed: {allowed}")


def check_choice(field_name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(field_name, value, ", ".join(choices))


def check_number(
    field_name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    integer: bool = False,
) -> None:
    """Check that ``value`` is a finite real (or int) within [low, high] (``low_open``: > low)."""
    kind = "an integer" if integer else "a finite number"
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"<= {high:g}")
    allowed = kind + (" " + " and ".join(bounds) if bounds else "")
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        _fail(field_name, value, allowed)
    if not math.isfinite(value):
        _fail(field_name, value, allowed)
    if low is not None and (value <= low if low_open else value < low):
        _fail(field_name, value, allowed)
    if high is not None and value > high:
        _fail(field_name, value, allowed)


@dataclass(frozen=True)
class DataConfig:
    """Which examples a run sees.

    dataset: fashion_mnist | mnist | digits (scikit-learn's 1,797 8x8 digits, for fast tests),
        or your own loader as ``package.module:load`` (``lrpipe.engine.plugins``).
    root: folder holding torchvision's dataset folders (``<root>/FashionMNIST/raw``).
    val_size: examples held out of the training split for validation (count, not fraction);
        None: the dataset's default (DEFAULT_VAL_SIZE; a fifth of a plug-in's training split).
    subset: if set, train on this many examples of the remaining training split (seeded).
    classes: if set, keep only these labels, relabelled 0..k-1 in the given order (transfer tasks).
    per_class: if set, keep at most this many training examples per class (few-shot targets).
    split_seed: seeds the validation split and the subset; independent of the run's seed.
    """

    dataset: str = "fashion_mnist"
    root: str = "data"
    val_size: int | None = None
    subset: int | None = None
    classes: tuple[int, ...] | None = None
    per_class: int | None = None
    split_seed: int = 0

    def __post_init__(self) -> None:
        if not is_plugin(self.dataset):
            check_choice("data.dataset", self.dataset, DATASETS)
        if not isinstance(self.root, str) or not self.root:
            _fail("data.root", self.root, "a non-empty folder path")
        if self.val_size is not None:
            check_number("data.val_size", self.val_size, low=1, integer=True)
        if self.subset is not None:
            check_number("data.subset", self.subset, low=1, integer=True)
        if self.per_class is not None:
            check_number("data.per_class", self.per_class, low=1, integer=True)
        check_number("data.split_seed", self.split_seed, low=0, integer=True)
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(self.classes))
            if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
                _fail("data.classes", self.classes, "at least 2 distinct labels 0..9")
            for c in self.classes:
                check_number("data.classes", c, low=0, high=9, integer=True)


@dataclass(frozen=True)
class ModelConfig:
    """The network.

    name: softmax (one linear layer: the classic LR-plot network) | mlp | cnn, or your own
        factory as ``package.module:build`` (``build(seed) -> nn.Module``; hidden and dropout
        are then the factory's business).
    hidden: widths of the MLP's hidden layers (units); ignored by softmax and cnn.
    dropout: probability of zeroing a hidden unit during training (MLP and CNN), 0 = off.
    """

    name: str = "mlp"
    hidden: tuple[int, ...] = (256,)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not is_plugin(self.name):
            check_choice("model.name", self.name, MODELS)
        object.__setattr__(self, "hidden", tuple(self.hidden))
        if self.name == "mlp" and not self.hidden:
            _fail("model.hidden", self.hidden, "at least one positive width for mlp")
        for h in self.hidden:
            check_number("model.hidden", h, low=1, integer=True)
        check_number("model.dropout", self.dropout, low=0.0, high=1.0)
        if self.dropout >= 1.0:
            _fail("model.dropout", self.dropout, "a probability in [0, 1)")


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer and its base learning rate.

    name: sgd | momentum (classical) | nesterov | adagrad | rmsprop | adam | rprop | gains
        (per-weight adaptive gains, Hinton's lecture 6d).
    lr: base learning rate (per update, for a mean loss over the batch).
    momentum: momentum coefficient for momentum, nesterov and gains; ignored by the others.
    weight_decay: L2 penalty coefficient added to the gradient (x weight), 0 = off.
    lr_mult: per-layer multipliers of the base rate, by layer name (``{"head": 10}``), as in
        Caffe's lr_mult. A multiplier of 0 freezes that layer. Unknown names are an error at
        optimizer construction, where the model's layer names are known.
    """

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_mult: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        check_choice("optim.name", self.name, OPTIMIZERS)
        check_number("optim.lr", self.lr, low=0.0, low_open=True)
        check_number("optim.momentum", self.momentum, low=0.0, high=1.0)
        if self.momentum >= 1.0:
            _fail("optim.momentum", self.momentum, "a finite number >= 0 and < 1")
        check_number("optim.weight_decay", self.weight_decay, low=0.0)
        mults = self.lr_mult.items() if isinstance(self.lr_mult, Mapping) else self.lr_mult
        try:
            pairs = tuple(sorted((str(k), v) for k, v in mults))
        except (TypeError, ValueError):
            _fail("optim.lr_mult", self.lr_mult, "a mapping of layer name to multiplier >= 0")
        for name, mult in pairs:
            check_number(f"optim.lr_mult[{name}]", mult, low=0.0)
        object.__setattr__(self, "lr_mult", pairs)


@dataclass(frozen=True)
class ScheduleConfig:
    """How the rate changes over training. Units are epochs unless a field says otherwise.

    name: constant | step | multistep | exponential | cosine | onecycle | inverse_time | plateau.
    warmup_epochs: linear warmup from ``warmup_start`` x lr to lr over this many epochs, then the
        schedule (0 = none). Fractions of an epoch are allowed.
    warmup_start: the warmup's first rate as a fraction of lr.
    final_decay: target ratio first/last rate over the budget (about 100x); step and exponential
        schedules derive gamma from it when ``gamma`` is None; cosine decays to lr/final_decay.
    step_size: epochs between decays (step).
    milestones: epochs at which the rate is multiplied by gamma (multistep).
    gamma: decay factor per step/milestone/epoch; None = derived from final_decay.
    inverse_k: k in lr0 / (1 + k t), t in epochs; None = derived from final_decay.
    patience: epochs without validation improvement before plateau decays by ``plateau_factor``.
    plateau_factor: plateau's decay factor (0 < f < 1).
    per_batch: step the schedule every batch (smooth) instead of every epoch; onecycle always is.
    """

    name: str = "constant"
    warmup_epochs: float = 0.0
    warmup_start: float = 0.1
    final_decay: float = 100.0
    step_size: int = 2
    milestones: tuple[int, ...] = ()
    gamma: float | None = None
    inverse_k: float | None = None
    patience: int = 1
    plateau_factor: float = 0.1
    per_batch: bool = True

    def __post_init__(self) -> None:
        check_choice("schedule.name", self.name, SCHEDULES)
        check_number("schedule.warmup_epochs", self.warmup_epochs, low=0.0)
        check_number("schedule.warmup_start", self.warmup_start, low=0.0, high=1.0, low_open=True)
        check_number("schedule.final_decay", self.final_decay, low=1.0)
        check_number("schedule.step_size", self.step_size, low=1, integer=True)
        object.__setattr__(self, "milestones", tuple(self.milestones))
        for m in self.milestones:
            check_number("schedule.milestones", m, low=1, integer=True)
        if list(self.milestones) != sorted(set(self.milestones)):
            _fail("schedule.milestones", self.milestones, "strictly increasing epochs >= 1")
        if self.gamma is not None:
            check_number("schedule.gamma", self.gamma, low=0.0, high=1.0, low_open=True)
        if self.inverse_k is not None:
            check_number("schedule.inverse_k", self.inverse_k, low=0.0)
        check_number("schedule.patience", self.patience, low=0, integer=True)
        check_number("schedule.plateau_factor", self.plateau_factor, low=0.0, high=1.0,
                     low_open=True)
        if self.plateau_factor >= 1.0:
            _fail("schedule.plateau_factor", self.plateau_factor, "0 < plateau_factor < 1")
        if not isinstance(self.per_batch, bool):
            _fail("schedule.per_batch", self.per_batch, "true or false")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run depends on.

    epochs: passes over the training data (epochs, not steps).
    batch_size: examples per update.
    seed: seeds the weights, the shuffling and dropout of this run.
    device: auto (cuda when available, else cpu) | cpu | cuda | cuda:N.
    loss: cross_entropy | mse (squared error of the outputs against one-hot targets).
    eval_train_size: training examples evaluated after each epoch for the train curves
        (in eval mode, fixed and seeded, so the train/validation gap is measured fairly);
        None = as many as the validation split.
    diverge_factor: a batch loss (or an evaluated training loss) above this multiple of the
        initial (epoch 0, evaluated) training loss counts as divergence and stops the run
        (x initial loss); a non-finite loss always does, whatever the factor. A loss that
        oscillates below it is trained to the last epoch. Why 1000 (bench/divergence_probe.py:
        Fashion-MNIST, SGD, batch 128, 5 epochs, seeds 0-2, largest batch loss / initial
        loss): runs that come back reach at most 217x (softmax at lr 10, ending at validation
        error 0.21-0.31; 10-22x at lr 1, 5-11x at lr 0.5, which the old factor 10 stopped),
        the MLP 1.0-1.7x at lr <= 0.5 and 8-12x at lr 1 (errors 0.63-0.70). Runs that cannot
        come back pass it: the MLP at lr 2 reached 108-1953x (errors 0.77-0.86, chance 0.9),
        at lr 3 1.6e5-6.7e6x, at lr 5 1e20-1e29x (finite, error 0.88-0.89: never back), at lr
        10 5e33x before NaN within 28 steps. 1000 sits 4.6x above the largest that came back;
        the two MLPs at lr 2 under it train on and end ``no_progress`` (below).
    no_progress_ratio: a run that trained to its last epoch ends ``no_progress`` instead of
        ``ok`` when its final validation loss is at least this fraction of its epoch-0
        validation loss (x epoch-0 validation loss) and its final validation error at least
        ``no_progress_error_ratio`` x epoch 0's (the error is left out where it is NaN, a
        user's non-classifying loss); never for a given model (fine-tuning: its epoch 0 is
        not chance). Why 0.7 (same probe): the MLP at lr 1 ended at 0.73-0.86
        (errors 0.63-0.70 from about 0.9: barely better than chance) and at lr 2 at 1.2-1.5;
        every run that learned and ended above 0.7 was the softmax net at lr >= 0.3 (0.81 to
        37x: overconfident, errors 0.17-0.35), which the error ratio keeps ``ok``; the MLP at
        lr 0.001-0.5 ended at 0.15-0.33.
    no_progress_error_ratio: the error's half of that rule (x epoch-0 validation error). Why
        0.5: every run that learned ended at 0.14-0.40 of its epoch-0 error (0.13-0.35 from
        0.87-0.95), the near-chance MLPs at 0.68-0.74 (lr 1) and 0.82-0.94 (lr 2).
    log_every: every this many updates (steps, not epochs), record each member's smoothed
        batch loss in the result's ``step_log`` (global step, 1-based; an exponential moving
        average with bias correction, beta ``lrpipe.engine.loop.STEP_LOSS_BETA``); 0 = off
        (the default: per-epoch rows stay the unit, and the loop then reads no batch loss).
    batching: auto | on | off: whether configs that differ only in rate, seed or schedule
        train as one batched computation (K members stacked on a leading axis) or one after
        another. auto follows the rule written down in ``lrpipe.engine.many.batching_rule`` (on for
        CUDA; on the CPU, on for softmax regression and off for the MLP and CNN, from the
        measured figures there); on batches whatever the engine can batch (not rprop, gains or
        plateau: those still train alone); off never batches. Members of one batched group
        share it. ``true``/``false`` mean on/off: YAML 1.1, which reads ``--set`` values and
        config files, turns a bare ``on``/``off`` into them. It is part of the config hash,
        as ``device`` is: in float32 a batched run differs slightly from a lone one
        (FIELD_NOTES), so a resumed sweep reuses only runs declared the same way, and re-running
        with another ``batching`` trains afresh. The MLflow tag ``trained`` records what auto
        chose for each run.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    epochs: int = 5
    batch_size: int = 128
    seed: int = 0
    device: str = "auto"
    loss: str = "cross_entropy"
    eval_train_size: int | None = None
    diverge_factor: float = DEFAULT_DIVERGE_FACTOR
    no_progress_ratio: float = DEFAULT_NO_PROGRESS_RATIO
    no_progress_error_ratio: float = DEFAULT_NO_PROGRESS_ERROR_RATIO
    log_every: int = 0
    batching: str = "auto"

    def __post_init__(self) -> None:
        for name, cls in (("data", DataConfig), ("model", ModelConfig), ("optim", OptimConfig),
                          ("schedule", ScheduleConfig)):
            if not isinstance(getattr(self, name), cls):
                _fail(name, getattr(self, name), f"a {cls.__name__}")
        check_number("epochs", self.epochs, low=1, integer=True)
        check_number("batch_size", self.batch_size, low=1, integer=True)
        check_number("seed", self.seed, low=0, integer=True)
        check_device(self.device)
        check_choice("loss", self.loss, LOSSES)
        if self.eval_train_size is not None:
            check_number("eval_train_size", self.eval_train_size, low=1, integer=True)
        check_number("diverge_factor", self.diverge_factor, low=1.0, low_open=True)
        for name in ("no_progress_ratio", "no_progress_error_ratio"):
            check_number(name, getattr(self, name), low=0.0, high=1.0, low_open=True)
        check_number("log_every", self.log_every, low=0, integer=True)
        if isinstance(self.batching, bool):  # YAML 1.1 read a bare on/off (see the docstring)
            object.__setattr__(self, "batching", "on" if self.batching else "off")
        check_choice("batching", self.batching, BATCHING)
        if self.data.subset is not None and self.batch_size > self.data.subset:
            _fail("batch_size", self.batch_size, f"<= data.subset ({self.data.subset})")

    @property
    def no_progress(self) -> tuple[float, float]:
        """(no_progress_ratio, no_progress_error_ratio), as the loop's ``fit`` takes them."""
        return self.no_progress_ratio, self.no_progress_error_ratio

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with fields changed, dotted for sub-fields: ``replace(**{"optim.lr": 1})``."""
        return from_dict(_merge(to_dict(self), changes))

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def flat(self) -> dict[str, Any]:
        return flatten(self)

    def hash(self) -> str:
        return config_hash(self)


def check_device(value: Any) -> None:
    allowed = "auto, cpu, cuda, cuda:N"
    if not isinstance(value, str):
        _fail("device", value, allowed)
    if value in ("auto", "cpu", "cuda"):
        return
    if value.startswith("cuda:") and value[5:].isdigit():
        return
    _fail("device", value, allowed)


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig,
             "schedule": ScheduleConfig}


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Nested plain dict (tuples as lists, lr_mult as a dict): JSON and YAML friendly."""
    out = dataclasses.asdict(cfg)
    out["optim"]["lr_mult"] = dict(cfg.optim.lr_mult)
    return json.loads(json.dumps(out))


def from_dict(values: Mapping[str, Any]) -> TrainConfig:
    """Build a TrainConfig from a nested dict; unknown keys are an error naming the allowed ones."""
    if not isinstance(values, Mapping):
        _fail("config", values, "a mapping of field names to values")
    top = {f.name for f in dataclasses.fields(TrainConfig)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in top:
            _fail(f"config.{key}", "unknown field", ", ".join(sorted(top)))
        if key in _SECTIONS:
            if isinstance(value, _SECTIONS[key]):
                kwargs[key] = value
                continue
            if not isinstance(value, Mapping):
                _fail(key, value, "a mapping of its fields")
            names = {f.name for f in dataclasses.fields(_SECTIONS[key])}
            for sub in value:
                if sub not in names:
                    _fail(f"{key}.{sub}", "unknown field", ", ".join(sorted(names)))
            kwargs[key] = _SECTIONS[key](**value)
        else:
            kwargs[key] = value
    return TrainConfig(**kwargs)


def _merge(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(base))
    for key, value in changes.items():
        parts = key.split(".")
        if len(parts) == 1:
            out[key] = value
        elif len(parts) == 2:
            if parts[0] not in _SECTIONS:
                _fail(key, "unknown section", ", ".join(_SECTIONS))
            out[parts[0]][parts[1]] = value
        else:
            _fail(key, "too deeply dotted", "field or section.field")
    return out


def merge(cfg: TrainConfig, changes: Mapping[str, Any]) -> TrainConfig:
    """Apply dotted overrides (``{"optim.lr": 0.1, "epochs": 3}``) to a config."""
    return from_dict(_merge(to_dict(cfg), changes))


def flatten(cfg: TrainConfig) -> dict[str, Any]:
    """``{"optim.lr": 0.1, "model.hidden": "[256]", ...}``: one MLflow param per field."""
    flat: dict[str, Any] = {}
    for key, value in to_dict(cfg).items():
        if isinstance(value, dict) and key in _SECTIONS:
            for sub, v in value.items():
                flat[f"{key}.{sub}"] = json.dumps(v) if isinstance(v, (list, dict)) else v
        else:
            flat[key] = value
    return flat


def config_hash(cfg: TrainConfig) -> str:
    """Stable 16-hex-digit hash of the config's content (same config, same hash, any process)."""
    text = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
