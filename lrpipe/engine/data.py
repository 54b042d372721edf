"""Real datasets held as normalized tensors on the training device.

Fashion-MNIST and MNIST come through torchvision's dataset classes; scikit-learn's
digits is the small real set for fast tests. Images are decoded once per process
(``_load_raw`` is cached), normalized with the training split's mean and std, and
kept as one tensor per split: a batch is an index slice, never a per-sample transform.

A torchvision dataset, once split and normalized for a ``DataConfig``, is kept on disk under
``<root>/cache`` (``cache_path``): the next command maps that file instead of importing
torchvision and decoding 70,000 images again (about 2 s of a command's start on 2 cores).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from lrpipe.engine.config import DEFAULT_VAL_SIZE, PLUGIN_VAL_FRACTION, DataConfig, is_plugin
from lrpipe.engine.plugins import plugin_arrays

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


class DataUnavailable(RuntimeError):
    """The dataset is neither on disk nor downloadable; the message says how to get it."""


@dataclass(frozen=True)
class Split:
    """Inputs ``x`` (N, C, H, W) float32, normalized, and labels ``y`` (N,) int64, one device."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class Dataset:
    """Train, validation and test splits of one dataset, with what a model needs to know."""

    train: Split
    val: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, int, int]
    class_names: tuple[str, ...]


def prepare_fashion_mnist(root: str | Path, source: Path = DEBIAN_FASHION_MNIST) -> Path | None:
    """Unpack Debian's gzipped IDX files into ``<root>/FashionMNIST/raw`` for torchvision.

    Debian recompressed the files, so torchvision's checksums reject the .gz files; the
    unpacked IDX files are what ``FashionMNIST(root, download=False)`` reads. Idempotent.
    Returns the raw folder, or None when the Debian files are absent.
    """
    raw = Path(root) / "FashionMNIST" / "raw"
    if all((raw / name).exists() for name in IDX_FILES):
        return raw
    if not all((source / f"{name}.gz").exists() for name in IDX_FILES):
        return None
    raw.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES:
        tmp = raw / f"{name}.part"
        with gzip.open(source / f"{name}.gz", "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.replace(raw / name)
    return raw


def _torchvision_arrays(name: str, root: str) -> tuple[torch.Tensor, ...]:
    import torchvision

    cls = {"fashion_mnist": torchvision.datasets.FashionMNIST,
           "mnist": torchvision.datasets.MNIST}[name]
    if name == "fashion_mnist":
        prepare_fashion_mnist(root)
    splits = []
    for train in (True, False):
        try:
            ds = cls(root, train=train, download=False)
        except RuntimeError:
            try:
                ds = cls(root, train=train, download=True)
            except Exception as exc:  # noqa: BLE001 - any network failure means the same
                hint = ("apt-get install dataset-fashion-mnist (then `make setup`)"
                        if name == "fashion_mnist" else "a machine with internet access")
                raise DataUnavailable(
                    f"data.dataset={name!r}: not found under {Path(root).resolve()} and the "
                    f"download failed ({type(exc).__name__}: {exc}). Get it with {hint}, or "
                    f"copy torchvision's {cls.__name__}/raw folder into data.root."
                ) from exc
        splits += [ds.data.unsqueeze(1).float().div_(255.0), ds.targets.long()]
    return tuple(splits)


def _digits_arrays() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    # Digits has no official test split: the last 297 images (about a sixth) serve as one.
    return x[:1500], y[:1500], x[1500:], y[1500:]


@functools.lru_cache(maxsize=4)
def _load_raw(name: str, root: str) -> tuple[torch.Tensor, ...]:
    if name == "digits":
        return _digits_arrays()
    return _torchvision_arrays(name, root)


def _class_names(name: str) -> tuple[str, ...]:
    return FASHION_CLASSES if name == "fashion_mnist" else tuple(str(i) for i in range(10))


def _select_classes(x, y, classes):
    mapping = torch.full((10,), -1, dtype=torch.long)
    for new, old in enumerate(classes):
        mapping[old] = new
    keep = mapping[y] >= 0
    return x[keep], mapping[y[keep]]


def _per_class(y: torch.Tensor, per_class: int, generator: torch.Generator) -> torch.Tensor:
    order = torch.randperm(len(y), generator=generator)
    picked = [order[y[order] == c][:per_class] for c in range(int(y.max()) + 1)]
    return torch.cat(picked).sort().values


# Bump when what a cache file holds, or how a Dataset is built from the sources, changes.
CACHE_FORMAT = 1
CACHED_DATASETS = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}  # torchvision folders


def source_files(cfg: DataConfig) -> list[Path] | None:
    """The IDX files a torchvision dataset is decoded from, or None when the dataset is not
    one (digits, a plug-in) or its files are not all there yet."""
    folder = CACHED_DATASETS.get(cfg.dataset)
    if folder is None:
        return None
    files = [Path(cfg.root) / folder / "raw" / name for name in IDX_FILES]
    return files if all(f.is_file() for f in files) else None


def cache_path(cfg: DataConfig) -> Path | None:
    """Where ``cfg``'s split and normalized dataset is cached: a name hashed from every field
    of ``cfg`` but ``root``, the source files' sizes and modification times, this file's
    code, CACHE_FORMAT and torch's thread count, so that a changed source, setting or code is
    a new file, never a stale one. The thread count because the normalization's mean and std
    are parallel reductions whose last bit depends on it: a hit is then bit for bit what this
    process would build. None when the dataset is not cached (``source_files``)."""
    files = source_files(cfg)
    if files is None:
        return None
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "root"}
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    text = json.dumps([CACHE_FORMAT, fields, stats, _code_digest(), torch.get_num_threads()],
                      sort_keys=True, default=list)
    digest = hashlib.sha256(text.encode()).hexdigest()[:20]
    return Path(cfg.root) / "cache" / f"{cfg.dataset}-{digest}.pt"


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """This module's source, hashed: a change to how datasets are built invalidates them."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _read_cache(path: Path) -> Dataset | None:
    """The Dataset saved at ``path``, its tensors mapped from the file (no copy), or None
    when there is none or it cannot be read (it is rebuilt, then replaced)."""
    try:
        saved = torch.load(path, mmap=True, weights_only=True)
        return Dataset(train=Split(*saved["train"]), val=Split(*saved["val"]),
                       test=Split(*saved["test"]), num_classes=saved["num_classes"],
                       input_shape=tuple(saved["input_shape"]),
                       class_names=tuple(saved["class_names"]))
    except (OSError, RuntimeError, KeyError, TypeError, ValueError):
        return None


def _write_cache(path: Path, data: Dataset) -> None:
    """Save ``data`` (on the CPU) at ``path`` atomically: written to a file of this process
    and thread, then renamed, so that concurrent commands never read half a file; the last
    rename wins, and every writer wrote the same tensors. A full or read-only disk only
    leaves the cache out."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.part")
    saved = {name: [getattr(data, name).x, getattr(data, name).y]
             for name in ("train", "val", "test")}
    saved.update(num_classes=data.num_classes, input_shape=list(data.input_shape),
                 class_names=list(data.class_names))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(saved, tmp)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def load_data(cfg: DataConfig, device: torch.device | str = "cpu") -> Dataset:
    """``build_data(cfg)`` onto ``device``, from the disk cache when it holds it
    (``cache_path``; torchvision datasets only), else built and then cached. The tensors are
    the same, bit for bit, either way.

    Raises:
        DataUnavailable, ValueError: as ``build_data``.
    """
    path = cache_path(cfg)
    data = _read_cache(path) if path is not None and path.is_file() else None
    if data is None:
        data = build_data(cfg)
        path = path or cache_path(cfg)  # a first run may have just unpacked the sources
        if path is not None:
            _write_cache(path, data)
    if torch.device(device).type == "cpu":
        return data
    return dataclasses.replace(data, train=data.train.to(device), val=data.val.to(device),
                               test=data.test.to(device))


def build_data(cfg: DataConfig) -> Dataset:
    """Load, split, subset and normalize one dataset, on the CPU.

    The validation split is ``cfg.val_size`` examples drawn (seeded by ``split_seed``) from the
    official training split; the official test split is kept apart, untouched by tuning.
    Raises:
        DataUnavailable: the files are missing and cannot be downloaded.
        ConfigError-like ValueError: the split sizes do not fit the dataset.
    """
    if is_plugin(cfg.dataset):  # the user's loader: their scaling is kept, not normalized
        x_tr, y_tr, x_te, y_te = plugin_arrays(cfg.dataset)
        names = tuple(str(c) for c in range(int(max(y_tr.max(), y_te.max())) + 1))
        val_size = cfg.val_size or max(1, int(PLUGIN_VAL_FRACTION * len(y_tr)))
    else:
        x_tr, y_tr, x_te, y_te = _load_raw(cfg.dataset, cfg.root)
        names = _class_names(cfg.dataset)
        val_size = cfg.val_size or DEFAULT_VAL_SIZE[cfg.dataset]
    if cfg.classes is not None:
        x_tr, y_tr = _select_classes(x_tr, y_tr, cfg.classes)
        x_te, y_te = _select_classes(x_te, y_te, cfg.classes)
        names = tuple(names[c] for c in cfg.classes)
    gen = torch.Generator().manual_seed(cfg.split_seed)
    if val_size >= len(y_tr):
        raise ValueError(f"data.val_size: got {val_size}; allowed: < {len(y_tr)} "
                         f"(training examples of {cfg.dataset})")
    perm = torch.randperm(len(y_tr), generator=gen)
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    if cfg.per_class is not None:
        train_idx = train_idx[_per_class(y_tr[train_idx], cfg.per_class, gen)]
    if cfg.subset is not None:
        if cfg.subset > len(train_idx):
            raise ValueError(f"data.subset: got {cfg.subset}; allowed: <= {len(train_idx)} "
                             f"(training examples left after the validation split)")
        train_idx = train_idx[torch.randperm(len(train_idx), generator=gen)[: cfg.subset]]
    x_train = x_tr[train_idx]
    mean, std = x_train.mean(), x_train.std().clamp_min(1e-6)
    if is_plugin(cfg.dataset):
        mean, std = torch.tensor(0.0), torch.tensor(1.0)

    def norm(x: torch.Tensor, y: torch.Tensor) -> Split:
        return Split((x - mean) / std, y)

    return Dataset(
        train=norm(x_train, y_tr[train_idx]),
        val=norm(x_tr[val_idx], y_tr[val_idx]),
        test=norm(x_te, y_te),
        num_classes=len(names),
        input_shape=tuple(x_tr.shape[1:]),
        class_names=names,
    )


def iterate_batches(split: Split, batch_size: int, generator: torch.Generator):
    """Yield shuffled (x, y) minibatches as index gathers on the split's device.

    The permutation is drawn on the CPU from ``generator``, so the batch order depends on the
    seed alone, not on the device or on other threads.
    """
    n = len(split)
    perm = torch.randperm(n, generator=generator).to(split.y.device)
    for start in range(0, n, batch_size):
        idx = perm[start:start + batch_size]
        # index_select, not x[idx]: the same rows, half the time on the CPU (make bench (b))
        yield split.x.index_select(0, idx), split.y.index_select(0, idx)


def batch_generators(seeds: list[int]) -> list[torch.Generator]:
    """Batch-order generators for K members: one if all share a seed, else one per member."""
    return [torch.Generator().manual_seed(s) for s in (seeds if len(set(seeds)) > 1 else seeds[:1])]


def member_batches(split: Split, batch_size: int, generators: list[torch.Generator]):
    """Yield (x, y, shared) for one epoch of K members: one shared order if there is one
    generator, else one order per member. Member k's order is ``iterate_batches``' for its
    generator; distinct seeds cost a (K, B, ...) gather per step instead of one (B, ...)."""
    if len(generators) == 1:
        for x, y in iterate_batches(split, batch_size, generators[0]):
            yield x, y, True
        return
    perms = torch.stack([torch.randperm(len(split), generator=g) for g in generators])
    perms = perms.to(split.y.device)
    for start in range(0, len(split), batch_size):
        idx = perms[:, start:start + batch_size]
        flat = idx.reshape(-1)
        yield (split.x.index_select(0, flat).view(*idx.shape, *split.x.shape[1:]),
               split.y.index_select(0, flat).view(idx.shape), False)


def main(argv: list[str] | None = None) -> int:
    """``python -m lrpipe.engine.data --root data``: prepare Fashion-MNIST from Debian's package."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--root", default="data")
    args = parser.parse_args(argv)
    raw = prepare_fashion_mnist(args.root)
    if raw is None:
        print(f"Fashion-MNIST: Debian files not found in {DEBIAN_FASHION_MNIST}; the first run "
              "will try torchvision's downloader.")
    else:
        print(f"Fashion-MNIST ready in {raw}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
