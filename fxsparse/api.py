"""sparsify(): the library's one verb, and the only place user strings and options are resolved."""
from __future__ import annotations

import copy
import fnmatch
import warnings
from typing import Callable, Optional, Sequence, Union

from torch import nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from .fold import PRE_HOOK_ATTRIBUTE
from .global_threshold import GlobalThreshold
from .layers import DESCRIPTION as PRUNABLE_WEIGHTS
from .layers import LAYERS as PRUNABLE_LAYERS
from .methods import Method, get_method
from .pool import THRESHOLD_NAME, get_threshold, is_sparsified
from .rewrite import (
    LayerFilter,
    insert_threshold_node_,
    install_parametrizations_,
    original_path,
    reroute_functional_weights_,
    select_uses,
    split_root_uses,
    tied_embedding_uses,
    weight_uses_in_graph,
    weight_uses_in_module,
    weights_left_dense,
)
from .schedule import Constant
from .trace import trace

ExcludeSpec = Union[None, str, Sequence[str], LayerFilter]


def _resolve_exclude(exclude: ExcludeSpec) -> Optional[LayerFilter]:
    """None, a glob pattern on the weight's fqn (or several), or a callable (fqn, parameter) -> bool."""
    if exclude is None or callable(exclude):
        return exclude
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"exclude must be a glob pattern, a list of them, or a callable(fqn, param); got {exclude!r}")
    return lambda fqn, param: any(fnmatch.fnmatchcase(fqn, p) for p in patterns)


def _check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(
            f"sparsity is the fraction of weights set to zero and must be in [0, 1); got {sparsity!r} "
            "(for 90% sparsity pass sparsity=0.9)"
        )
    return float(sparsity)


def _threshold_pre_hook(model: nn.Module, args) -> None:
    threshold = get_threshold(model)
    threshold(*[model.get_parameter(path) for path in threshold.pool_paths])


def _copy_plain_attributes(source: nn.Module, target: nn.Module) -> None:
    """Keep the model's public plain attributes (timm's pretrained_cfg, num_classes, ...) on the GraphModule."""
    for name, value in vars(source).items():
        if not name.startswith("_") and name != "training" and not hasattr(target, name):
            setattr(target, name, value)


def sparsify(
    model: nn.Module,
    method: Union[str, Method] = "st3sigma",
    sparsity: float = 0.9,
    schedule: Optional[Callable[[int, float], float]] = None,
    *,
    exclude: ExcludeSpec = None,
    min_numel: int = 0,
    trace_model: bool = True,
    leaf_modules: tuple[type, ...] = (),
    include_embedding_tied: bool = False,
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
    Layers that stay dense (tied weights, grouped transposed convs) are named in a warning; fxsparse.flops
    and save_csr count them dense.
    """
    return _sparsify(model, method, sparsity, schedule, exclude, min_numel, trace_model, leaf_modules,
                     include_embedding_tied, in_place=False)


def sparsify_(
    model: nn.Module,
    method: Union[str, Method] = "st3sigma",
    sparsity: float = 0.9,
    schedule: Optional[Callable[[int, float], float]] = None,
    *,
    exclude: ExcludeSpec = None,
    min_numel: int = 0,
    include_embedding_tied: bool = False,
) -> None:
    """In place: sparsify ``model`` itself, for code that keeps training the object it holds.

    The same methods, threshold and parametrizations as sparsify(), installed on the model's own
    Conv/Linear modules (found by walking them, as for an untraceable model), with the threshold as a
    forward pre-hook. Parameter objects are kept, so an existing optimizer stays valid; weights used
    through F.conv*/F.linear on raw parameters are not found (there is no graph). fxsparse.fold_(model)
    undoes it, baking the effective weights. Arguments as for sparsify().
    """
    _sparsify(model, method, sparsity, schedule, exclude, min_numel, False, (), include_embedding_tied, in_place=True)


def _sparsify(model, method, sparsity, schedule, exclude, min_numel, trace_model, leaf_modules,
              include_embedding_tied, *, in_place: bool):
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
        raise TypeError(f"schedule must be callable (step, final_sparsity) -> sparsity, e.g. fxsparse.Cubic(0, 1000); got {schedule!r}")
    layer_filter = _resolve_exclude(exclude)

    working = model if in_place else copy.deepcopy(model)
    traced = trace(working, tuple(leaf_modules)) if trace_model else None
    if traced is not None and traced.graph_module is not None:
        target: nn.Module = traced.graph_module
        _copy_plain_attributes(working, target)
        candidates = weight_uses_in_graph(target)
    else:
        reason = traced.error if traced is not None else "tracing disabled (trace_model=False)"
        target = working
        candidates = weight_uses_in_module(working)
        if traced is not None:
            expected = (" (expected: transformers >= 5 models cannot be traced by torch.fx; trace_model=False "
                        "skips the attempt)" if type(model).__module__.startswith("transformers.") else "")
            warnings.warn(
                f"fxsparse could not trace {type(model).__name__} with torch.fx ({reason}){expected}; sparsifying "
                f"by walking its modules instead, which found {len(candidates)} prunable weights (of "
                f"{PRUNABLE_LAYERS}). Lost: weights the forward uses through F.linear/F.conv*/matmul on raw "
                "parameters stay dense (fxsparse.flops counts them dense), and the threshold runs as a forward "
                "pre-hook, not a graph node.",
                stacklevel=3,
            )

    uses = select_uses(target, candidates, layer_filter, min_numel)
    excluded = len(candidates) - len(uses)
    left_dense = weights_left_dense(target, uses, [u for u in candidates if u not in uses], include_embedding_tied)
    if left_dense:
        warnings.warn(
            "fxsparse leaves these weights dense (fxsparse.flops and save_csr count them dense): "
            + "; ".join(f"{use.fqn}: {reason}" for use, reason in left_dense.items()),
            stacklevel=3,
        )
        uses = [use for use in uses if use not in left_dense]
    if include_embedding_tied:
        uses += tied_embedding_uses(target, uses)
    root_uses: list = []
    if target is not working:
        uses, root_uses = split_root_uses(uses)
        if root_uses:
            warnings.warn(
                f"fxsparse leaves {[u.fqn for u in root_uses]} dense: parameters held by the model's root "
                "module and used through F.conv*/F.linear cannot be parametrized inside a GraphModule; "
                "move them into a submodule to sparsify them",
                stacklevel=2,
            )
    if not uses:
        raise ValueError(
            f"nothing to sparsify in {type(model).__name__}: found {len(candidates)} conv/linear weights"
            + (f", {excluded} excluded by exclude=/min_numel=" if excluded else "")
            + (f", {len(root_uses)} held by the root module (see the warning)" if root_uses else "")
            + (f", {len(left_dense)} left dense (see the warning)" if left_dense else "")
            + f"; fxsparse prunes the weights of {PRUNABLE_WEIGHTS}"
        )
    threshold = GlobalThreshold(resolved_method, sparsity, schedule, pool_size=0)
    pool = install_parametrizations_(target, uses, resolved_method, threshold)
    threshold.pool_paths = [original_path(use) for use in pool]
    threshold.pool_size = sum(target.get_parameter(p).numel() for p in threshold.pool_paths)
    threshold.to(target.get_parameter(threshold.pool_paths[0]).device)  # tau beside the weights (DDP/NCCL broadcasts it)
    if target is not working:
        reroute_functional_weights_(target, uses)
        insert_threshold_node_(target, threshold, pool)
    else:
        target.add_module(THRESHOLD_NAME, threshold)
        setattr(target, PRE_HOOK_ATTRIBUTE, target.register_forward_pre_hook(_threshold_pre_hook))
    return target


def step_(model: nn.Module, steps: int = 1) -> None:
    """Advance the sparsity schedule by ``steps`` optimizer steps (call after optimizer.step())."""
    get_threshold(model).advance_(steps)


def hook_optimizer(model: nn.Module, optimizer: Optimizer) -> RemovableHandle:
    """Advance the schedule automatically after every ``optimizer.step()``; returns the hook handle."""
    get_threshold(model)
    return optimizer.register_step_post_hook(lambda opt, args, kwargs: step_(model))
