"""Which weight a conv/linear layer's op multiplies: the weight it stores, or something computed from it.

torch's own Conv1d/2d/3d and Linear multiply ``self.weight`` (for a parametrized weight, the value of its
parametrizations). A subclass that overrides ``forward`` (or ``_conv_forward``) may multiply something else:
timm's StdConv2d and ScaledStdConv2d standardize the weight first, so pruning the stored weight would leave
the weight the op multiplies dense. `multiplies_stored_weight` runs such a layer once on a small input and
watches the conv/linear calls it makes (a TorchFunctionMode, torch's public hook on function calls).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from .layers import layer_types_outside_torch

_WEIGHT_CALLS = {F.conv1d: 1, F.conv2d: 1, F.conv3d: 1, F.linear: 1}  # function -> position of its weight

# Layer classes outside torch.nn whose forward multiplies ``self.weight`` as stored by design (for instance
# a library's own linear layer): they are trusted like torch's own and never probed.
STORED_WEIGHT_LAYERS: set[type] = set()


def _defined_by_torch(cls: type, name: str) -> bool:
    method = getattr(cls, name, None)
    return method is None or getattr(method, "__module__", "").startswith("torch.nn.modules.")


def has_torch_forward(module: nn.Module) -> bool:
    """True when the layer runs torch's own forward, or is one of the `STORED_WEIGHT_LAYERS` (so its op
    multiplies ``self.weight`` as it is)."""
    cls = parametrize.type_before_parametrizations(module)
    if issubclass(cls, tuple(STORED_WEIGHT_LAYERS) + layer_types_outside_torch()):  # transformers' Conv1D
        return True
    return _defined_by_torch(cls, "forward") and _defined_by_torch(cls, "_conv_forward")


@dataclasses.dataclass(frozen=True)
class Verdict:
    stored: bool | None  # True: the op multiplies the stored weight; False: another tensor; None: unknown
    detail: str  # why, for a warning


class _WeightOperands(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.operands: list[Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        position = _WEIGHT_CALLS.get(func)
        if position is not None:
            weight = args[position] if len(args) > position else kwargs.get("weight")
            if isinstance(weight, Tensor):
                self.operands.append(weight)
        return func(*args, **kwargs)


def _probe_input(module: nn.Module, weight: Tensor) -> Tensor:
    """A small input the layer accepts: one sample, the smallest spatial size with a valid output."""
    options = {"dtype": weight.dtype, "device": weight.device}
    if isinstance(module, nn.modules.conv._ConvNd):
        sizes = [(k - 1) * d + s for k, d, s in zip(module.kernel_size, module.dilation, module.stride)]
        return torch.zeros(1, module.in_channels, *sizes, **options)
    return torch.zeros(1, module.in_features, **options)


def _same_storage(a: Tensor, b: Tensor) -> bool:
    if a is b:
        return True
    try:
        pointer = a.untyped_storage().data_ptr()
        return pointer != 0 and pointer == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # meta or other storage-less tensors
        return False


@torch.no_grad()
def multiplies_stored_weight(module: nn.Module) -> Verdict:
    """Run the conv/linear ``module`` once (eval mode, no grad, state restored) and compare the weight of
    every F.conv*/F.linear call it makes with the weight it stores."""
    if has_torch_forward(module):
        return Verdict(True, "torch's own forward")
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    watch = _WeightOperands()
    try:
        with parametrize.cached():
            stored = module.weight
            x = _probe_input(module, stored)
            with watch:
                module(x)
    except Exception as exc:  # any forward may refuse a synthetic input
        return Verdict(None, f"its forward could not be checked on a sample input ({type(exc).__name__}: {exc})")
    finally:
        for m, training in modes:
            m.training = training
    if not watch.operands:
        return Verdict(None, "its forward makes no F.conv*/F.linear call fxsparse can see")
    if all(_same_storage(w, stored) for w in watch.operands):
        return Verdict(True, "its forward multiplies the stored weight")
    return Verdict(
        False, f"its forward ({type(module).__name__}) transforms the weight before the convolution/linear op"
    )
