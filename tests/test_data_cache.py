"""The on-disk cache of split and normalized datasets (lrpipe.engine.data.load_data): a hit
gives the same tensors as a build, a changed source or setting is a new entry, and commands
that start together never read half a file."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from lrpipe.engine import data as data_mod
from lrpipe.engine.config import DataConfig
from lrpipe.engine.data import build_data, cache_path, load_data


def _write_idx(path: Path, array: np.ndarray) -> None:
    code = 0x08  # unsigned byte
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                   *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_mnist(root: Path, n_train: int = 120, n_test: int = 40, seed: int = 0) -> Path:
    """A tiny MNIST in torchvision's raw layout (IDX files), random pixels and labels."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    return raw


def same(a, b) -> bool:
    return all(torch.equal(getattr(a, s).x, getattr(b, s).x)
               and torch.equal(getattr(a, s).y, getattr(b, s).y)
               for s in ("train", "val", "test")) and (
        a.num_classes, a.input_shape, a.class_names) == (b.num_classes, b.input_shape,
                                                         b.class_names)


@pytest.fixture
def cfg(tmp_path) -> DataConfig:
    make_mnist(tmp_path)
    return DataConfig(dataset="mnist", root=str(tmp_path), val_size=20, subset=80)


def test_a_miss_writes_the_entry_and_a_hit_reads_it_without_building(cfg, monkeypatch):
    path = cache_path(cfg)
    assert path is not None and not path.exists()
    first = load_data(cfg)
    assert path.is_file()
    assert same(first, build_data(cfg))

    def no_build(_cfg):
        raise AssertionError("a hit must not build")

    monkeypatch.setattr(data_mod, "build_data", no_build)
    hit = load_data(cfg)
    assert same(hit, first)
    assert len(hit.train) == 80 and len(hit.val) == 20 and len(hit.test) == 40


def test_a_changed_source_or_setting_is_a_new_entry(cfg, tmp_path):
    load_data(cfg)
    before = cache_path(cfg)
    assert cache_path(DataConfig(**{**cfg.__dict__, "subset": 60})) != before
    assert cache_path(DataConfig(**{**cfg.__dict__, "split_seed": 1})) != before
    old = load_data(cfg)
    make_mnist(tmp_path, seed=1)  # new pixels, same sizes: the modification time tells
    image = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    data_mod._load_raw.cache_clear()  # a new process would decode again
    assert cache_path(cfg) != before
    fresh = load_data(cfg)
    assert not torch.equal(fresh.train.x, old.train.x)
    assert same(fresh, build_data(cfg))


def test_the_thread_count_is_part_of_the_key(cfg):
    # mean and std are parallel reductions: their last bit depends on the thread count
    import torch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cache_path(cfg)
        torch.set_num_threads(2)
        assert cache_path(cfg) != one
    finally:
        torch.set_num_threads(threads)


def test_not_cached_without_sources(tmp_path):
    assert cache_path(DataConfig(dataset="digits", val_size=100)) is None
    assert cache_path(DataConfig(dataset="mnist", root=str(tmp_path / "none"))) is None


def test_an_unreadable_entry_is_rebuilt_and_replaced(cfg):
    path = cache_path(cfg)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a torch file")
    assert same(load_data(cfg), build_data(cfg))
    assert same(load_data(cfg), build_data(cfg)) and path.stat().st_size > 1000


def test_concurrent_writers_in_threads_leave_one_whole_entry(cfg):
    results, errors = [], []

    def load() -> None:
        try:
            results.append(load_data(cfg))
        except Exception as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    expected = build_data(cfg)
    assert all(same(r, expected) for r in results)
    path = cache_path(cfg)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no .part left


def test_concurrent_writers_in_processes_agree(cfg):
    code = (f"import sys, torch; torch.set_num_threads({torch.get_num_threads()}); "
            "from lrpipe.engine.config import DataConfig; "
            "from lrpipe.engine.data import load_data; "
            f"d = load_data(DataConfig(dataset='mnist', root={cfg.root!r}, val_size=20, "
            "subset=80)); print(float(d.train.x.double().sum()), int(d.val.y.sum()))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    expected = build_data(cfg)
    assert set(outs) == {f"{float(expected.train.x.double().sum())} {int(expected.val.y.sum())}"}
    path = cache_path(cfg)
    assert same(load_data(cfg), expected)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
