"""The model names fxsparse knows, and build_model, the one resolver of a model name: the built-in models
(CIFAR-style ResNet-20 of both papers, a small fast CNN), any timm name, or a model of your own
("package.module:callable").

A name read from a file (a CSR checkpoint's "architecture", a training checkpoint's config) is untrusted: it
only selects among the names fxsparse knows. "package.module:callable" imports and runs code, so it is
honoured only with ``allow_import=True``, which callers pass for a name the user typed (the command line,
or code).

resnet20: He et al. 2016 (sec. 4.2), 3 stages of 3 basic blocks with 16/32/64 channels times ``width``
(ST-3 uses width 1; Feather's CIFAR-100 model is width 2, i.e. 32/64/128, about 1.09M prunable weights),
3x3 stem, global average pooling, linear classifier. Downsampling shortcuts are 1x1 conv + BN (option B).
cnn: three conv-BN-ReLU-maxpool stages (32/64/128 times ``width``) and a two-layer classifier head; about
0.39M weights at width 1 and 7.7M MACs per 28x28 image, which trains at ~20 s per Fashion-MNIST epoch on
two CPU cores. Its large, cheap linear layer next to expensive convs makes the MAC/sparsity trade-off
between global magnitude ranking (st3) and ST-3-sigma's scaled ranking visible.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import Tensor, nn

CIFAR_RESNETS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")  # these names shadow no timm model
BUILTIN_MODELS = ("cnn",) + CIFAR_RESNETS
INPUT_SIZES = {"cnn": (1, 28), **{name: (3, 32) for name in CIFAR_RESNETS}}  # (channels, pixels): Fashion-MNIST, CIFAR


class UntrustedModelName(ValueError):
    """A "module:callable" model name read from a file: it is not imported."""


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR-style ResNet of depth 6n+2 (ResNet-20: n=3)."""

    def __init__(self, depth: int = 20, width: float = 1.0, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n+2 (20, 32, 44, 56, 110); got {depth}")
        blocks = (depth - 2) // 6
        widths = [max(1, round(c * width)) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers, in_planes = [], widths[0]
        for stage, planes in enumerate(widths):
            stage_blocks = []
            for b in range(blocks):
                stage_blocks.append(BasicBlock(in_planes, planes, 2 if stage > 0 and b == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*stage_blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU-maxpool stages and a two-layer head: the fast CPU preset's model."""

    def __init__(self, width: float = 1.0, num_classes: int = 10, in_channels: int = 1, hidden: int = 256):
        super().__init__()
        c1, c2, c3 = (max(1, round(c * width)) for c in (32, 64, 128))
        hidden = max(1, round(hidden * width))

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(stage(in_channels, c1), stage(c1, c2), stage(c2, c3), nn.AdaptiveAvgPool2d(3))
        self.fc1 = nn.Linear(c3 * 9, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.relu(self.fc1(self.features(x).flatten(1))))


def build_model(
    name: str,
    num_classes: int | None = None,
    in_channels: int | None = None,
    width: float = 1.0,
    *,
    allow_import: bool = False,
) -> nn.Module:
    """The model of every command (train, export, flops) and of accelerate_checkpoint, with random weights.

    ``name``: a built-in model (cnn, resnet20/32/44/56/110; ``width`` multiplies their channels), a timm
    model name, or, only with ``allow_import=True`` (a name the user typed, never one read from a file),
    "package.module:callable" (a function or class, called with ``num_classes=`` when it is given, else
    with no arguments; or an nn.Module instance). ``num_classes`` / ``in_channels`` left None keep the
    model's own default (built-ins: 10 classes, the data each was made for; see INPUT_SIZES).
    """
    if width != 1.0 and name.lower() not in BUILTIN_MODELS:
        raise ValueError(f"--width applies to the built-in models ({', '.join(BUILTIN_MODELS)}), not to {name!r}")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    key = name.lower()
    if key in BUILTIN_MODELS:
        channels = INPUT_SIZES[key][0] if in_channels is None else in_channels
        if key == "cnn":
            return SmallCNN(width, in_channels=channels, **kwargs)
        return CifarResNet(int(key[6:]), width, in_channels=channels, **kwargs)
    if ":" in name:
        if not allow_import:
            raise UntrustedModelName(
                f"the model name {name!r} comes from a file, and a 'module:callable' would import and run the code "
                f"it names; fxsparse builds only the models it knows from a file ({', '.join(BUILTIN_MODELS)}, "
                "timm names): if you trust it, name the model yourself (on the command line, or in code)"
            )
        return _from_callable(name, kwargs)
    import timm

    if not timm.is_model(name):
        raise ValueError(
            f"unknown model {name!r}: not built in ({', '.join(BUILTIN_MODELS)}), not a timm model "
            "(see timm.list_models('resnet*')) and not 'package.module:callable'"
        )
    if in_channels is not None:
        kwargs["in_chans"] = in_channels
    return timm.create_model(name, pretrained=False, **kwargs)


def _from_callable(spec: str, kwargs: dict) -> nn.Module:
    module_name, _, attribute = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} for model {spec!r}: {exc}") from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{module_name!r} has no attribute {attribute!r} (model {spec!r})")
        target = getattr(target, part)
    model = target if isinstance(target, nn.Module) else target(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
    return model


def default_input_size(name: str, model: nn.Module, in_channels: int | None = None) -> tuple[int, ...]:
    """One input without the batch dimension: the built-ins' data, timm's pretrained_cfg, else 3x224x224."""
    key = name.lower()
    if key in INPUT_SIZES:
        channels, size = INPUT_SIZES[key]
        return (channels if in_channels is None else in_channels, size, size)
    size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
    return size if in_channels is None else (in_channels, *size[1:])
