"""The locked install: requirements.lock pins every package, and this venv holds exactly it."""

import tomllib
from pathlib import Path

import lockfile  # tests/lockfile.py, also run by `make setup`
import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"


def test_drift_names_every_package_that_moved():
    locked = {"numpy": "2.4.6", "pandas": "3.1.1", "six": "1.17.0"}
    have = {"numpy": "2.4.5", "pandas": "3.1.1", "extra-pkg": "1.0"}
    assert lockfile.drift(locked, have) == [
        "extra-pkg: 1.0 installed, not in the lock",
        "numpy: 2.4.5 installed, locked 2.4.6",
        "six: locked 1.17.0, not installed",
    ]
    assert lockfile.drift(locked, dict(locked)) == []


def test_parse_normalizes_names_and_rejects_ranges():
    assert lockfile.parse(["# header", "", "Torch_LR.Finder==0.2.2  # note"]) == {
        "torch-lr-finder": "0.2.2"}
    with pytest.raises(ValueError, match="name==version"):
        lockfile.parse(["numpy>=2"])


def test_this_venv_is_exactly_the_lock():
    assert lockfile.drift(lockfile.parse(LOCK.read_text().splitlines()), lockfile.installed()) \
        == []


def test_every_direct_dependency_is_pinned_in_the_lock():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    direct = project["dependencies"] + project["optional-dependencies"]["dev"]
    pinned = lockfile.parse(LOCK.read_text().splitlines())
    for spec in direct:
        name = lockfile.normalize(spec.split(">")[0].split("=")[0].split("<")[0].strip())
        assert name in pinned, f"{name} is a dependency in pyproject.toml but not locked"
    for tool in ("pip", "setuptools"):  # the installer and the build backend are locked too
        assert tool in pinned
