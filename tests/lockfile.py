"""requirements.lock against what a virtualenv holds: the check behind `make setup`.

The lock pins every package the virtualenv gets (pip and setuptools too), written by
`make lock`. ``python tests/lockfile.py requirements.lock`` compares it with this
interpreter's ``pip freeze --all --exclude-editable`` and exits 1 with one line per drifted
package (a different version, missing, or not in the lock); ``tests/test_lock.py`` runs the
same check inside `make test`.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

PROJECT = "lrpipe"  # installed editable from the work tree, never from the lock


def normalize(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): lower case, runs of -_. as -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse(lines: list[str]) -> dict[str, str]:
    """``name==version`` lines (comments and blanks skipped) as {normalized name: version}.

    Raises:
        ValueError: a line that is not ``name==version``, naming the line.
    """
    pins: dict[str, str] = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if not match:
            raise ValueError(f"lock line {line!r}: allowed: name==version")
        pins[normalize(match[1])] = match[2]
    return pins


def installed() -> dict[str, str]:
    """This interpreter's ``pip freeze --all --exclude-editable``, less the project itself."""
    out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
                         check=True, capture_output=True, text=True).stdout
    pins = parse([line for line in out.splitlines() if "==" in line])
    pins.pop(PROJECT, None)
    return pins


def drift(locked: dict[str, str], have: dict[str, str]) -> list[str]:
    """One line per package whose installed version is not the locked one, sorted by name."""
    lines = []
    for name in sorted(set(locked) | set(have)):
        want, got = locked.get(name), have.get(name)
        if want == got:
            continue
        if got is None:
            lines.append(f"{name}: locked {want}, not installed")
        elif want is None:
            lines.append(f"{name}: {got} installed, not in the lock")
        else:
            lines.append(f"{name}: {got} installed, locked {want}")
    return lines


def main(argv: list[str]) -> int:
    lock = Path(argv[1] if len(argv) > 1 else "requirements.lock")
    locked = parse(lock.read_text().splitlines())
    problems = drift(locked, installed())
    if problems:
        for line in problems:
            print(f"{lock}: {line}", file=sys.stderr)
        print(f"{lock}: the virtualenv drifted from the lock; rebuild it (rm -rf .venv && make "
              "setup), or run `make lock` to upgrade on purpose", file=sys.stderr)
        return 1
    print(f"{lock}: {len(locked)} packages, all at the locked versions")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
