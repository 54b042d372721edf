"""Real datasets held as normalized tensors on the training device.

Fashion-MNIST and MNIST come through torchvision's dataset classes; scikit-learn's
digits is the small real set for fast tests. Images are decoded once per process
(``_load_raw`` is cached), normalized with the training split's mean and std, and
kept as one tensor per split: a batch is an index slice, never a per-sample transform.
"""

from __future__ import annotations

import functools
import gzip
import shutil
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


def load_data(cfg: DataConfig, device: torch.device | str = "cpu") -> Dataset:
    """Load, split, subset and normalize one dataset onto ``device``.

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
        return Split(((x - mean) / std).to(device), y.to(device))

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
        yield split.x[idx], split.y[idx]


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
        yield split.x[idx], split.y[idx], False


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
