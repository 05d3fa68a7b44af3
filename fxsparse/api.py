"""sparsify(): the library's one verb, and the only place user strings and options are resolved."""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch.fx as fx
from torch import nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from .attach import attach_as_pre_hook_, cache_expert_stacks_
from .distribution import DistributionSpec, check_spec, layer_targets
from .global_threshold import GlobalThreshold
from .layers import DESCRIPTION as PRUNABLE_WEIGHTS
from .layers import LAYERS as PRUNABLE_LAYERS
from .methods import Method, get_method
from .parametrization import SparseWeight, chain_originals
from .pool import get_threshold, is_sparsified, recompute_threshold_
from .rewrite import (
    DenseWeight,
    LayerFilter,
    PassResult,
    insert_threshold_node_,
    install_parametrizations_,
    lift_weights_,
    reroute_functional_weights_,
    select_uses,
    split_root_uses,
    survey_graph,
    survey_module,
    tied_embedding_uses,
    weights_left_dense,
)
from .schedule import Constant
from .trace import bind_original_methods_, trace
from .training_checks import check_optimizer_trains, hook_registry, watch_step

ExcludeSpec = None | str | Sequence[str] | LayerFilter


def _resolve_exclude(exclude: ExcludeSpec) -> tuple[LayerFilter | None, list[str]]:
    """(filter, its glob patterns) for None, a glob pattern on the weight's fqn (or several), or a callable."""
    if exclude is None or callable(exclude):
        return exclude, []
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"exclude must be a glob pattern, a list of them, or a callable(fqn, param); got {exclude!r}")
    return (lambda fqn, param: any(fnmatch.fnmatchcase(fqn, p) for p in patterns)), patterns


def _warn_unmatched_patterns(patterns: list[str], fqns: list[str], model_name: str) -> None:
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(fqn, p) for fqn in fqns)]
    if unmatched:
        examples = ", ".join(repr(f) for f in fqns[:3])
        warnings.warn(
            f"exclude pattern(s) {unmatched} match no conv/linear weight of {model_name}, so they exclude nothing. "
            f"Patterns are matched against weight names such as {examples}: write 'head.*' or 'head.weight', "
            "not 'head'",
            stacklevel=4,
        )


def _check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(
            f"sparsity is the fraction of weights set to zero and must be in [0, 1); got {sparsity!r} "
            "(for 90% sparsity pass sparsity=0.9)"
        )
    return float(sparsity)


def _numel(model: nn.Module, use) -> int:
    return getattr(model.get_submodule(use.module_fqn), use.name).numel()


@contextlib.contextmanager
def _attributes_kept(model: nn.Module) -> Iterator[None]:
    """Restore every module's attributes after symbolic tracing, which runs forward on proxies: a forward
    that assigns to ``self`` would otherwise leave proxies (or new submodules) on the user's model."""
    registries = ("_parameters", "_buffers", "_modules")
    saved = [(m, dict(vars(m)), [dict(getattr(m, r)) for r in registries]) for m in model.modules()]
    try:
        yield
    finally:
        for module, attributes, contents in saved:
            vars(module).clear()
            vars(module).update(attributes)  # the registries are the same dict objects: refill them
            for registry, kept in zip(registries, contents):
                getattr(module, registry).clear()
                getattr(module, registry).update(kept)


def sparsify(
    model: nn.Module,
    method: str | Method = "st3sigma",
    sparsity: float = 0.9,
    schedule: Callable[[int, float], float] | None = None,
    *,
    exclude: ExcludeSpec = None,
    min_numel: int = 0,
    trace_model: bool = True,
    leaf_modules: tuple[type, ...] = (),
    include_embedding_tied: bool = False,
    distribution: DistributionSpec = "global",
    min_layer_sparsity: float | None = None,
    max_layer_sparsity: float | None = None,
) -> nn.Module:
    """Return a sparse-training copy of ``model``; ``model`` itself is never modified.

    method: "st3", "st3sigma", "feather", "gmp", "ste" or a Method instance (e.g. Feather(theta=0.5)).
    sparsity: final fraction of zeros over the pooled conv/linear weights.
    schedule: (step, final_sparsity) -> sparsity, e.g. fxsparse.Cubic(begin, end) in optimizer steps;
        default fxsparse.Constant() (the final sparsity from the first step). Advance it with
        fxsparse.step_(model) after each optimizer step, or once with fxsparse.hook_optimizer.
    exclude: glob pattern(s) on weight names ("head.*") or a callable (fqn, param) -> bool.
    min_numel: leave weights with fewer elements dense (Feather's ``pthres``).
    trace_model / leaf_modules: torch.fx tracing switch and extra module classes to keep opaque.
    include_embedding_tied: also sparsify weights tied to an nn.Embedding (a tied LM head), in both uses:
        the embedding then looks up the same sparse effective weight the head multiplies by. By default
        they stay dense, with a warning.
    distribution: where the zeros go (docs/METHODS.md sec. 8): "global" (one threshold for the pool, the
        default), "uniform" (every layer at ``sparsity``), "erk" (Erdos-Renyi-Kernel, RigL), or a mapping
        {glob pattern: sparsity} with the other layers sharing the rest. Per-layer targets are exact to one
        weight and their total is round(sparsity * pool size).
    min_layer_sparsity / max_layer_sparsity: bounds on every layer's sparsity (a mapping's own layers excepted),
        the total still exact: a per-layer distribution redistributes the excess over the other layers; "global"
        keeps one shared threshold for the layers it leaves within their bounds and holds the others at their
        bound. An infeasible target is an error that says by how many weights it misses.
    Layers that stay dense (tied weights, grouped transposed convs) are named in a warning; fxsparse.flops
    and save_csr count them dense.
    """
    sparse, _ = _sparsify(
        model,
        method,
        sparsity,
        schedule,
        exclude,
        min_numel,
        trace_model,
        leaf_modules,
        include_embedding_tied,
        (distribution, min_layer_sparsity, max_layer_sparsity),
        in_place=False,
    )
    return sparse


def sparsify_(
    model: nn.Module,
    method: str | Method = "st3sigma",
    sparsity: float = 0.9,
    schedule: Callable[[int, float], float] | None = None,
    *,
    exclude: ExcludeSpec = None,
    min_numel: int = 0,
    trace_model: bool = True,
    leaf_modules: tuple[type, ...] = (),
    include_embedding_tied: bool = False,
    distribution: DistributionSpec = "global",
    min_layer_sparsity: float | None = None,
    max_layer_sparsity: float | None = None,
) -> None:
    """In place: sparsify ``model`` itself, for code that keeps training the object it holds.

    The pool is the one sparsify() finds (the model is traced, on its own modules, and the trace is
    discarded), and the parametrizations go on the model's own modules, so the forward computes what
    sparsify()'s does, F.conv*/F.linear on a module's own parameters included. The threshold runs as a
    forward pre-hook on ``model``; its state is in the state_dict, under the first pooled weight's
    ``parametrizations``. Nothing else changes: no child is added, parameter objects are kept (an
    existing optimizer stays valid). Unlike sparsify(), parameters held by the root itself are pooled
    too, unless the root is a GraphModule. fxsparse.fold_(model) undoes it, baking the effective weights.
    Arguments as for sparsify().
    """
    _sparsify(
        model,
        method,
        sparsity,
        schedule,
        exclude,
        min_numel,
        trace_model,
        leaf_modules,
        include_embedding_tied,
        (distribution, min_layer_sparsity, max_layer_sparsity),
        in_place=True,
    )


def _sparsify(
    model,
    method,
    sparsity,
    schedule,
    exclude,
    min_numel,
    trace_model,
    leaf_modules,
    include_embedding_tied,
    distribution_args=("global", None, None),
    *,
    in_place: bool,
) -> tuple[nn.Module, PassResult]:
    """The pass: (the sparsified model, what it changed). The record is also kept on the threshold
    (``get_threshold(model).pass_result``), where the reports read the layers left dense."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify() takes a torch.nn.Module, got {type(model).__name__}")
    if is_sparsified(model):
        raise ValueError(
            "this model is already sparsified; pass the original model, or fxsparse.fold(model) it first "
            "and sparsify the folded copy"
        )
    sparsity = _check_sparsity(sparsity)
    resolved_method = get_method(method).resolve(sparsity)
    schedule = Constant() if schedule is None else schedule
    if not callable(schedule):
        raise TypeError(
            "schedule must be callable (step, final_sparsity) -> sparsity, e.g. fxsparse.Cubic(0, 1000); "
            f"got {schedule!r}"
        )
    layer_filter, patterns = _resolve_exclude(exclude)
    check_spec(*distribution_args)  # bad distribution arguments fail before any tracing

    working = model if in_place else copy.deepcopy(model)
    with _attributes_kept(working) if in_place else contextlib.nullcontext():
        traced = trace(working, tuple(leaf_modules)) if trace_model else None
    graph_module = traced.graph_module if traced is not None else None
    if graph_module is not None:
        survey = survey_graph(graph_module)  # its module paths are the model's own
    else:
        reason = traced.error if traced is not None else "tracing disabled (trace_model=False)"
        survey = survey_module(working)
        if traced is not None:
            expected = (
                " (expected: transformers >= 5 models cannot be traced by torch.fx; trace_model=False "
                "skips the attempt)"
                if type(model).__module__.startswith("transformers.")
                else ""
            )
            warnings.warn(
                f"fxsparse could not trace {type(model).__name__} with torch.fx ({reason}){expected}; sparsifying "
                f"by walking its modules instead, which found {len(survey.uses)} prunable weights (of "
                f"{PRUNABLE_LAYERS}). Lost: weights the forward uses through F.linear/F.conv*/matmul on raw "
                "parameters stay dense (fxsparse.flops counts them dense), and the threshold runs as a forward "
                "pre-hook, not a graph node.",
                stacklevel=3,
            )
    target: nn.Module = working if in_place or graph_module is None else graph_module

    candidates = survey.uses + [item.use for item in survey.lifted]
    _warn_unmatched_patterns(patterns, [use.fqn for use in candidates], type(model).__name__)
    kept = set(select_uses(target, candidates, layer_filter, min_numel))
    uses = [use for use in survey.uses if use in kept]
    lifted = [item for item in survey.lifted if item.use in kept]
    excluded = [use for use in candidates if use not in kept]
    dense = list(survey.dense)
    if lifted and target is not graph_module:  # in place, the layer's own forward keeps its weight transform
        dense += [
            DenseWeight(
                item.use.fqn,
                _numel(target, item.use),
                "in place, its weight transform (e.g. standardization) stays in the layer's forward "
                "after the sparse parametrization; fxsparse.sparsify (a copy) sparsifies the weight "
                "the op multiplies",
            )
            for item in lifted
        ]
        lifted = []
    left_dense = weights_left_dense(target, uses, excluded, include_embedding_tied)
    dense += [DenseWeight(use.fqn, _numel(target, use), reason) for use, reason in left_dense.items()]
    uses = [use for use in uses if use not in left_dense]
    if include_embedding_tied:
        uses += tied_embedding_uses(target, uses)
    root_uses: list = []
    if isinstance(target, fx.GraphModule):
        uses, root_uses = split_root_uses(uses)
        dense += [
            DenseWeight(
                u.fqn,
                _numel(target, u),
                "a parameter of the model's root module, used through F.conv*/F.linear, cannot be "
                "parametrized inside a GraphModule: move it into a submodule to sparsify it",
            )
            for u in root_uses
        ]
    _warn_dense(type(model).__name__, dense)
    if not uses and not lifted:
        raise ValueError(
            f"nothing to sparsify in {type(model).__name__}: found {len(candidates)} prunable weights"
            + (f", {len(excluded)} excluded by exclude=/min_numel=" if excluded else "")
            + (f", {len(dense)} that cannot be sparsified (see the warning)" if dense else "")
            + f"; fxsparse prunes the weights of {PRUNABLE_WEIGHTS}"
        )
    if lifted:
        uses += lift_weights_(graph_module, lifted)
        bind_original_methods_(
            graph_module,
            unavailable=(
                "sparsify moved the weight transforms of some layers ("
                + ", ".join(item.use.fqn for item in lifted)
                + ") out of their forward into the graph, so the original class's methods, which call those layers "
                "directly, would apply them twice; call the model itself"
            ),
        )
    pool = install_parametrizations_(target, uses, resolved_method)
    originals = [item.original(target) for item in pool]
    targets = layer_targets(
        [item.use.fqn for item in pool], [tuple(w.shape) for w in originals], sparsity, *distribution_args
    )
    threshold = GlobalThreshold(
        resolved_method, sparsity, schedule, {item.path: w for item, w in zip(pool, originals)}, targets
    )
    index_of = {id(w): i for i, w in enumerate(originals)}
    for use in uses:
        chain = target.get_submodule(use.module_fqn).parametrizations[use.name]
        for sparse_weight in chain:
            if isinstance(sparse_weight, SparseWeight):
                sparse_weight.bind_threshold_(threshold, index_of[id(chain_originals(chain)[sparse_weight.primary])])
    threshold.watch_chains_(
        {i: item.parametrization for i, item in enumerate(pool) if item.parametrization.is_chained()}
    )
    threshold.set_expert_stacks_(
        {i: item.parametrization.output_axis for i, item in enumerate(pool) if item.parametrization.experts}
    )
    for module_fqn in dict.fromkeys(item.use.module_fqn for item in pool if item.parametrization.experts):
        cache_expert_stacks_(target.get_submodule(module_fqn))
    threshold.pass_result = result = PassResult(
        pooled=tuple(item.use.fqn for item in pool),
        chained=tuple(item.use.fqn for item in pool if item.parametrization.is_chained()),
        lifted=tuple(item.use.fqn for item in lifted),
        dense=tuple(dense),
        excluded=tuple(use.fqn for use in excluded),
        threshold_in_graph=target is graph_module,
        training_leaves=tuple(cls.__name__ for cls in traced.training_leaves) if traced is not None else (),
        traced_through=tuple(cls.__name__ for cls in traced.traced_through) if traced is not None else (),
    )
    if target is graph_module:
        reroute_functional_weights_(graph_module, uses)
        insert_threshold_node_(graph_module, threshold, pool)
    else:
        attach_as_pre_hook_(target, threshold)
    return target, result


def _warn_dense(model_name: str, dense: list) -> None:
    """One warning naming every weight that cannot be sparsified (reports count them dense)."""
    if dense:
        lines = "\n".join(f"  {layer.fqn}: {layer.reason}" for layer in dense)
        warnings.warn(
            f"fxsparse leaves {len(dense)} weight(s) of {model_name} dense: they cannot be sparsified, and "
            f"realized_sparsity, layer_densities, flops and save_csr count them dense:\n{lines}",
            stacklevel=4,
        )


def step_(model: nn.Module, steps: int = 1) -> None:
    """Advance the sparsity schedule by ``steps`` optimizer steps (call after optimizer.step()).

    ``steps`` is a whole number >= 0. On the first few calls it also checks that the pooled weights do
    change between steps: if they never do although they have gradients, the optimizer is most likely
    training another copy of them (one built before sparsify()), and a warning says so.
    """
    threshold = get_threshold(model)
    threshold.advance_(steps)
    watch_step(threshold, model)


def refresh_(model: nn.Module) -> None:
    """Recompute tau now, from the pooled weights as they are.

    tau follows every weight update autograd can see (optimizer steps, in-place ops under no_grad,
    load_state_dict) and every step_. Call this after writes it cannot see: through ``param.data``
    (``w.data.copy_(pretrained)``, optimizers written with ``p.data.add_``), or by a fused optimizer
    between two step_ calls.
    """
    recompute_threshold_(model)


def hook_optimizer(model: nn.Module, optimizer: Optimizer) -> RemovableHandle:
    """Advance the schedule automatically after every ``optimizer.step()``; returns the hook handle.

    The optimizer must hold the model's parameters (an optimizer built before sparsify() holds the
    original model's: an error says so). Hooking the same optimizer and model again returns the first
    hook, with a warning: the schedule still advances once per step.
    """
    threshold = get_threshold(model)
    check_optimizer_trains(model, optimizer)
    registry = hook_registry(optimizer)
    handle = registry.get(threshold)
    if handle is not None:
        warnings.warn(
            "hook_optimizer(model, optimizer) was already called for this model and optimizer; the schedule "
            "advances once per optimizer.step(), through the first hook (returned again). Call it once",
            stacklevel=2,
        )
        return handle
    handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: threshold.advance_(1))
    registry.add(threshold, handle)
    return handle
