"""The physical floor beside every bench figure: the GEMMs of the work, timed alone.

A step of a Linear/ReLU network is, at its core, its matrix products: per layer the forward
``addmm(b, x, W.t())``, the weight gradient ``mm(g.t(), x)`` and, for every layer but the first
(whose input needs no gradient), the input gradient ``mm(g, W)``: the very calls, shapes and
layouts autograd makes for ``nn.Linear`` (seen in torch.profiler). An evaluation is the forward
products over the split in chunks of ``EVAL_BATCH`` rows. ``GemmFloor`` times these alone, on
random tensors of the same shapes on one thread, in the same run as the figures it stands
beside (as one more side of an interleaved round), and scales them to a piece of work:
``seconds(steps, eval_examples)``. Everything else a run does (the gather of a batch, the
loss, the optimizer's update, Python) is above this floor; nothing a library does can go
below it on this machine.
"""

from __future__ import annotations

import time

import torch

from lrpipe.engine.members import EVAL_BATCH

# Layer widths of lrpipe's models on Fashion-MNIST (784 inputs, 10 classes).
DIMS = {"mlp": (784, 256, 10), "softmax": (784, 10)}


class GemmFloor:
    """The GEMMs of one training step (``batch`` rows) and of evaluation for a Linear/ReLU
    network of widths ``dims``; ``sample()`` times them, ``seconds()`` scales a sample."""

    def __init__(self, dims: tuple[int, ...], batch: int = 128, steps: float = 50,
                 eval_examples: int = 2 * EVAL_BATCH, eval_rows: int = EVAL_BATCH,
                 seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.dims, self.batch, self.eval_rows = dims, batch, eval_rows
        # Timed at the work's own length: a short sample on a loaded host lands in one time
        # slice more often than the long run beside it, which would flatter the run.
        self.steps = max(1, round(steps))
        self.chunks = max(1, -(-eval_examples // eval_rows))
        self.weights = [torch.randn(o, i, generator=gen)
                        for i, o in zip(dims[:-1], dims[1:], strict=True)]
        self.biases = [torch.randn(o, generator=gen) for o in dims[1:]]
        self.inputs = [torch.randn(batch, i, generator=gen) for i in dims[:-1]]
        self.grads = [torch.randn(batch, o, generator=gen) for o in dims[1:]]
        self.eval_inputs = [torch.randn(eval_rows, i, generator=gen) for i in dims[:-1]]

    def step(self) -> None:
        """One training step's products: forward, weight gradients, input gradients."""
        for w, b, x in zip(self.weights, self.biases, self.inputs, strict=True):
            torch.addmm(b, x, w.t())
        for layer, (w, g, x) in enumerate(zip(self.weights, self.grads, self.inputs,
                                              strict=True)):
            torch.mm(g.t(), x)
            if layer > 0:
                torch.mm(g, w)

    def evaluate_chunk(self) -> None:
        """The forward products of one evaluation chunk (``eval_rows`` examples)."""
        for w, b, x in zip(self.weights, self.biases, self.eval_inputs, strict=True):
            torch.addmm(b, x, w.t())

    def sample(self) -> dict[str, float]:
        """{"step": seconds per training step, "example": seconds per evaluated example}
        (and the same in CPU seconds, ``step_cpu``/``example_cpu``), from ``steps`` steps and
        the chunks of ``eval_examples`` examples, on one torch thread."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self.step()  # first-call costs (allocator, kernel choice) outside the timing
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(self.steps):
                self.step()
            per_step = (time.perf_counter() - start) / self.steps
            per_step_cpu = (time.process_time() - cpu) / self.steps
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(self.chunks):
                self.evaluate_chunk()
            per_example = (time.perf_counter() - start) / (self.chunks * self.eval_rows)
            per_example_cpu = (time.process_time() - cpu) / (self.chunks * self.eval_rows)
        finally:
            torch.set_num_threads(threads)
        return {"step": per_step, "example": per_example, "step_cpu": per_step_cpu,
                "example_cpu": per_example_cpu}

    @staticmethod
    def seconds(sample: dict[str, float], steps: int, eval_examples: int = 0,
                members: int = 1) -> float:
        """The floor of ``members`` runs of ``steps`` steps each evaluating ``eval_examples``
        examples, from a ``sample()`` (or the medians of several, keys ``step``/``example``)."""
        return members * (steps * sample["step"] + eval_examples * sample["example"])


def floor_of(t: dict[str, float], name: str = "floor", cpu: bool = False) -> dict[str, float]:
    """The ``sample()`` medians of an ``interleaved`` result in which ``name`` was a side (its
    CPU seconds with ``cpu``)."""
    tail = "_cpu" if cpu else ""
    return {"step": t[f"{name}.step{tail}"], "example": t[f"{name}.example{tail}"]}


def step_equivalents(examples: int, batch: int) -> float:
    """Full steps' worth of products in an epoch of ``examples`` at ``batch``: the products'
    time scales with the rows, so a short last batch counts as its fraction of a step."""
    return examples / batch


def evaluated_examples(val: int, train_eval: int, evaluations: int) -> int:
    """Examples a run evaluates: (validation + training subset) per evaluation."""
    return (val + train_eval) * evaluations
