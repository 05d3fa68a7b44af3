"""Datasets for `fxsparse train`: checked loading, a deterministic validation split, fast loaders.

Built in: Fashion-MNIST (the default; read from IDX files with full checks, found in --data-dir, in
Debian's ``dataset-fashion-mnist`` at /usr/share/datasets/fashion-mnist, or fetched with torchvision's
downloader), CIFAR-10/100 (torchvision), any ImageFolder directory, and a small synthetic set for smoke
runs and tests. Every dataset is split into train / val / test: the validation split is held out of the
training set with a fixed seed (``split_seed``), so the test set is never used for a choice.

Small datasets are kept in memory as uint8 tensors (on the training device) and batched by
``TensorLoader``, whose shuffling and augmentation are a pure function of (seed, epoch): a resumed run
sees exactly the batches the uninterrupted one would have seen.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import struct
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import DataError

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}  # what torchvision extracts
DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagefolder", "synthetic")
BUILTIN_SHAPES = {  # Data.shape of the built-in datasets (an imagefolder's depends on its folders)
    "fashion-mnist": {"num_classes": 10, "in_channels": 1, "image_size": 28},
    "cifar10": {"num_classes": 10, "in_channels": 3, "image_size": 32},
    "cifar100": {"num_classes": 100, "in_channels": 3, "image_size": 32},
    "synthetic": {"num_classes": 4, "in_channels": 1, "image_size": 12},
}

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}  # IDX is big-endian


# ---------------------------------------------------------------------------------------------------
# IDX files (the MNIST family's format)
# ---------------------------------------------------------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise DataError(
            f"cannot read {path}: {error} (the file is corrupt or truncated; delete it and fetch it again)"
        ) from error


def read_idx(path: str | Path) -> Tensor:
    """Read one IDX file (optionally .gz) into a tensor, checking magic, shape and length."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'}); expected 0000 08 0N")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes for {ndim} dimensions)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = dtype.itemsize * math.prod(shape)
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: the header announces shape {tuple(shape)} ({expected} bytes of data) but the file holds "
            f"{len(raw) - header} bytes; the file is truncated or corrupt"
        )
    tensor = torch.from_numpy(np.frombuffer(raw, dtype=dtype, offset=header).astype(dtype.newbyteorder("=")))
    return tensor.reshape(shape)


def write_idx(path: str | Path, tensor: Tensor) -> None:
    """Write a uint8 tensor as an IDX file (gzip when the name ends in .gz); for tests and tools."""
    path = Path(path)
    tensor = tensor.to(torch.uint8).contiguous()
    payload = (
        bytes([0, 0, 0x08, tensor.dim()]) + struct.pack(f">{tensor.dim()}I", *tensor.shape) + tensor.numpy().tobytes()
    )
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as handle:
        handle.write(payload)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (
        directory / f"{stem}.gz",
        directory / stem,
        directory / "FashionMNIST" / "raw" / f"{stem}.gz",
        directory / "FashionMNIST" / "raw" / stem,
    ):
        if candidate.is_file():
            return candidate
    return None


def check_labelled_images(
    images: Tensor,
    labels: Tensor,
    *,
    name: str,
    count: int | None,
    height: int,
    width: int,
    num_classes: int,
    balanced: bool,
) -> None:
    """Check a (N, H, W) image tensor and its labels; raise DataError saying what is wrong."""
    if images.dim() != 3 or tuple(images.shape[1:]) != (height, width):
        raise DataError(f"{name}: images have shape {tuple(images.shape)}, expected (N, {height}, {width})")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{name}: {tuple(labels.shape)} labels for {images.shape[0]} images; the files do not belong together"
        )
    if count is not None and images.shape[0] != count:
        raise DataError(
            f"{name}: {images.shape[0]} images, expected {count}; the file is incomplete or not this dataset"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(f"{name}: labels span {int(labels.min())}..{int(labels.max())}, expected 0..{num_classes - 1}")
    if balanced and labels.numel():
        per_class = torch.bincount(labels.long(), minlength=num_classes)
        if int(per_class.min()) != int(per_class.max()):
            raise DataError(
                f"{name}: class counts {per_class.tolist()} are not the dataset's equal counts; the labels are corrupt"
            )


def _fashion_mnist_dirs(data_dir: str | Path | None) -> list[Path]:
    dirs = []
    if data_dir is not None:
        dirs += [Path(data_dir), Path(data_dir) / "fashion-mnist"]
    dirs.append(FASHION_MNIST_SYSTEM_DIR)
    return dirs


def load_fashion_mnist(
    data_dir: str | Path | None = None, download: bool = True, expected: tuple[int, int] = (60_000, 10_000)
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train_images, train_labels, test_images, test_labels) as uint8 (N, 28, 28) / int64 (N,), checked.

    Looks in ``data_dir`` (and data_dir/fashion-mnist, data_dir/FashionMNIST/raw), then in Debian's
    /usr/share/datasets/fashion-mnist; if none holds the four files and ``download`` is set, uses
    torchvision's downloader into ``data_dir`` (default ./data).
    """
    searched = _fashion_mnist_dirs(data_dir)
    found: dict[str, Path] | None = None
    for directory in searched:
        paths = {key: _find_idx(directory, stem) for key, stem in FASHION_MNIST_FILES.items()}
        if all(paths.values()):
            found = paths  # type: ignore[assignment]
            break
        if any(paths.values()):
            missing = [FASHION_MNIST_FILES[k] for k, v in paths.items() if v is None]
            raise DataError(f"Fashion-MNIST in {directory} is incomplete: missing {', '.join(missing)} (.gz or raw)")
    if found is None:
        if not download:
            raise DataError(_missing_fashion_mnist_message(searched))
        root = Path(data_dir) if data_dir is not None else Path("data")
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(root), train=True, download=True)
            FashionMNIST(str(root), train=False, download=True)
        except Exception as error:  # network errors come in many types
            raise DataError(
                _missing_fashion_mnist_message(searched) + f"\nThe download into {root} failed too: {error}"
            ) from error
        paths = {key: _find_idx(root, stem) for key, stem in FASHION_MNIST_FILES.items()}
        if not all(paths.values()):
            raise DataError(
                f"torchvision's download into {root} did not leave the four IDX files; "
                + _missing_fashion_mnist_message(searched)
            )
        found = paths  # type: ignore[assignment]
    tensors = {key: read_idx(path) for key, path in found.items()}
    train_x, train_y = tensors["train_images"], tensors["train_labels"].long()
    test_x, test_y = tensors["test_images"], tensors["test_labels"].long()
    for split, x, y, count in (("train", train_x, train_y, expected[0]), ("test", test_x, test_y, expected[1])):
        if x.dtype != torch.uint8:
            raise DataError(f"Fashion-MNIST {split} images in {found[split + '_images']} are {x.dtype}, expected uint8")
        check_labelled_images(
            x,
            y,
            name=f"Fashion-MNIST {split} ({found[split + '_images'].parent})",
            count=count,
            height=28,
            width=28,
            num_classes=10,
            balanced=True,
        )
    return train_x, train_y, test_x, test_y


def _missing_fashion_mnist_message(searched: Sequence[Path]) -> str:
    return (
        "Fashion-MNIST not found; looked for train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz), "
        f"t10k-images-idx3-ubyte(.gz), t10k-labels-idx1-ubyte(.gz) in: {', '.join(str(p) for p in searched)}. "
        "Offline: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or copy the files into --data-dir; "
        "online: leave --download on (the default) and torchvision fetches them into --data-dir (default ./data)."
    )


# ---------------------------------------------------------------------------------------------------
# Datasets as a bundle: train / val / test plus what a model needs to know
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TensorSplit:
    """Images as uint8 (N, C, H, W) and int64 labels (N,), all in memory."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: Tensor) -> TensorSplit:
        return TensorSplit(self.images[index], self.labels[index])


@dataclasses.dataclass
class Data:
    name: str
    train: object  # TensorSplit or a torch Dataset
    val: object
    test: object
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment_padding: int = 0  # random-crop padding for in-memory datasets
    augment_flip: bool = False

    @property
    def shape(self) -> dict[str, int]:
        """What a model needs to know about the data (a training checkpoint records it for export)."""
        return {"num_classes": self.num_classes, "in_channels": self.in_channels, "image_size": self.image_size}


def split_indices(count: int, val_size: int, split_seed: int) -> tuple[Tensor, Tensor]:
    """Deterministic (train_index, val_index) for holding ``val_size`` examples out of ``count``."""
    if not 0 <= val_size < count:
        raise ValueError(f"val_size must be in [0, {count}) for a training set of {count} examples; got {val_size}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(split_seed))
    return order[val_size:].sort().values, order[:val_size].sort().values


def _stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, C, H, W) images in [0, 1], in chunks (no float copy of the set)."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in images.split(2048):
        x = chunk.transpose(0, 1).reshape(images.shape[1], -1).double().div_(255)
        total += x.sum(1)
        squares += x.square().sum(1)
    count = images.numel() // images.shape[1]
    mean = total / count
    std = ((squares / count - mean.square()) * count / max(count - 1, 1)).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def _tensor_data(
    name: str,
    train: TensorSplit,
    test: TensorSplit,
    num_classes: int,
    val_size: int,
    split_seed: int,
    padding: int,
    flip: bool,
) -> Data:
    train_index, val_index = split_indices(len(train), val_size, split_seed)
    fit = train.subset(train_index)
    mean, std = _stats(fit.images)
    return Data(
        name,
        fit,
        train.subset(val_index),
        test,
        num_classes,
        train.images.shape[1],
        train.images.shape[-1],
        mean,
        std,
        padding,
        flip,
    )


def _synthetic(count: int, seed: int, num_classes: int = 4, size: int = 12) -> TensorSplit:
    """A learnable toy set: each class is a bright square in its own quadrant plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (count,), generator=g)
    images = torch.randint(0, 96, (count, 1, size, size), generator=g, dtype=torch.int64)
    half = size // 2
    for c in range(num_classes):
        rows, cols = divmod(c % 4, 2)
        sel = labels == c
        images[sel, :, rows * half : (rows + 1) * half, cols * half : (cols + 1) * half] += 150
    return TensorSplit(images.clamp_(0, 255).to(torch.uint8), labels)


def load_data(
    name: str = "fashion-mnist",
    data_dir: str | None = None,
    *,
    val_size: int = 5000,
    split_seed: int = 0,
    download: bool = True,
    image_size: int = 224,
    augment: bool = True,
) -> Data:
    """Load a dataset by name and split it into train / val / test (see the module docstring)."""
    name = name.lower()
    if name in ("fashion-mnist", "fashion_mnist", "fashionmnist", "fmnist"):
        train_x, train_y, test_x, test_y = load_fashion_mnist(data_dir, download)
        return _tensor_data(
            "fashion-mnist",
            TensorSplit(train_x.unsqueeze(1), train_y),
            TensorSplit(test_x.unsqueeze(1), test_y),
            10,
            val_size,
            split_seed,
            padding=2 if augment else 0,
            flip=augment,
        )
    if name in ("cifar10", "cifar100"):
        return _load_cifar(name, data_dir, val_size, split_seed, download, augment)
    if name == "imagefolder":
        return _load_imagefolder(data_dir, val_size, split_seed, image_size, augment)
    if name == "synthetic":
        return _tensor_data(
            "synthetic",
            _synthetic(1200, 1),
            _synthetic(300, 2),
            4,
            min(val_size, 300),
            split_seed,
            padding=1 if augment else 0,
            flip=False,
        )
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} (imagefolder needs --data-dir)")


def load_data_of(config) -> Data:
    """The data a run's Config names: its dataset, folder, split, download permission, image size and augmentation."""
    return load_data(
        config.dataset,
        config.data_dir,
        val_size=config.val_size,
        split_seed=config.split_seed,
        download=config.download,
        image_size=config.image_size,
        augment=config.augment,
    )


def _load_cifar(name: str, data_dir: str | None, val_size: int, split_seed: int, download: bool, augment: bool) -> Data:
    from torchvision import datasets

    root = data_dir or "data"
    cls, classes = (datasets.CIFAR10, 10) if name == "cifar10" else (datasets.CIFAR100, 100)
    try:
        train, test = cls(root, train=True, download=download), cls(root, train=False, download=download)
    except (RuntimeError, OSError) as error:  # "Dataset not found or corrupted ...", or no network (URLError)
        raise DataError(
            f"{name} not usable in {root}: {error} (it is downloaded with --download, the default, which "
            f"needs a network; or put torchvision's {CIFAR_FOLDERS[name]} folder in {root})"
        ) from error
    splits = []
    for split, ds, count in (("train", train, 50_000), ("test", test, 10_000)):
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        labels = torch.tensor(ds.targets, dtype=torch.int64)
        check_labelled_images(
            images[:, 0],
            labels,
            name=f"{name} {split} ({root})",
            count=count,
            height=32,
            width=32,
            num_classes=classes,
            balanced=True,
        )
        splits.append(TensorSplit(images, labels))
    return _tensor_data(
        name, splits[0], splits[1], classes, val_size, split_seed, padding=4 if augment else 0, flip=augment
    )


def _load_imagefolder(data_dir: str | None, val_size: int, split_seed: int, image_size: int, augment: bool) -> Data:
    from torch.utils.data import Subset
    from torchvision import datasets, transforms

    if not data_dir:
        raise DataError(
            "--dataset imagefolder needs --data-dir DIR with DIR/train/<class>/* and DIR/val/<class>/* (or DIR/test)"
        )
    root = Path(data_dir)
    train_dir = root / "train"
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataError(
            f"{root} is not an ImageFolder layout: expected {train_dir}/<class>/* and {root}/val/<class>/* (or test/)"
        )
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    normalize = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    train_tf = transforms.Compose(
        (
            [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
            if augment
            else [transforms.Resize(int(image_size * 8 / 7)), transforms.CenterCrop(image_size)]
        )
        + normalize
    )
    eval_tf = transforms.Compose(
        [transforms.Resize(int(image_size * 8 / 7)), transforms.CenterCrop(image_size)] + normalize
    )
    fit_view = datasets.ImageFolder(str(train_dir), transform=train_tf)
    val_view = datasets.ImageFolder(str(train_dir), transform=eval_tf)
    test = datasets.ImageFolder(str(test_dir), transform=eval_tf)
    if test.classes != fit_view.classes:
        raise DataError(
            f"{test_dir} has classes {test.classes[:5]}... but {train_dir} has {fit_view.classes[:5]}...; "
            "they must match"
        )
    train_index, val_index = split_indices(len(fit_view), val_size, split_seed)
    return Data(
        "imagefolder",
        Subset(fit_view, train_index.tolist()),
        Subset(val_view, val_index.tolist()),
        test,
        len(fit_view.classes),
        3,
        image_size,
        mean,
        std,
    )


# ---------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------
def _epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 100_003 + epoch)


class TensorLoader:
    """Batches of an in-memory split, normalised on the fly, with optional pad-and-crop and flip.

    The order and the augmentation of epoch ``e`` depend only on (seed, e): call ``set_epoch(e)``.
    """

    def __init__(
        self,
        split: TensorSplit,
        data: Data,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        device: str | torch.device = "cpu",
        drop_last: bool | None = None,
    ):
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.drop_last = train if drop_last is None else drop_last
        self.padding = data.augment_padding if train else 0
        self.flip = data.augment_flip and train
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(data.mean, device=self.device).view(shape) * 255
        self.std = torch.tensor(data.std, device=self.device).view(shape) * 255

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _augment(self, x: Tensor, g: torch.Generator) -> Tensor:
        n, _, h, w = x.shape
        if self.padding:
            p = self.padding
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (n, 1, 1), generator=g, device=x.device)
            dx = torch.randint(0, 2 * p + 1, (n, 1, 1), generator=g, device=x.device)
            rows = (dy + torch.arange(h, device=x.device).view(1, h, 1)).expand(n, h, w)
            cols = (dx + torch.arange(w, device=x.device).view(1, 1, w)).expand(n, h, w)
            batch = torch.arange(n, device=x.device).view(n, 1, 1).expand(n, h, w)
            x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
        if self.flip:
            flip = torch.rand(n, generator=g, device=x.device) < 0.5
            x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
        return x

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        g = _epoch_generator(self.seed, self.epoch, self.device)
        n = len(self.labels)
        order = (
            torch.randperm(n, generator=g, device=self.device) if self.train else torch.arange(n, device=self.device)
        )
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            x = self.images[index].float()
            if self.train:
                x = self._augment(x, g)
            yield (x - self.mean) / self.std, self.labels[index]


class DatasetLoader:
    """A torch DataLoader per epoch with a (seed, epoch)-seeded shuffle, for datasets that are not in memory."""

    def __init__(
        self,
        dataset,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        num_workers: int = 4,
        device: str | torch.device = "cpu",
    ):
        self.dataset, self.batch_size, self.train, self.seed = dataset, batch_size, train, seed
        self.num_workers = num_workers
        self.device = torch.device(device)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        from torch.utils.data import DataLoader

        loader = DataLoader(
            self.dataset,
            self.batch_size,
            shuffle=self.train,
            drop_last=self.train,
            num_workers=self.num_workers,
            generator=_epoch_generator(self.seed, self.epoch, torch.device("cpu")),
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def make_loader(
    data: Data,
    split: str,
    batch_size: int,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    num_workers: int = 4,
    limit: int | None = None,
):
    """A loader over data.train / data.val / data.test (``limit``: only the first N examples, for smoke runs)."""
    dataset = getattr(data, split)
    train = split == "train"
    if limit is not None and limit < len(dataset):
        if isinstance(dataset, TensorSplit):
            dataset = dataset.subset(torch.arange(limit))
        else:
            from torch.utils.data import Subset

            dataset = Subset(dataset, range(limit))
    if isinstance(dataset, TensorSplit):
        return TensorLoader(dataset, data, batch_size, train=train, seed=seed, device=device)
    return DatasetLoader(dataset, batch_size, train=train, seed=seed, num_workers=num_workers, device=device)
