"""The house rules a parser can check: lrpipe/ knows nothing of Prefect; only tracking.py
imports mlflow; no import cycles and no private name imported from another module; lrpipe's
modules live in their concept's subpackage."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


MAIN = ROOT / "lrpipe" / "__main__.py"  # `python -m lrpipe`: the one door to the command


def test_lrpipe_never_imports_prefect_or_flows():
    offenders = [p.name for p in (ROOT / "lrpipe").rglob("*.py")
                 if p != MAIN and imported_modules(p) & {"prefect", "prefect_dask", "flows"}]
    assert offenders == []


def test_lrpipe_main_imports_the_cli_only_inside_main():
    """lrpipe/__main__.py may import exactly ``flows.cli``, inside a function (so importing
    lrpipe never loads Prefect), and nothing else of flows or Prefect."""
    tree = ast.parse(MAIN.read_text())
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    assert all(n.module == "__future__" for n in top if isinstance(n, ast.ImportFrom))
    assert not [n for n in top if isinstance(n, ast.Import)]
    inner = [(n.module, [a.name for a in n.names]) for f in tree.body
             if isinstance(f, ast.FunctionDef) for n in ast.walk(f)
             if isinstance(n, ast.Import | ast.ImportFrom)]
    assert inner == [("flows.cli", ["main"])]


def test_only_tracking_imports_mlflow():
    offenders = [str(p.relative_to(ROOT)) for top in ("lrpipe", "flows")
                 for p in (ROOT / top).rglob("*.py")
                 if "mlflow" in imported_modules(p) and p != ROOT / "lrpipe" / "tracking.py"]
    assert offenders == []


def test_the_checker_sees_a_lazy_import(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    import prefect.flows\n    from mlflow import x\n")
    assert imported_modules(sample) == {"prefect", "mlflow"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path, known: set[str]) -> list[tuple[str, str]]:
    """(module, name) for every ``from project.module import name`` and ``import
    project.module`` in ``path`` (name "" for the latter), also inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub, "") if sub in known else (node.module, alias.name))
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
    return [(m, n) for m, n in found if m in known]


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for top in ("lrpipe", "flows") for p in (ROOT / top).rglob("*.py")}


def test_no_private_name_is_imported_from_another_module():
    modules = project_modules()
    offenders = [f"{name} imports {mod}.{what}" for name, path in modules.items()
                 for mod, what in project_imports(path, set(modules))
                 if what.startswith("_") and mod != name]
    assert offenders == []


def test_no_import_cycles():
    modules = project_modules()
    graph = {name: {m for m, _ in project_imports(path, set(modules))
                    if m != name and not name.startswith(m + ".")}
             for name, path in modules.items()}
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(node):] + [node]))
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, stack + [node])
        done.add(node)

    for name in sorted(graph):
        visit(name, [])


def test_lrpipe_is_laid_out_by_concept():
    top = sorted(p.name for p in (ROOT / "lrpipe").iterdir() if p.name != "__pycache__")
    assert top == ["__init__.py", "__main__.py", "api", "engine", "experiments", "faults.py",
                   "plots", "procs.py", "report.py", "resume.py", "runs.py", "search",
                   "tracking.py"]


def test_the_cycle_check_sees_a_cycle(tmp_path, monkeypatch):
    pkg = tmp_path / "lrpipe"
    pkg.mkdir()
    (pkg / "a.py").write_text("from lrpipe.b import x\n")
    (pkg / "b.py").write_text("def f():\n    from lrpipe.a import _y\n")
    (tmp_path / "flows").mkdir()
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycles()
    with pytest.raises(AssertionError, match="lrpipe.a._y"):
        test_no_private_name_is_imported_from_another_module()


# The search's range tests and halving ladders open their own child runs (search_tasks.py):
# they are searches, not trainings of a flow's members, and train through lrpipe.search.
SEARCH_RUNS = "search_tasks.py"
ENGINE_TRAINING = {"train", "train_many", "train_batched", "finetune", "finetune_from",
                   "train_stages"}


def training_openers(flows: Path) -> dict[str, list[str]]:
    """file -> the functions in it that open a training child run (``training_run``) or
    train through the engine (``ENGINE_TRAINING``), for every flows/*.py."""
    found: dict[str, list[str]] = {}
    for path in sorted(flows.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            called = {getattr(c.func, "attr", getattr(c.func, "id", None))
                      for c in ast.walk(fn) if isinstance(c, ast.Call)}
            if called & (ENGINE_TRAINING | {"training_run"}):
                found.setdefault(path.name, []).append(fn.name)
    return found


def tasks_in(path: Path) -> list[str]:
    """The functions of ``path`` decorated with Prefect's ``task`` (bare or called)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [fn.name for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef)
            and any(getattr(d.func if isinstance(d, ast.Call) else d, "id", None) == "task"
                    for d in fn.decorator_list)]


def test_one_task_opens_training_child_runs(flows_root: Path = ROOT / "flows"):
    """Every flow trains through flows.children.train_children: no other flows module opens a
    training child run or calls the engine's training, and children.py holds one task."""
    openers = training_openers(flows_root)
    assert sorted(set(openers) - {SEARCH_RUNS}) == ["children.py"], openers
    assert tasks_in(flows_root / "children.py") == ["train_children"]


def test_the_one_task_check_sees_a_second_one(tmp_path):
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "children.py").write_text(
        "@task(name='t')\ndef train_children(m):\n    with runs.training_run(m):\n"
        "        pass\n")
    test_one_task_opens_training_child_runs(flows)
    (flows / "final.py").write_text("@task\ndef again(cfg):\n    return train(cfg)\n")
    with pytest.raises(AssertionError, match="final.py"):
        test_one_task_opens_training_child_runs(flows)
    (flows / "final.py").unlink()
    (flows / "children.py").write_text(
        "@task\ndef a(m):\n    runs.training_run(m)\n@task()\ndef b(m):\n    train_many(m)\n")
    with pytest.raises(AssertionError, match=r"\['a', 'b'\]"):
        test_one_task_opens_training_child_runs(flows)
