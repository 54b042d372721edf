"""Issue 26's start-up figures for one ``lrpipe`` command, measured from outside it.

  python bench/startup.py -- sweep --lrs 0.1 --epochs 1

runs the command in a child process and prints, as one JSON line:

  first_step_s   seconds from the child's start to the first training batch handed to the
                 one training loop (``lrpipe.engine.loop.fit``'s ``batches``), or null when
                 nothing trained (``--help``, a bad input)
  wall_s         the whole command's wall time
  cpu_s          its CPU seconds (user + system), children included (Prefect's API server,
                 Dask workers): ``resource.getrusage(RUSAGE_CHILDREN)`` after it ended
  rc             its exit status

The child is ``python -c`` with ``fit`` wrapped as its module is first imported (an import
hook: the command imports what it imports, in its own order): the wrapper stamps the wall clock
when the first batch of the first call is drawn, and writes it to
``$LRPIPE_FIRST_STEP_FILE``. Nothing in lrpipe reads that variable; the figures are the
command's own, less the wrapper's few microseconds.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import importlib.abc, os, sys, time

_done = []

def _wrap(loop):
    fit = loop.fit
    def stamped_fit(members, batches, **kwargs):
        def draw():
            for item in batches():
                if not _done:
                    _done.append(time.time())
                    with open(os.environ["LRPIPE_FIRST_STEP_FILE"], "w") as out:
                        out.write(repr(_done[0]))
                yield item
        return fit(members, draw, **kwargs)
    loop.fit = stamped_fit

class _OnImport(importlib.abc.MetaPathFinder):
    # Wraps lrpipe.engine.loop.fit as the module is first imported, before any module takes
    # fit by name, so that the command imports what it imports in the order it does.
    def find_spec(self, name, path, target=None):
        if name != "lrpipe.engine.loop":
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else finder.find_spec(name, path, target)
            if spec is not None:
                run = spec.loader.exec_module
                def exec_module(module, run=run):
                    run(module)
                    _wrap(module)
                spec.loader.exec_module = exec_module
                return spec
        return None

sys.meta_path.insert(0, _OnImport())
from flows.cli import main
sys.argv[0] = "lrpipe"
raise SystemExit(main(sys.argv[1:]))
"""


def measure(args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``lrpipe *args`` once in a child process; its figures (see the module doc)."""
    with tempfile.TemporaryDirectory() as tmp:
        stamp = Path(tmp) / "first_step"
        child_env = {**os.environ, **(env or {}), "LRPIPE_FIRST_STEP_FILE": str(stamp)}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.time()
        proc = subprocess.run([sys.executable, "-c", CHILD, *args], env=child_env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.time() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        first = float(stamp.read_text()) - start if stamp.exists() else None
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"command": " ".join(args), "rc": proc.returncode,
            "first_step_s": None if first is None else round(first, 2),
            "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "stderr_tail": proc.stderr.strip().splitlines()[-1:] if proc.returncode else []}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--"]:
        argv = argv[1:]
    print(json.dumps(measure(argv)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
