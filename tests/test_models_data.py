import pytest
import torch

from lrpipe.engine.config import DataConfig, ModelConfig
from lrpipe.engine.data import DataUnavailable, iterate_batches, load_data
from lrpipe.engine.models import backbone_names, layer_names, make_model


@pytest.mark.parametrize("name, layers", [
    ("softmax", ["head"]),
    ("mlp", ["fc1", "fc2", "head"]),
    ("cnn", ["conv1", "conv2", "fc1", "head"]),
])
def test_layers_are_named_from_input_to_head(name, layers):
    model = make_model(ModelConfig(name=name, hidden=(16, 8)), (1, 28, 28), 10, seed=0)
    assert layer_names(model) == layers
    assert backbone_names(model) == layers[:-1]
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_same_seed_same_weights_other_seed_other_weights():
    cfg = ModelConfig(name="mlp", hidden=(16,))
    a, b, c = (make_model(cfg, (1, 8, 8), 10, seed=s) for s in (3, 3, 4))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.fc1.weight, c.fc1.weight)


def test_init_matches_pytorch_default_bounds():
    model = make_model(ModelConfig(name="mlp", hidden=(50,)), (1, 8, 8), 10, seed=0)
    bound = 1 / 64 ** 0.5
    assert model.fc1.weight.abs().max() <= bound
    assert model.fc1.weight.abs().max() > 0.9 * bound


def test_dropout_is_seeded_and_off_in_eval():
    cfg = ModelConfig(name="mlp", hidden=(64,), dropout=0.5)
    x = torch.ones(4, 1, 8, 8)
    a, b = (make_model(cfg, (1, 8, 8), 10, seed=1) for _ in range(2))
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    a.eval()
    torch.testing.assert_close(a(x), a(x))


def test_digits_split_normalized_and_seeded():
    data = load_data(DataConfig(dataset="digits", val_size=300))
    assert len(data.val) == 300 and len(data.train) == 1200 and len(data.test) == 297
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    assert abs(float(data.train.x.mean())) < 1e-4
    again = load_data(DataConfig(dataset="digits", val_size=300))
    assert torch.equal(data.val.y, again.val.y)


def test_subset_classes_and_per_class():
    data = load_data(DataConfig(dataset="digits", val_size=100, classes=(5, 7, 9), per_class=20))
    assert data.num_classes == 3 and data.class_names == ("5", "7", "9")
    assert sorted(data.train.y.unique().tolist()) == [0, 1, 2]
    assert torch.bincount(data.train.y).tolist() == [20, 20, 20]
    sub = load_data(DataConfig(dataset="digits", val_size=100, subset=64))
    assert len(sub.train) == 64


def test_subset_larger_than_data_is_a_clear_error():
    with pytest.raises(ValueError, match="data.subset"):
        load_data(DataConfig(dataset="digits", val_size=100, subset=5000))


def test_fashion_mnist_from_the_prepared_folder():
    data = load_data(DataConfig(dataset="fashion_mnist", root="data"))
    assert (len(data.train), len(data.val), len(data.test)) == (50_000, 10_000, 10_000)
    assert data.input_shape == (1, 28, 28)
    assert torch.bincount(data.test.y).tolist() == [1000] * 10


def test_missing_data_gives_one_clear_error(tmp_path, monkeypatch):
    import torchvision

    import lrpipe.engine.data as data_mod

    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST", tmp_path / "absent")
    monkeypatch.setattr(data_mod, "prepare_fashion_mnist",
                        lambda root, source=tmp_path / "absent": None)

    def offline(self, *a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", offline)
    data_mod._load_raw.cache_clear()
    with pytest.raises(DataUnavailable, match="dataset-fashion-mnist"):
        load_data(DataConfig(dataset="fashion_mnist", root=str(tmp_path / "nodata")))


def test_batches_cover_the_split_once_in_seeded_order():
    data = load_data(DataConfig(dataset="digits", val_size=300))
    first = [y for _, y in iterate_batches(data.train, 100, torch.Generator().manual_seed(0))]
    again = [y for _, y in iterate_batches(data.train, 100, torch.Generator().manual_seed(0))]
    assert sum(len(y) for y in first) == len(data.train)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
