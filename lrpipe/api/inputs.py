"""What a user hands the API, checked before any work: data, model, loss and optimizer.

Data (``Data``) may be a ``torch.utils.data.DataLoader``, any re-iterable of ``(x, y)``
batches (a list of pairs), a callable returning a fresh iterator of them (called once per
pass), or a pair of tensors ``(x, y)`` with one row per example: the fast in-memory path,
shuffled by a seeded generator and sliced into batches of ``batch_size`` as lrpipe's own data
path does (``lrpipe.engine.data.iterate_batches``). A one-shot iterator (a generator object)
is refused: a range test restarts its data, and every seed starts again.

What a seed means for the user's model: the same starting state, a fresh and reproducible
batch order and fresh draws of torch's random stream (dropout, a DataLoader's shuffle). Inside
``BatchSource.seeded(seed)`` torch's global generator is forked (so the caller's stream is
left as it was) and seeded with ``seed``; so are a DataLoader's own generator, if it has one
(restored afterwards), and the tensors' shuffle. A fixed list of batches, or a loader that does
not shuffle, gives every seed the same order: then only random layers differ between seeds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lrpipe.engine.config import check_number
from lrpipe.engine.data import Split, iterate_batches

Batch = tuple[torch.Tensor, torch.Tensor]
Data = DataLoader | Iterable[Batch] | Callable[[], Iterator[Batch]] | tuple[torch.Tensor,
                                                                                torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerFn = Callable[[nn.Module], torch.optim.Optimizer]
DEFAULT_BATCH_SIZE = 64  # examples per batch when data are a pair of tensors

DATA_ALLOWED = ("a DataLoader, a re-iterable of (x, y) batches, a callable returning an "
                "iterator of them, or a pair of tensors (x, y)")


def describe(value: Any) -> str:
    """A few words for an error message: the type, and a tensor's shape or a tuple's length."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    kind = type(value).__name__
    article = "an" if kind[0].lower() in "aeiou" else "a"
    if isinstance(value, (tuple, list)):
        return f"{article} {kind} of {len(value)}"
    return f"{article} {kind}"


def tensor_pair(data: Any, name: str) -> Batch | None:
    """``data`` as (x, y) when it is a pair of tensors with as many rows each, else None.

    Raises:
        ValueError: a pair of tensors whose row counts differ or that holds no rows.
    """
    if not (isinstance(data, (tuple, list)) and len(data) == 2
            and all(isinstance(t, torch.Tensor) for t in data)):
        return None
    x, y = data
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"{name}: got x {describe(x)} and y {describe(y)}; allowed: tensors "
                         "with the same number of rows (one per example), at least one")
    return x, y


def restartable(data: Any, name: str) -> Callable[[], Iterator[Any]]:
    """A callable that returns a fresh iterator over ``data``'s batches, each time it is called.

    Raises:
        ValueError: ``data`` is a one-shot iterator, a string, or not iterable at all.
    """
    if isinstance(data, DataLoader):
        return lambda: iter(data)
    if isinstance(data, Iterator):
        raise ValueError(f"{name}: got a one-shot iterator ({describe(data)}); allowed: "
                         f"{DATA_ALLOWED} (pass the generator function, not its product)")
    if callable(data) and not isinstance(data, nn.Module):
        return data
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, dict)):
        return lambda: iter(data)
    hint = " (wrap a Dataset in a DataLoader)" if isinstance(data, Dataset) else ""
    raise ValueError(f"{name}: got {describe(data)}; allowed: {DATA_ALLOWED}{hint}")


def checked_batch(batch: Any, name: str) -> Batch:
    """``batch`` as (x, y), or a ValueError naming ``name`` and what a batch must be."""
    if (isinstance(batch, (tuple, list)) and len(batch) == 2
            and isinstance(batch[0], torch.Tensor) and isinstance(batch[1], torch.Tensor)
            and batch[0].dim() > 0 and batch[1].dim() > 0
            and batch[0].shape[0] == batch[1].shape[0]):
        return batch[0], batch[1]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        got = f"a batch of {describe(batch[0])} and {describe(batch[1])}"
    else:
        got = f"a batch that is {describe(batch)}"
    raise ValueError(f"{name}: got {got}; allowed: (x, y) pairs of tensors with one row per "
                     "example each")


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Within: torch's global generators seeded with ``seed``; on exit, the caller's state.

    The CPU generator is forked, and every CUDA device's once CUDA is in use (forking them
    earlier would start CUDA on a machine that has a GPU the user's model does not use).
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def built_model(model_fn: Callable[[int], nn.Module], seed: int) -> nn.Module:
    """``model_fn(seed)`` with torch's generators seeded by ``seed`` (so a factory that draws
    its initial weights from the global stream is reproducible too), checked.

    Raises:
        ValueError: the factory returned no nn.Module with a trainable parameter (names
            ``model_fn``).
    """
    with seeded_rng(seed):
        model = model_fn(seed)
    trainable_device(model, "model_fn(seed)")
    return model


class BatchSource:
    """One of the user's datasets as restartable, reseedable (x, y) batches on a device.

    Args:
        data: see ``Data`` (module docstring).
        name: the argument's name, for error messages (``data``, ``train``, ``val``).
        batch_size: examples per batch for a pair of tensors (>= 1; None = 64); must be None
            otherwise (a loader's batches have their own size).
        device: where batches go (the model's device); tensors already there are not copied.
    Raises:
        ValueError: data or batch_size not allowed (the message names which).
    """

    def __init__(self, data: Data, *, name: str, batch_size: int | None,
                 device: torch.device) -> None:
        self.name, self.device, self.data = name, device, data
        self.tensors = tensor_pair(data, name)
        if self.tensors is None:
            self.batches = restartable(data, name)
            if batch_size is not None:
                raise ValueError(f"batch_size: got {batch_size!r}; allowed: None when {name} "
                                 "is not a pair of tensors (its batches have their own size)")
        else:
            batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
            check_number("batch_size", batch_size, low=1, integer=True)
        self.batch_size = batch_size
        self.generator = torch.Generator()  # the tensors' shuffle, seeded by seeded()

    def __len__(self) -> int:
        """Examples in one pass (a pass is iterated to count them unless data are tensors)."""
        if self.tensors is not None:
            return int(self.tensors[0].shape[0])
        return sum(int(y.shape[0]) for _, y in self.epoch())

    @contextlib.contextmanager
    def seeded(self, seed: int) -> Iterator[None]:
        """Within: torch's global generator (forked), a loader's own generator and the
        tensors' shuffle all seeded with ``seed``; on exit the caller's streams are back."""
        loader_gen = self.data.generator if isinstance(self.data, DataLoader) else None
        saved = None if loader_gen is None else loader_gen.get_state()
        with seeded_rng(seed):
            self.generator.manual_seed(seed)
            if loader_gen is not None:
                loader_gen.manual_seed(seed)
            try:
                yield
            finally:
                if loader_gen is not None:
                    loader_gen.set_state(saved)

    def epoch(self, shuffle: bool = True) -> Iterator[Batch]:
        """One pass of (x, y) batches on the device; tensors shuffled unless ``shuffle`` is
        False (evaluation reads them in order)."""
        if self.tensors is not None:
            x, y = self.tensors
            if shuffle:
                pairs = iterate_batches(Split(x, y), self.batch_size, self.generator)
            else:
                pairs = ((x[i:i + self.batch_size], y[i:i + self.batch_size])
                         for i in range(0, len(y), self.batch_size))
            for xb, yb in pairs:
                yield xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
            return
        for batch in self.batches():
            xb, yb = checked_batch(batch, self.name)
            yield xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)


def trainable_device(model: Any, name: str = "model") -> torch.device:
    """The device of ``model``'s first trainable parameter.

    Raises:
        ValueError: ``model`` is no nn.Module, or has no parameter that requires grad.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"{name}: got {describe(model)}; allowed: a torch.nn.Module")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{name}: got a {type(model).__name__} with no trainable parameters; "
                         "allowed: a module with at least one parameter that requires grad")
    return params[0].device


def check_loss_fn(loss_fn: Any) -> None:
    """A callable ``loss_fn(output, y)``, or a ValueError naming ``loss_fn``."""
    if not callable(loss_fn):
        raise ValueError(f"loss_fn: got {describe(loss_fn)}; allowed: a callable "
                         "loss_fn(model(x), y) -> scalar tensor (e.g. torch.nn.functional."
                         "cross_entropy, torch.nn.MSELoss())")


def checked_loss(loss_fn: LossFn) -> LossFn:
    """``loss_fn`` wrapped so that a result that cannot be trained on is a one-line error
    naming ``loss_fn`` (rather than autograd's message a few frames later)."""

    def loss(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        value = loss_fn(output, y)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError(f"loss_fn: returned {describe(value)}; allowed: a scalar tensor "
                             "(a mean over the batch, e.g. reduction='mean')")
        if torch.is_grad_enabled() and not value.requires_grad:  # evaluation runs no_grad
            raise ValueError("loss_fn: returned a tensor that does not depend on the model's "
                             "output; allowed: a loss computed from model(x)")
        return value

    return loss


def model_optimizer(model: nn.Module, optimizer: Any) -> torch.optim.Optimizer:
    """The optimizer to step ``model`` with: ``optimizer`` itself, ``optimizer(model)`` for a
    callable, or plain SGD over the model's parameters for None (rate 1.0: a reference that
    the range test and the rung trainings replace).

    Raises:
        ValueError: no Optimizer, or one that holds parameters that are not the model's.
    """
    if optimizer is None:
        return torch.optim.SGD(model.parameters(), lr=1.0)
    if callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer(model)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer: got {describe(optimizer)}; allowed: None (plain SGD), a "
                         "torch.optim.Optimizer over the model's parameters, or a callable "
                         "optimizer_fn(model) returning one")
    own = {id(p) for p in model.parameters()}
    if any(id(p) not in own for g in optimizer.param_groups for p in g["params"]):
        raise ValueError("optimizer: holds parameters that are not the model's; allowed: an "
                         "optimizer built on model.parameters()")
    return optimizer


def check_seeds(seeds: Any) -> tuple[int, ...]:
    """``seeds`` as a tuple: an int n means seeds 0..n-1; a sequence must hold distinct
    integers >= 0. Raises a ValueError naming ``seeds`` otherwise."""
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        check_number("seeds", seeds, low=1, integer=True)
        return tuple(range(seeds))
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Iterable):
        raise ValueError(f"seeds: got {seeds!r}; allowed: a count >= 1 or a list of distinct "
                         "integers >= 0 (3 or more for a band)")
    out = tuple(seeds)
    for s in out:
        check_number("seeds", s, low=0, integer=True)
    if not out or len(set(out)) != len(out):
        raise ValueError(f"seeds: got {list(out)}; allowed: one or more distinct integers >= 0")
    return out
