"""Write docs/api.md, the reference of lrpipe's public API, from its docstrings.

Usage: ``.venv/bin/python docs/api_reference.py`` (writes the page) or ``... --check`` (exit 1
if the page is stale). tests/test_readme_api.py fails while the page differs from what this
script writes, so a changed signature or docstring must be regenerated to pass.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import lrpipe
from lrpipe.api import inputs
from lrpipe.search.rangetest import Band
from lrpipe.search.suggest import Suggestion

PAGE = Path(__file__).resolve().parent / "api.md"
HEADER = """# lrpipe API reference

Generated from the docstrings by `docs/api_reference.py`; do not edit by hand. Everything here
is importable from `lrpipe`. A worked example is in the README's "Use it on your model"
section; two small projects are in `examples/`.
"""


def signature(obj) -> str:
    """``name(\\n    arg: annotation = default,\\n ...)``, one parameter a line, as written
    in the source (annotations are strings under ``from __future__ import annotations``)."""
    lines, star = [], False
    for p in inspect.signature(obj).parameters.values():
        if p.kind is p.KEYWORD_ONLY and not star:
            lines.append("*")
            star = True
        text = p.name + (f": {p.annotation}" if p.annotation is not p.empty else "")
        if p.default is not p.empty:
            text += f" = {p.default!r}"
        lines.append(text)
    ret = inspect.signature(obj).return_annotation
    tail = f" -> {ret}" if ret is not inspect.Signature.empty else ""
    return f"{obj.__name__}(\n" + "".join(f"    {line},\n" for line in lines) + f"){tail}"


def members(cls) -> list[str]:
    """A result class's properties and methods (public, defined on it), each with its doc."""
    out = []
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, property):
            out.append(f"- `.{name}` (property): {one_line(value)}")
        elif inspect.isfunction(value):
            params = ", ".join(list(inspect.signature(value).parameters)[1:])
            out.append(f"- `.{name}({params})`: {one_line(value)}")
    return out


def one_line(obj) -> str:
    return " ".join(inspect.getdoc(obj).split())


def doc(obj) -> str:
    """A docstring as a text block: its Args/Returns/Raises layout kept as written."""
    return f"```text\n{inspect.getdoc(obj)}\n```\n"


def render() -> str:
    """The whole page: the data and types, then every name of ``lrpipe.__all__`` in order."""
    parts = [HEADER, "## Data and types\n", inspect.getdoc(inputs) + "\n",
             "Types in the signatures below:\n",
             "".join(f"- `{n}` = `{getattr(inputs, n)!r}`\n".replace("typing.", "")
                     for n in ("Data", "LossFn", "OptimizerFn"))]
    for name in lrpipe.__all__:
        obj = getattr(lrpipe, name)
        parts.append(f"## `lrpipe.{name}`\n")
        if inspect.isclass(obj):
            parts += [doc(obj), "\n".join(members(obj)) + "\n"]
        else:
            parts += [f"```python\n{signature(obj)}\n```\n", doc(obj)]
    for cls in (Suggestion, Band):
        parts += [f"## `{cls.__module__}.{cls.__name__}` (in results)\n", doc(cls)]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        stale = not PAGE.exists() or PAGE.read_text() != text
        print(f"{PAGE}: {'stale, run docs/api_reference.py' if stale else 'up to date'}")
        return int(stale)
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
