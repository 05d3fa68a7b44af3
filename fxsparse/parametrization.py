"""SparseWeight: the torch.nn.utils.parametrize parametrization installed on each pooled weight.

It reads the global tau from the model's GlobalThreshold by reference (a plain attribute, so the
threshold is not registered as a child of every layer) and returns the method's effective weight.
In a model sparsified without a graph node (in place, or by walking its modules) the first pooled
weight's SparseWeight also holds the threshold as its child ``global_threshold``: its state is then in
the model's state_dict, under ``<module>.parametrizations.<name>.0.global_threshold``, while the module
tree the user sees is unchanged.
After ST-3's fix step it holds a frozen boolean ``mask`` and returns w * mask (pruned weights then
get no gradient).

SparseWeight is always the last parametrization of its tensor. Usually it is the only one, and its
input is the raw parameter. It can also end a chain: after the user's own parametrizations
(``torch.nn.utils.parametrizations.weight_norm``, ``spectral_norm``) or after a `DerivedWeight`, the
computation a layer applied to its weight before the op (timm's StdConv2d standardizes it), which the
graph pass moved out of the forward. Then SparseWeight sparsifies the weight the op multiplies, and the
threshold ranks the chain's value before SparseWeight (`chain_input`), watching every tensor it depends
on (`chain_sources`).

On a mixture-of-experts stack (``experts=True``: a (E, out, in) or (E, in, out) parameter, fxsparse.layers)
the method runs on each expert's (out, in) matrix on its own, as on a linear layer of that shape: ST-3
rescales each expert's output channels, ST-3-sigma's S_l is out + in (`expert_matrices`).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import Tensor, nn

from .layers import expert_matrices
from .methods.base import Method


class _Reference:
    """A plain holder: nn.Module does not register what it holds as a submodule."""

    def __init__(self, target):
        self.target = target


HOSTED_THRESHOLD_NAME = "global_threshold"


class SparseWeight(nn.Module):
    def __init__(self, method: Method, threshold: nn.Module | None, output_axis: int = 0, experts: bool = False):
        super().__init__()
        self.method = method
        self.output_axis = int(output_axis)
        self.experts = bool(experts)
        self._threshold = _Reference(threshold)
        self._owner: _Reference | None = None  # the parametrized module, set by attach_
        self.tensor_name = ""
        self.primary = 0  # which original the threshold is given: the one of the weight's shape
        self.pool_index = 0  # position of its raw weight in the threshold's pool (per-layer thresholds)
        self.register_buffer("mask", None)

    @property
    def threshold(self) -> nn.Module:
        return self._threshold.target

    def bind_threshold_(self, threshold: nn.Module, pool_index: int = 0) -> None:
        """Read tau from ``threshold`` (the pass creates the threshold once the pool is known); with per-layer
        targets, its entry ``pool_index``."""
        self._threshold = _Reference(threshold)
        self.pool_index = int(pool_index)

    def host_threshold_(self) -> None:
        """Register the threshold as this parametrization's child, so that the model's state_dict holds it."""
        self.add_module(HOSTED_THRESHOLD_NAME, self.threshold)

    def attach_(self, module: nn.Module, tensor_name: str) -> None:
        """Remember the module whose ``tensor_name`` this parametrization ends (to evaluate its chain), and
        which of the chain's originals has the weight's shape (weight_norm's v, not g)."""
        self._owner = _Reference(module)
        self.tensor_name = tensor_name
        if self.is_chained():
            shape = self.chain_input().shape
            originals = self.originals()
            self.primary = next((i for i, t in enumerate(originals) if t.shape == shape), 0)

    def forward(self, weight: Tensor) -> Tensor:
        mask: Tensor | None = self.mask
        if mask is not None:
            return weight * mask
        threshold = self._threshold.target
        if threshold.targets is None:  # one global threshold
            if not threshold.prunes:  # before the ramp: the dense weight itself, bitwise
                return weight
            tau = threshold.tau
        else:  # per-layer targets (fxsparse.distribution)
            if not threshold.layer_prunes[self.pool_index]:
                return weight
            tau = threshold.layer_tau[self.pool_index]
        if self.experts:  # each expert's matrix is a layer of its own, at the stack's threshold
            matrices = expert_matrices(weight, self.output_axis).contiguous()
            sparse = torch.stack([self.method.apply(matrix, tau) for matrix in matrices.unbind(0)])
            return sparse.movedim(1, self.output_axis).contiguous()
        if self.output_axis == 0:
            return self.method.apply(weight, tau)
        # contiguous both ways: the methods view rows, and the folded weight is stored contiguous,
        # so the sparsified and the folded model run the same kernels (bitwise equal outputs)
        channels_first = weight.movedim(self.output_axis, 0).contiguous()
        return self.method.apply(channels_first, tau).movedim(0, self.output_axis).contiguous()

    # --- the chain before it --------------------------------------------------------------------
    def _chain(self) -> nn.ModuleList:
        return self._owner.target.parametrizations[self.tensor_name]

    def _before(self) -> list[nn.Module]:
        return [p for p in self._chain() if p is not self]

    def is_chained(self) -> bool:
        """True when other parametrizations come before this one (its input is computed)."""
        return self._owner is not None and len(self._chain()) > 1

    def originals(self) -> tuple[Tensor, ...]:
        return chain_originals(self._chain())

    def chain_sources(self) -> tuple[Tensor, ...]:
        """Every tensor the input depends on: the originals, the earlier parametrizations' buffers
        (spectral_norm's u and v) and a DerivedWeight's other parameters (ScaledStdConv2d's gain)."""
        sources = list(self.originals())
        for p in self._before():
            sources += [b for b in p.buffers() if b is not None]
            if isinstance(p, DerivedWeight):
                sources += list(p.extra_tensors())
        return tuple(sources)

    @torch.no_grad()
    def chain_input(self) -> Tensor:
        """The value this parametrization receives, computed without side effects: the earlier
        parametrizations run in eval mode (spectral_norm does no power iteration) and without grad."""
        before = self._before()
        if not before:
            return self.originals()[0]
        modes = [(m, m.training) for p in before for m in p.modules()]
        for p in before:
            p.eval()
        try:
            value = before[0](*self.originals())
            for p in before[1:]:
                value = p(value)
        finally:
            for m, training in modes:
                m.training = training
        return value

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint taken after fix_mask_ carries the mask: create the buffer so it can be loaded
        if self.mask is None and prefix + "mask" in state_dict:
            self.mask = state_dict[prefix + "mask"].clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        axis = f", output_axis={self.output_axis}" if self.output_axis else ""
        axis += ", experts=True" if self.experts else ""
        return f"method={self.method.name}{axis}" + (", mask=frozen" if self.mask is not None else "")


def chain_originals(chain: nn.ModuleList) -> tuple[Tensor, ...]:
    """The raw tensors of a torch ParametrizationList: ``original``, or ``original0``, ``original1``, ..."""
    if chain.is_tensor:
        return (chain.original,)
    return tuple(getattr(chain, f"original{i}") for i in range(chain.ntensors))


class DerivedWeight(nn.Module):
    """The computation a layer applied to its weight before the op, moved out of the traced forward.

    ``compute`` is a small GraphModule (the parameter-only subgraph the pass found in the model's graph):
    compute(weight, *extra) -> the weight the op multiplies. The extra inputs (another parameter such as
    ScaledStdConv2d's gain, a buffer) are read from their modules at every call, by reference, so they
    keep their own state_dict keys and this module holds no state.
    """

    def __init__(self, compute: fx.GraphModule, extras: list[tuple[nn.Module, str]]):
        super().__init__()
        self.compute = compute
        self._extras = [(_Reference(module), name) for module, name in extras]

    def extra_tensors(self) -> tuple[Tensor, ...]:
        return tuple(getattr(ref.target, name) for ref, name in self._extras)

    def forward(self, weight: Tensor) -> Tensor:
        return self.compute(weight, *self.extra_tensors())
