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
from .methods import Method, get_method
from .pool import THRESHOLD_NAME, get_threshold, is_sparsified
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
)
from .schedule import Constant
from .trace import bind_original_methods_, trace

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
    """
    sparse, _ = _sparsify(model, method, sparsity, schedule, exclude, min_numel, trace_model, leaf_modules,
                          in_place=False)
    return sparse


def sparsify_(
    model: nn.Module,
    method: Union[str, Method] = "st3sigma",
    sparsity: float = 0.9,
    schedule: Optional[Callable[[int, float], float]] = None,
    *,
    exclude: ExcludeSpec = None,
    min_numel: int = 0,
) -> None:
    """In place: sparsify ``model`` itself, for code that keeps training the object it holds.

    The same methods, threshold and parametrizations as sparsify(), installed on the model's own
    Conv/Linear modules (found by walking them, as for an untraceable model), with the threshold as a
    forward pre-hook. Parameter objects are kept, so an existing optimizer stays valid; weights used
    through F.conv*/F.linear on raw parameters are not found (there is no graph). fxsparse.fold_(model)
    undoes it, baking the effective weights. Arguments as for sparsify().
    """
    _sparsify(model, method, sparsity, schedule, exclude, min_numel, False, (), in_place=True)


def _sparsify(model, method, sparsity, schedule, exclude, min_numel, trace_model, leaf_modules, *,
              in_place: bool) -> tuple[nn.Module, PassResult]:
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
        raise TypeError(f"schedule must be callable (step, final_sparsity) -> sparsity, e.g. fxsparse.Cubic(0, 1000); got {schedule!r}")
    layer_filter = _resolve_exclude(exclude)

    working = model if in_place else copy.deepcopy(model)
    traced = trace(working, tuple(leaf_modules)) if trace_model else None
    graph_module = traced.graph_module if traced is not None else None
    if graph_module is not None:
        target: nn.Module = graph_module
        survey = survey_graph(graph_module)
    else:
        reason = traced.error if traced is not None else "tracing disabled (trace_model=False)"
        if traced is not None:
            warnings.warn(
                f"fxsparse could not trace {type(model).__name__} with torch.fx ({reason}); sparsifying by "
                "walking modules instead. Lost: F.linear/F.conv calls on raw parameters are not sparsified, "
                "the threshold runs as a forward pre-hook (not a graph node), and no graph is available.",
                stacklevel=3,
            )
        target = working
        survey = survey_module(working)

    candidates = survey.uses + [item.use for item in survey.lifted]
    kept = set(select_uses(target, candidates, layer_filter, min_numel))
    uses = [use for use in survey.uses if use in kept]
    lifted = [item for item in survey.lifted if item.use in kept]
    excluded = [use.fqn for use in candidates if use not in kept]
    dense = list(survey.dense)
    root_uses: list = []
    if graph_module is not None:
        uses, root_uses = split_root_uses(uses)
        if root_uses:
            warnings.warn(
                f"fxsparse leaves {[u.fqn for u in root_uses]} dense: parameters held by the model's root "
                "module and used through F.conv*/F.linear cannot be parametrized inside a GraphModule; "
                "move them into a submodule to sparsify them",
                stacklevel=3,
            )
            dense += [DenseWeight(u.fqn, target.get_parameter(u.fqn).numel(), "held by the model's root module")
                      for u in root_uses]
    _warn_dense(type(model).__name__, survey.dense)
    if not uses and not lifted:
        raise ValueError(
            f"nothing to sparsify in {type(model).__name__}: found {len(candidates)} conv/linear weights"
            + (f", {len(excluded)} excluded by exclude=/min_numel=" if excluded else "")
            + (f", {len(root_uses)} held by the root module (see the warning)" if root_uses else "")
            + (f", {len(survey.dense)} that cannot be sparsified (see the warning)" if survey.dense else "")
            + "; fxsparse prunes the weights of Conv1d/2d/3d, Linear and F.conv*/F.linear calls"
        )
    if lifted:
        uses += lift_weights_(graph_module, lifted)
        bind_original_methods_(graph_module, unavailable=(
            "sparsify moved the weight transforms of some layers (" + ", ".join(item.use.fqn for item in lifted)
            + ") out of their forward into the graph, so the original class's methods, which call those layers "
            "directly, would apply them twice; call the model itself"))
    threshold = GlobalThreshold(resolved_method, sparsity, schedule, pool_size=0)
    pool = install_parametrizations_(target, uses, resolved_method, threshold)
    threshold.pool_paths = [item.path for item in pool]
    threshold.pool_size = sum(item.parametrization.chain_input().numel() for item in pool)
    threshold.watch_chains_({i: item.parametrization for i, item in enumerate(pool)
                             if item.parametrization.is_chained()})
    device = target.get_parameter(threshold.pool_paths[0]).device
    threshold.to(device)  # tau beside the weights (DDP/NCCL broadcasts it)
    threshold.pass_result = result = PassResult(
        pooled=tuple(item.use.fqn for item in pool),
        chained=tuple(item.use.fqn for item in pool if item.parametrization.is_chained()),
        lifted=tuple(item.use.fqn for item in lifted),
        dense=tuple(dense),
        excluded=tuple(excluded),
        threshold_in_graph=graph_module is not None,
        training_leaves=tuple(cls.__name__ for cls in traced.training_leaves) if traced is not None else (),
        traced_through=tuple(cls.__name__ for cls in traced.traced_through) if traced is not None else (),
    )
    if graph_module is not None:
        reroute_functional_weights_(graph_module, uses)
        insert_threshold_node_(graph_module, threshold, pool)
    else:
        target.add_module(THRESHOLD_NAME, threshold)
        setattr(target, PRE_HOOK_ATTRIBUTE, target.register_forward_pre_hook(_threshold_pre_hook))
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
    """Advance the sparsity schedule by ``steps`` optimizer steps (call after optimizer.step())."""
    get_threshold(model).advance_(steps)


def hook_optimizer(model: nn.Module, optimizer: Optimizer) -> RemovableHandle:
    """Advance the schedule automatically after every ``optimizer.step()``; returns the hook handle."""
    get_threshold(model)
    return optimizer.register_step_post_hook(lambda opt, args, kwargs: step_(model))
