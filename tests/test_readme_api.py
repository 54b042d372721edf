"""README's "Use it on your model" section: its python block runs as written, and the error it
quotes is the one find_lr gives."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
HEADING = "## Use it on your model"


def section(text: str, heading: str = HEADING) -> str:
    """The text under ``heading`` up to the next second-level heading."""
    start = text.index(heading + "\n")
    rest = text[start + len(heading) + 1:]
    nxt = re.search(r"^## ", rest, flags=re.M)
    return rest[:nxt.start()] if nxt else rest


def python_block(text: str) -> str:
    """The first fenced python block of ``text``."""
    found = re.search(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)
    assert found, "no ```python block"
    return found.group(1)


def test_the_section_sits_after_two_commands():
    text = (ROOT / "README.md").read_text()
    headings = re.findall(r"^## .*$", text, flags=re.M)
    assert headings.index(HEADING) == headings.index("## Two commands") + 1


def test_the_readme_block_runs(tmp_path, monkeypatch, capsys):
    code = python_block(section((ROOT / "README.md").read_text()))
    monkeypatch.chdir(tmp_path)  # the block saves its figure in the working directory
    torch.set_num_threads(1)
    namespace: dict = {"__name__": "readme"}
    exec(compile(code, "README.md (Use it on your model)", "exec"), namespace)
    found, fast, chosen = namespace["found"], namespace["fast"], namespace["chosen"]
    for rate in (found.lr, fast.lr, chosen.lr):
        assert rate is not None and math.isfinite(rate) and rate > 0
    assert (tmp_path / "range_test.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert out.startswith("take lr=") and "chose lr=" in out


def test_the_quoted_error_is_find_lrs():
    import lrpipe

    quoted = re.search(r"\(`(data: got x .*?)`\)", section(
        (ROOT / "README.md").read_text()), flags=re.S).group(1)
    quoted = " ".join(quoted.split()).removesuffix(" ...")
    with pytest.raises(ValueError) as err:
        lrpipe.find_lr(torch.nn.Linear(20, 1), (torch.zeros(100, 20), torch.zeros(90)),
                       torch.nn.functional.mse_loss)
    assert str(err.value).startswith(quoted)


def test_docs_api_md_is_generated_from_the_current_docstrings():
    """docs/api.md is what docs/api_reference.py writes now: regenerate it after changing a
    signature or docstring of the public API (``.venv/bin/python docs/api_reference.py``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("api_reference",
                                                  ROOT / "docs" / "api_reference.py")
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    assert (ROOT / "docs" / "api.md").read_text() == reference.render()
    import lrpipe

    for name in lrpipe.__all__:
        assert f"## `lrpipe.{name}`" in reference.render()
