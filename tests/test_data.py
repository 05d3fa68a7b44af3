"""fxsparse.train.data: IDX reading and its checks, the deterministic split, the loaders' determinism."""

import gzip
from pathlib import Path

import pytest
import torch

from fxsparse.train import data as fxdata
from fxsparse.train.data import DataError, TensorLoader, load_fashion_mnist, read_idx, split_indices, write_idx


def _write_fashion(directory: Path, train: int = 40, test: int = 20, **overrides) -> None:
    """A tiny, well-formed Fashion-MNIST lookalike (balanced labels) in ``directory``."""
    g = torch.Generator().manual_seed(0)
    parts = {
        "train-images-idx3-ubyte.gz": torch.randint(0, 256, (train, 28, 28), generator=g, dtype=torch.uint8),
        "train-labels-idx1-ubyte.gz": torch.arange(train) % 10,
        "t10k-images-idx3-ubyte.gz": torch.randint(0, 256, (test, 28, 28), generator=g, dtype=torch.uint8),
        "t10k-labels-idx1-ubyte.gz": torch.arange(test) % 10,
    }
    parts.update(overrides)
    directory.mkdir(parents=True, exist_ok=True)
    for name, tensor in parts.items():
        write_idx(directory / name, tensor)


def test_idx_round_trip(tmp_path):
    x = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    for name in ("a-idx3-ubyte", "b-idx3-ubyte.gz"):
        write_idx(tmp_path / name, x)
        assert torch.equal(read_idx(tmp_path / name), x)


def test_idx_rejects_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "full", torch.zeros(10, 4, 4, dtype=torch.uint8))
    raw = (tmp_path / "full").read_bytes()
    (tmp_path / "short").write_bytes(raw[:-5])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(tmp_path / "short")
    gz = gzip.compress(raw)
    (tmp_path / "cut.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(DataError, match="corrupt or truncated"):
        read_idx(tmp_path / "cut.gz")


def test_fashion_mnist_checks_sizes_and_labels(tmp_path):
    _write_fashion(tmp_path / "ok")
    train_x, train_y, test_x, test_y = load_fashion_mnist(tmp_path / "ok", download=False, expected=(40, 20))
    assert train_x.shape == (40, 28, 28) and test_y.shape == (20,)
    with pytest.raises(DataError, match="expected 60000"):
        load_fashion_mnist(tmp_path / "ok", download=False)
    _write_fashion(tmp_path / "labels", **{"train-labels-idx1-ubyte.gz": torch.arange(40) % 12})
    with pytest.raises(DataError, match="labels span 0..11"):
        load_fashion_mnist(tmp_path / "labels", download=False, expected=(40, 20))
    _write_fashion(tmp_path / "mismatch", **{"t10k-labels-idx1-ubyte.gz": torch.arange(19) % 10})
    with pytest.raises(DataError, match="do not belong together"):
        load_fashion_mnist(tmp_path / "mismatch", download=False, expected=(40, 20))
    _write_fashion(tmp_path / "unbalanced", **{"train-labels-idx1-ubyte.gz": torch.zeros(40, dtype=torch.int64)})
    with pytest.raises(DataError, match="not the dataset's equal counts"):
        load_fashion_mnist(tmp_path / "unbalanced", download=False, expected=(40, 20))


def test_fashion_mnist_missing_and_incomplete(tmp_path, monkeypatch):
    monkeypatch.setattr(fxdata, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "empty", download=False)
    _write_fashion(tmp_path / "part")
    (tmp_path / "part" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="incomplete: missing t10k-labels-idx1-ubyte"):
        load_fashion_mnist(tmp_path / "part", download=False)


@pytest.mark.skipif(
    not (fxdata.FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist_split():
    data = fxdata.load_data("fashion-mnist", download=False)
    assert (len(data.train), len(data.val), len(data.test)) == (55_000, 5_000, 10_000)
    assert data.train.images.shape[1:] == (1, 28, 28) and data.num_classes == 10
    assert abs(data.mean[0] - 0.286) < 0.01


def test_split_is_deterministic_and_disjoint():
    a_train, a_val = split_indices(100, 10, split_seed=0)
    b_train, b_val = split_indices(100, 10, split_seed=0)
    assert torch.equal(a_val, b_val) and len(a_val) == 10 and len(a_train) == 90
    assert not set(a_train.tolist()) & set(a_val.tolist())
    assert not torch.equal(split_indices(100, 10, split_seed=1)[1], a_val)


def test_tensor_loader_is_a_function_of_seed_and_epoch():
    data = fxdata.load_data("synthetic")
    loader = TensorLoader(data.train, data, 64, train=True, seed=3)
    loader.set_epoch(2)
    first = [x.clone() for x, _ in loader]
    again = TensorLoader(data.train, data, 64, train=True, seed=3)
    again.set_epoch(2)
    assert all(torch.equal(a, b) for a, (b, _) in zip(first, again))
    again.set_epoch(3)
    assert not torch.equal(first[0], next(iter(again))[0])
    assert len(loader) == len(data.train) // 64
    evaluation = TensorLoader(data.test, data, 64, train=False)
    assert sum(y.numel() for _, y in evaluation) == len(data.test)


def test_imagefolder(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(5):
                pixels = torch.randint(0, 256, (20, 24, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / split / label / f"{i}.png")
    data = fxdata.load_data("imagefolder", str(tmp_path), val_size=2, image_size=16)
    assert (len(data.train), len(data.val), len(data.test), data.num_classes) == (8, 2, 10, 2)
    loader = fxdata.make_loader(data, "train", 4, num_workers=0)
    batches = list(loader)
    assert len(batches) == 2 and batches[0][0].shape == (4, 3, 16, 16)
    with pytest.raises(DataError, match="not an ImageFolder layout"):
        fxdata.load_data("imagefolder", str(tmp_path / "train"))


def test_cifar_arrays_become_checked_tensor_splits(monkeypatch):
    """torchvision's CIFAR classes, faked (no network here): HWC uint8 arrays -> NCHW splits, checked."""
    import numpy as np
    from torchvision import datasets

    class FakeCifar10:
        def __init__(self, root, train, download):
            n = 50_000 if train else 10_000
            self.data = np.zeros((n, 32, 32, 3), dtype=np.uint8)
            self.data[:, 0, 0, 2] = 255
            self.targets = [i % 10 for i in range(n)]

    monkeypatch.setattr(datasets, "CIFAR10", FakeCifar10)
    data = fxdata.load_data("cifar10", val_size=5000)
    assert (len(data.train), len(data.val), len(data.test)) == (45_000, 5_000, 10_000)
    assert data.train.images.shape[1:] == (3, 32, 32) and int(data.train.images[0, 2, 0, 0]) == 255
    assert data.augment_padding == 4 and data.in_channels == 3

    class Broken(FakeCifar10):
        def __init__(self, root, train, download):
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")

    monkeypatch.setattr(datasets, "CIFAR10", Broken)
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        fxdata.load_data("cifar10", "/nonexistent")
