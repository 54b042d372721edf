"""Figures written off the flow's thread (issue 26 item 3: no serial tails).

A flow draws its figures after its training: profiled, the PNG rendering and upload of a
``make sweep``'s 17 figures took 22 of their 29 s, with one task or none running meanwhile.
Inside ``in_background`` (``flows.common.shared_api`` enters it around every flow call),
``lrpipe.tracking.log_figure`` hands each figure's ``savefig`` and upload to one background
thread and returns: the flow goes on (the next stage of a pipeline trains) while the figures
are written. Leaving the block waits for every figure, so when a flow call returns its
figures are all in the store; a figure that failed is raised then, after the others.

What is written does not change, only when: the same figures, bytes and paths. A flow's parent
run may be marked ended a moment before its last figures land; the command itself ends only
after them. The figures are Agg figures, each drawn by one thread (matplotlib keeps its font
cache per thread), closed in pyplot's registry before they are handed over.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from lrpipe import tracking

WRITERS = 1  # one drawing thread: figures draw in order, beside training, never two at once


@contextmanager
def in_background() -> Iterator[list[Future]]:
    """While the block runs, ``tracking.log_figure`` writes on a background thread; on leaving,
    wait for every figure. Yields the futures of the figures handed over so far.

    Nested blocks share the outermost one's thread (an inner block waits for nothing). When
    the block raised, its error is the one that propagates; otherwise the first figure that
    failed is raised once all are done.
    """
    if tracking.FIGURE_WRITER:  # an enclosing flow call already writes in the background
        yield []
        return
    futures: list[Future] = []
    lock = threading.Lock()
    executor = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="lrpipe-figures")

    def write(save: Callable[[], Any]) -> None:
        with lock:
            futures.append(executor.submit(save))

    tracking.FIGURE_WRITER.append(write)
    failed = True
    try:
        yield futures
        failed = False
    finally:
        tracking.FIGURE_WRITER.remove(write)
        executor.shutdown(wait=True)
    if not failed:
        for future in futures:
            future.result()  # the first failure, now that every figure is done
