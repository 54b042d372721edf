"""The house rules a parser can check: lrpipe/ knows nothing of Prefect; only tracking.py
imports mlflow."""

import ast
from pathlib import Path

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


def test_lrpipe_never_imports_prefect_or_flows():
    offenders = [p.name for p in (ROOT / "lrpipe").glob("*.py")
                 if imported_modules(p) & {"prefect", "prefect_dask", "flows"}]
    assert offenders == []


def test_only_tracking_imports_mlflow():
    offenders = [str(p.relative_to(ROOT)) for p in ROOT.glob("*/*.py")
                 if p.parts[-2] in ("lrpipe", "flows", "tests")
                 and "mlflow" in imported_modules(p)
                 and p != ROOT / "lrpipe" / "tracking.py" and p.parts[-2] != "tests"]
    assert offenders == []


def test_the_checker_sees_a_lazy_import(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    import prefect.flows\n    from mlflow import x\n")
    assert imported_modules(sample) == {"prefect", "mlflow"}
