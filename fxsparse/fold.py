"""Fold: bake the effective weights into plain parameters and remove every trace of sparsify().

The folded model's state_dict has the original model's keys and loads into a fresh copy of the
architecture. Parameter objects are kept (their data is overwritten), so an optimizer stays valid.
A weight whose SparseWeight ended a chain is baked as the weight the op multiplies: a lifted weight
transform (timm's StdConv2d) leaves the standardized sparse weight under the layer's own key, which the
folded graph reads as it is (docs/GRAPH_PASS.md: where such a state_dict loads); a torch parametrization
(weight_norm, spectral_norm) is removed with it, leaving a plain parameter (a new one when the chain had
several originals). The graph keeps its nodes that read modules' train/eval flags.
Also ST-3's "fix" step (docs/METHODS.md sec. 1): w <- w_eff, then a frozen mask for the fine-tune phase.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from .attach import detach_pre_hook_, uncache_expert_stacks_
from .global_threshold import GlobalThreshold
from .pool import (
    THRESHOLD_NAME,
    SparseEntry,
    get_threshold,
    recompute_threshold_,
    sparse_entries,
    tau_is_stale,
    unique_entries,
)
from .trace import ROLE

STALE_TAU_WARNING = (
    "fxsparse: tau was stale: the pooled weights were changed where autograd cannot see it (through param.data, "
    "or by a fused optimizer without fxsparse.step_), so the model's forwards since used an old threshold. This "
    "fold uses tau recomputed from the weights as they are; call fxsparse.refresh_(model) after such writes "
    "(and fxsparse.step_ after each optimizer step)"
)


def _warn_if_stale(model: nn.Module) -> None:
    if tau_is_stale(model):
        warnings.warn(STALE_TAU_WARNING, stacklevel=3)


@torch.no_grad()
def _effective_weights(model: nn.Module) -> list[tuple[SparseEntry, torch.Tensor]]:
    """(entry, its effective weight) for every distinct pooled parameter, all computed first, with tau
    recomputed from the weights as they are (one selection; folding is rare)."""
    recompute_threshold_(model)
    return [(e, getattr(e.module, e.name).detach().clone()) for e in unique_entries(model)]


def _remove_threshold_(model: nn.Module, threshold: GlobalThreshold) -> None:
    """Detach the threshold the way it was attached (``threshold.pre_hook``): a pre-hook, or a graph node.

    A pre-hook's threshold lives inside the first pooled weight's parametrization and left with it.
    """
    if threshold.pre_hook is None:  # a node of the model's graph
        graph = model.graph
        for node in list(graph.nodes):
            if node.meta.get(ROLE) == "threshold":  # rewrite.THRESHOLD, tagged by the pass
                inputs = list(node.all_input_nodes)
                graph.erase_node(node)
                for weight in inputs:
                    if not weight.users:
                        graph.erase_node(weight)
        graph.lint()
        model.delete_submodule(THRESHOLD_NAME)
        model.recompile()
    else:
        detach_pre_hook_(model, threshold)


def _own_parametrized_class_(module: nn.Module) -> None:
    """Give ``module`` a parametrized class of its own before a parametrization is removed from it.

    torch's remove_parametrizations deletes the property from ``type(module)``, and copy.deepcopy shares
    that class between a model and its copies (EMA/SWA copies, fold()'s copy): without this, folding
    one of them would strip the weight property from all of them.
    """
    cls = type(module)
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


@torch.no_grad()
def fold_(model: nn.Module) -> None:
    """In place: weights <- effective weights, parametrizations and the threshold node (or pre-hook) removed."""
    threshold = get_threshold(model)
    _warn_if_stale(model)
    baked = _effective_weights(model)
    for entry in sparse_entries(model):
        _own_parametrized_class_(entry.module)
        if entry.parametrization.experts:
            uncache_expert_stacks_(entry.module)
        if entry.module.parametrizations[entry.name].is_tensor:
            parametrize.remove_parametrizations(entry.module, entry.name, leave_parametrized=False)
        else:  # several originals (weight_norm's g and v): a new parameter, which needs grad mode to be one
            with torch.enable_grad():
                parametrize.remove_parametrizations(entry.module, entry.name, leave_parametrized=True)
    for entry, value in baked:
        getattr(entry.module, entry.name).copy_(value)
    _remove_threshold_(model, threshold)


def fold(model: nn.Module) -> nn.Module:
    """A folded copy of a sparsified model (the input is left untouched)."""
    get_threshold(model)
    _warn_if_stale(model)  # checked here: the copy's threshold sees new storage and recomputes anyway
    folded = copy.deepcopy(model)
    fold_(folded)
    return folded


@torch.no_grad()
def fix_mask_(model: nn.Module) -> None:
    """ST-3's fixed-mask phase: bake w <- w_eff (soft threshold and scale), freeze the mask, stop tau.

    Afterwards the forward is w * mask, so pruned weights receive no gradient while the kept ones
    fine-tune. Fold as usual at the end.
    """
    chained = [entry.fqn for entry in unique_entries(model) if entry.chained]
    if chained:
        raise ValueError(
            f"fix_mask_ bakes w <- w_eff into the raw weights, but {chained} are computed from their raw "
            "weights (weight standardization, weight_norm, ...), so the bake would change them; keep training "
            "without fix_mask_, or exclude these layers (exclude=)"
        )
    _warn_if_stale(model)
    baked = [(entry.original, value) for entry, value in _effective_weights(model)]
    masks = {id(param): value != 0 for param, value in baked}
    for param, value in baked:
        param.copy_(value)
    for entry in sparse_entries(model):
        entry.parametrization.mask = masks[id(entry.original)]
    get_threshold(model).freeze_()
