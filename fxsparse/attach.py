"""Running the GlobalThreshold without a graph node: a forward pre-hook on the model's root.

Used for a model sparsified in place (sparsify_) or by walking its modules. The root gets no child:
the first pooled weight's SparseWeight holds the threshold (so its state is in the state_dict), and
the hook's handle is recorded on the threshold (``threshold.pre_hook``), which is how fold knows what
to remove. torch.fx's GraphModule drops forward hooks when deep-copied: on a GraphModule root, a
deepcopy hook attaches the copy's threshold to the copy; a torch without deepcopy hooks (< 2.6) carries
the root's pre-hooks over as a "user-preserved attribute" of the GraphModule's meta.
A module holding mixture-of-experts stacks also gets hooks that compute each stack once per forward.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from .global_threshold import GlobalThreshold
from .parametrization import HOSTED_THRESHOLD_NAME, SparseWeight


class _ThresholdPreHook:
    """Runs the threshold on the pooled weights before each forward (a plain object holding the threshold
    by reference, so that a deepcopy of the model gets a hook that runs the copy's threshold)."""

    def __init__(self, threshold: GlobalThreshold):
        self.threshold = threshold

    def __call__(self, model: nn.Module, args) -> None:
        threshold = self.threshold
        threshold(*[model.get_parameter(path) for path in threshold.pool_paths])


class _ReattachOnDeepcopy:
    """GraphModule deepcopy hook: register the copy's own threshold pre-hook on the copy."""

    def __init__(self, threshold_path: str):
        self.threshold_path = threshold_path

    def __call__(self, copied: fx.GraphModule) -> None:
        threshold = copied.get_submodule(self.threshold_path)
        threshold.pre_hook = copied.register_forward_pre_hook(_ThresholdPreHook(threshold))


def attach_as_pre_hook_(model: nn.Module, threshold: GlobalThreshold) -> None:
    """Run ``threshold`` before every forward of ``model`` without adding a child to its root."""
    owner_path = threshold.pool_paths[0].rpartition(".original")[0]  # [<module>.]parametrizations.<name>
    index = next(i for i, p in enumerate(model.get_submodule(owner_path)) if isinstance(p, SparseWeight))
    model.get_submodule(owner_path)[index].host_threshold_()
    threshold.pre_hook = model.register_forward_pre_hook(_ThresholdPreHook(threshold))
    if not isinstance(model, fx.GraphModule):
        return
    if hasattr(model, "_register_deepcopy_hook"):
        model._register_deepcopy_hook(_ReattachOnDeepcopy(f"{owner_path}.{index}.{HOSTED_THRESHOLD_NAME}"))
    else:  # GraphModule.__deepcopy__ re-sets these on the copy, deep-copied with the copy's threshold
        _preserved_attributes(model)["_forward_pre_hooks"] = model._forward_pre_hooks


def detach_pre_hook_(model: nn.Module, threshold: GlobalThreshold) -> None:
    """Undo attach_as_pre_hook_ (the threshold itself leaves with the parametrizations)."""
    threshold.pre_hook.remove()
    threshold.pre_hook = None
    if not isinstance(model, fx.GraphModule):
        return
    hooks = getattr(model, "_deepcopy_hooks", None)
    if hooks:
        hooks[:] = [hook for hook in hooks if not isinstance(hook, _ReattachOnDeepcopy)]
    preserved = _preserved_attributes(model)
    if preserved.get("_forward_pre_hooks") is model._forward_pre_hooks:
        del preserved["_forward_pre_hooks"]
    if not preserved:
        del model.meta[_PRESERVED]


_PRESERVED = "_user_preserved_attributes"  # torch.fx.graph_module._USER_PRESERVED_ATTRIBUTES_KEY


def _preserved_attributes(model: fx.GraphModule) -> dict:
    """The attributes GraphModule.__deepcopy__ sets on the copy (deep-copied with the rest of the model)."""
    if not isinstance(getattr(model, "meta", None), dict):
        model.meta = {}
    return model.meta.setdefault(_PRESERVED, {})


class _ComputeStacksOncePerForward:
    """Forward hooks of a module holding mixture-of-experts stacks (docs/GRAPH_PASS.md): its forward runs
    inside torch.nn.utils.parametrize.cached(), so that each read of a stack (transformers' eager loop reads
    ``self.gate_up_proj[e]`` once per routed expert) reuses one effective weight instead of recomputing the
    whole stack; the gradient flows through that one weight. Not while torch.compile traces (it computes the
    weight once anyway)."""

    def __init__(self):
        self.open: list = []  # the entered cached() contexts, one per forward in progress (None: tracing)

    def enter(self, module: nn.Module, args) -> None:
        context = None if torch.compiler.is_compiling() else parametrize.cached()
        if context is not None:
            context.__enter__()
        self.open.append(context)

    def leave(self, module: nn.Module, args, output) -> None:
        context = self.open.pop() if self.open else None
        if context is not None:
            context.__exit__(None, None, None)

    def __deepcopy__(self, memo) -> _ComputeStacksOncePerForward:
        return type(self)()  # no forward is in progress in a copy


def cache_expert_stacks_(module: nn.Module) -> None:
    """Compute ``module``'s parametrized stacks once per forward (see _ComputeStacksOncePerForward)."""
    hooks = _ComputeStacksOncePerForward()
    module.register_forward_pre_hook(hooks.enter)
    module.register_forward_hook(hooks.leave, always_call=True)  # also when the forward raises


def uncache_expert_stacks_(module: nn.Module) -> None:
    """Undo cache_expert_stacks_ (fold)."""
    ids = [
        key
        for registry in (module._forward_pre_hooks, module._forward_hooks)
        for key, hook in registry.items()
        if isinstance(getattr(hook, "__self__", None), _ComputeStacksOncePerForward)
    ]
    for key in ids:
        for registry in (module._forward_pre_hooks, module._forward_hooks, module._forward_hooks_always_called):
            registry.pop(key, None)
