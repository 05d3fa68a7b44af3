"""SparseWeight: the torch.nn.utils.parametrize parametrization installed on each pooled weight.

It reads the global tau from the model's GlobalThreshold by reference (a plain attribute, so the
threshold is not registered as a child of every layer) and returns the method's effective weight.
In a model sparsified without a graph node (in place, or by walking its modules) the first pooled
weight's SparseWeight also holds the threshold as its child ``global_threshold``: its state is then in
the model's state_dict, under ``<module>.parametrizations.<name>.0.global_threshold``, while the module
tree the user sees is unchanged.
After ST-3's fix step it holds a frozen boolean ``mask`` and returns w * mask (pruned weights then
get no gradient).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .methods.base import Method


class _Reference:
    """A plain holder: nn.Module does not register what it holds as a submodule."""

    def __init__(self, target):
        self.target = target


HOSTED_THRESHOLD_NAME = "global_threshold"


class SparseWeight(nn.Module):
    def __init__(self, method: Method, threshold: nn.Module, output_axis: int = 0):
        super().__init__()
        self.method = method
        self.output_axis = int(output_axis)
        self._threshold = _Reference(threshold)
        self.register_buffer("mask", None)

    @property
    def threshold(self) -> nn.Module:
        return self._threshold.target

    def host_threshold_(self) -> None:
        """Register the threshold as this parametrization's child, so that the model's state_dict holds it."""
        self.add_module(HOSTED_THRESHOLD_NAME, self.threshold)

    def forward(self, weight: Tensor) -> Tensor:
        mask: Optional[Tensor] = self.mask
        if mask is not None:
            return weight * mask
        threshold = self._threshold.target
        if not threshold.prunes:  # before the ramp: the dense weight itself, bitwise
            return weight
        if self.output_axis == 0:
            return self.method.apply(weight, threshold.tau)
        # contiguous both ways: the methods view rows, and the folded weight is stored contiguous,
        # so the sparsified and the folded model run the same kernels (bitwise equal outputs)
        channels_first = weight.movedim(self.output_axis, 0).contiguous()
        return self.method.apply(channels_first, threshold.tau).movedim(0, self.output_axis).contiguous()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint taken after fix_mask_ carries the mask: create the buffer so it can be loaded
        if self.mask is None and prefix + "mask" in state_dict:
            self.mask = state_dict[prefix + "mask"].clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        axis = f", output_axis={self.output_axis}" if self.output_axis else ""
        return f"method={self.method.name}{axis}" + (", mask=frozen" if self.mask is not None else "")
