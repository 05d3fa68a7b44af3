"""The pool: every weight a sparsified model thresholds globally, and what can be read off it."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .fqn import join
from .global_threshold import GlobalThreshold
from .kernel_layer import KernelLayer
from .layers import MatrixLayout, layer_parts, prunable_weights
from .parametrization import SparseWeight, chain_originals

THRESHOLD_NAME = "fxsparse_threshold"


@dataclasses.dataclass
class SparseEntry:
    fqn: str  # e.g. "layer1.0.conv1.weight"
    module: nn.Module
    name: str  # the parametrized attribute, e.g. "weight"
    parametrization: SparseWeight

    @property
    def original(self) -> nn.Parameter:
        """The raw parameter the threshold watches (in a chain, the original of the weight's shape)."""
        return chain_originals(self.module.parametrizations[self.name])[self.parametrization.primary]

    @property
    def chained(self) -> bool:
        """True when parametrizations come before the SparseWeight (weight_norm, a lifted weight transform)."""
        return len(self.module.parametrizations[self.name]) > 1


def _iter_sparse_entries(model: nn.Module) -> Iterator[SparseEntry]:
    for module_fqn, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for name, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, SparseWeight):
                    yield SparseEntry(join(module_fqn, name), module, name, p)


def sparse_entries(model: nn.Module) -> list[SparseEntry]:
    """Every (module, attribute) carrying a SparseWeight, in module order (tied weights appear once each use)."""
    return list(_iter_sparse_entries(model))


def unique_entries(model: nn.Module) -> list[SparseEntry]:
    """One entry per distinct raw parameter (a tied weight is pooled once)."""
    seen, unique = set(), []
    for entry in sparse_entries(model):
        if id(entry.original) not in seen:
            seen.add(id(entry.original))
            unique.append(entry)
    return unique


def is_sparsified(model: nn.Module) -> bool:
    return any(True for _ in _iter_sparse_entries(model)) or hasattr(model, THRESHOLD_NAME)


def get_threshold(model: nn.Module) -> GlobalThreshold:
    """The model's GlobalThreshold; a clear error for a model sparsify() did not produce.

    A graph node is the root's ``fxsparse_threshold``; otherwise (in place, module walk, a wrapper such
    as DistributedDataParallel) every SparseWeight of the model references it.
    """
    threshold: GlobalThreshold | None = getattr(model, THRESHOLD_NAME, None)
    if threshold is None:
        threshold = next((entry.parametrization.threshold for entry in _iter_sparse_entries(model)), None)
    if threshold is None:
        raise ValueError(
            f"{type(model).__name__} has no sparse parametrization and no {THRESHOLD_NAME!r}: it is not a "
            "sparsified model (call fxsparse.sparsify(model, ...) first, or it was already folded)"
        )
    return threshold


def pooled_weights(model: nn.Module) -> list[Tensor]:
    """The raw pooled weights, in the order the threshold's graph node or pre-hook passes them."""
    threshold = get_threshold(model)
    root = model
    inner = getattr(model, "module", None)  # DistributedDataParallel / DataParallel wrap the model
    if isinstance(inner, nn.Module):
        try:
            model.get_parameter(threshold.pool_paths[0])
        except AttributeError:
            root = inner
    return [root.get_parameter(path) for path in threshold.pool_paths]


@torch.no_grad()
def refresh_threshold_(model: nn.Module) -> None:
    """Bring a sparsified model's tau up to date with its current weights and step (no-op if current)."""
    get_threshold(model)(*pooled_weights(model))


@torch.no_grad()
def recompute_threshold_(model: nn.Module) -> None:
    """Recompute tau from the weights as they are, even if the threshold believes it current."""
    threshold = get_threshold(model)
    threshold.invalidate_()
    threshold(*pooled_weights(model))


@torch.no_grad()
def tau_is_stale(model: nn.Module) -> bool:
    """True when the threshold believes tau current, yet the weights give another one: they were written
    where autograd's version counters cannot see (through ``param.data``). Pure: computes, installs nothing."""
    threshold, weights = get_threshold(model), pooled_weights(model)
    if threshold.is_frozen or not threshold.is_current(weights):
        return False
    return not torch.equal(threshold.compute_tau(threshold.pool_values(weights)), threshold.thresholds())


def dense_layers(model: nn.Module) -> dict[str, int]:
    """fqn -> numel of the weights sparsify() had to leave dense (each named in a warning when it did):
    every report counts them as they are, not sparsified."""
    result = getattr(get_threshold(model), "pass_result", None)
    return {layer.fqn: layer.numel for layer in result.dense} if result is not None else {}


def _nonzeros(model: nn.Module, fqn: str, numel: int) -> int:
    """Nonzeros of the tensor ``fqn`` of ``model`` as it is; ``numel`` when the name is not a tensor of the
    model (a weight computed inside the forward)."""
    module_fqn, _, name = fqn.rpartition(".")
    try:
        value = getattr(model.get_submodule(module_fqn), name)
    except AttributeError:
        return numel
    return int(torch.count_nonzero(value)) if isinstance(value, Tensor) and value.numel() == numel else numel


def _counts(fqn: str, layout: MatrixLayout | None, weight: Tensor) -> dict[str, tuple[int, int]]:
    """Name -> (nonzeros, numel) of the weight, or of each expert's matrix of a stack (fxsparse.layers)."""
    return {name: (int(torch.count_nonzero(part)), part.numel()) for name, part in layer_parts(fqn, layout, weight)}


def distribution_record(model: nn.Module) -> dict | None:
    """How a sparsified model distributes its zeros over layers, JSON-ready: {"name": "global"}, or the
    per-layer distribution's name, caps and final target sparsity per pooled weight (`LayerTargets.describe`);
    None for a model that is not sparsified."""
    if not is_sparsified(model):
        return None
    targets = get_threshold(model).targets
    return {"name": "global"} if targets is None else targets.describe()


class LayerDensities(dict):
    """fqn -> (nonzeros, numel), as returned by `layer_densities`; ``distribution`` is the model's
    `distribution_record` (None for a plain model)."""

    distribution: dict | None = None


@torch.no_grad()
def layer_densities(model: nn.Module) -> LayerDensities:
    """fqn -> (nonzeros, numel) of each pooled weight as the next forward sees it (effective weight, tau
    brought up to date first), and of each weight that could not be sparsified (`dense_layers`: its own
    zeros, such as an embedding's padding row, and nothing more). For a plain (e.g. folded) model: every
    prunable weight (fxsparse.layers) as it is, and every sparse layer of an accelerated model (its kernel
    weight's nonzeros, fxsparse.kernel_layer). A mixture-of-experts stack is listed expert by expert,
    ``<fqn>[<expert>]``, each expert's matrix being a layer of its own. The result's ``.distribution``
    records the distribution and, for a per-layer one, each pooled weight's final target sparsity."""
    out = LayerDensities()
    if not is_sparsified(model):
        for prefix, module in model.named_modules():
            if isinstance(module, KernelLayer):  # an accelerated model's sparse layer: the nonzeros it multiplies
                weight = module.kernel_weight()
                out[join(prefix, "weight")] = (weight.nonzeros, weight.numel)
            for name, layout in prunable_weights(module).items():
                weight = getattr(module, name)
                if isinstance(weight, Tensor):
                    out.update(_counts(join(prefix, name), layout, weight))
        return out
    refresh_threshold_(model)
    out.distribution = distribution_record(model)
    for entry in unique_entries(model):
        sparse = entry.parametrization
        layout = MatrixLayout(sparse.output_axis, experts=True) if sparse.experts else None
        out.update(_counts(entry.fqn, layout, getattr(entry.module, entry.name)))
    for fqn, numel in dense_layers(model).items():
        out[fqn] = (_nonzeros(model, fqn, numel), numel)
    return out


def realized_sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over the pooled weights as the next forward multiplies them, and over the
    weights left dense (`dense_layers`, with their own zeros)."""
    counts = layer_densities(model).values()
    total = sum(n for _, n in counts)
    return 1.0 - sum(nz for nz, _ in counts) / total if total else 0.0
