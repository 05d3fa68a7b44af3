"""Layers that hold their weight in a sparse kernel's own format (fxsparse.inference's SparseConv2d and
SparseLinear), and the one interface through which the rest of fxsparse sees them.

Such a layer subclasses ``KernelLayer``: it computes what nn.Conv2d / nn.Linear would with a weight of
``kernel_weight().shape`` ((O, I/groups, kh, kw) for a conv, (out, in) for a linear), and ``kernel_weight()``
says how many of that weight's entries it multiplies (its nonzeros), in which dtype, on which device. From
it, flops() counts the layer's dense MACs (from the shape and the input and output shapes, as for the plain
layer) and its sparse MACs (from the nonzeros), layer_densities() and realized_sparsity() count its zeros,
and save_csr refuses the model (the folded model is what is saved). ``layer.weight`` is a stand-in of the
weight's shape, dtype and device that refuses any computation: code that reads ``layer.weight.dtype`` (as
Hugging Face's ViT and T5 do) works, code that multiplies by it fails with a message saying what to do.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn


@dataclasses.dataclass(frozen=True)
class KernelWeight:
    """The weight a kernel layer multiplies by, as the plain layer would store it."""

    shape: tuple[int, ...]
    nonzeros: int
    dtype: torch.dtype
    device: torch.device

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# what may be read off the stand-in: its metadata, never its values
_METADATA = {
    *(
        getattr(Tensor, name).__get__
        for name in ("dtype", "shape", "device", "ndim", "layout", "requires_grad", "is_cuda", "is_cpu", "is_meta")
        if hasattr(Tensor, name)
    ),
    Tensor.size,
    Tensor.dim,
    Tensor.numel,
    Tensor.is_floating_point,
    Tensor.is_complex,
    Tensor.element_size,
}


class WeightReadError(RuntimeError):
    """Raised when code computes with a kernel layer's ``.weight`` (``layer_name``: the layer's name)."""

    def __init__(self, layer_name: str) -> None:
        super().__init__(
            f"layer {layer_name!r} runs a sparse kernel and holds no dense weight: its .weight gives only its shape, "
            "dtype and device; a module that computes with it cannot be accelerated: pass its name in exclude=[...] "
            "to fxsparse.accelerate"
        )
        self.layer_name = layer_name


class WeightStandIn(Tensor):
    """``layer.weight`` of a kernel layer: the weight's shape, dtype and device, and no values (one element
    of storage); every computation with it raises."""

    layer_name = ""

    @classmethod
    def of(cls, weight: KernelWeight, layer_name: str) -> WeightStandIn:
        stand_in = torch.empty((), dtype=weight.dtype, device=weight.device).expand(weight.shape).as_subclass(cls)
        stand_in.layer_name = layer_name
        return stand_in

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        operands = [*args, *(kwargs or {}).values()]  # F.linear(x, weight=layer.weight) passes it by keyword
        raise WeightReadError(next((a.layer_name for a in operands if isinstance(a, WeightStandIn)), ""))

    def __repr__(self) -> str:
        return f"WeightStandIn(layer={self.layer_name!r}, shape={list(self.shape)}, dtype={self.dtype})"


class KernelLayer(nn.Module):
    """Base of the layers that run a sparse kernel (see the module docstring)."""

    def kernel_weight(self) -> KernelWeight:
        """The weight this layer multiplies by: its dense shape, its nonzeros, dtype and device."""
        raise NotImplementedError

    @property
    def weight(self) -> Tensor:
        return WeightStandIn.of(self.kernel_weight(), getattr(self, "name", ""))


def kernel_layers(model: nn.Module) -> dict[str, KernelLayer]:
    """name -> every kernel layer of ``model``."""
    return {name: module for name, module in model.named_modules() if isinstance(module, KernelLayer)}


def kernel_table_owner(keys) -> str | None:
    """The first module name whose state_dict entries are a kernel layer's tables (row pointers and column
    indices: crow/col or offsets/indices, as fxsparse.inference.layers registers them) and no ``weight``, or
    None: how a state_dict of an accelerated model is recognised."""
    keys = set(keys)
    for key in sorted(keys):
        owner, _, leaf = key.rpartition(".")
        if leaf in ("offsets", "crow") and f"{owner}.weight" not in keys:
            partner = "indices" if leaf == "offsets" else "col"
            if f"{owner}.{partner}" in keys:
                return owner
    return None
