"""Running the GlobalThreshold without a graph node: a forward pre-hook on the model's root.

Used for a model sparsified in place (sparsify_) or by walking its modules. The root gets no child:
the first pooled weight's SparseWeight holds the threshold (so its state is in the state_dict), and
the hook's handle is recorded on the threshold (``threshold.pre_hook``), which is how fold knows what
to remove. torch.fx's GraphModule drops forward hooks when deep-copied: on a GraphModule root, a
deepcopy hook (when this torch has them) attaches the copy's threshold to the copy.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

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
    if isinstance(model, fx.GraphModule) and hasattr(model, "_register_deepcopy_hook"):
        model._register_deepcopy_hook(_ReattachOnDeepcopy(f"{owner_path}.{index}.{HOSTED_THRESHOLD_NAME}"))


def detach_pre_hook_(model: nn.Module, threshold: GlobalThreshold) -> None:
    """Undo attach_as_pre_hook_ (the threshold itself leaves with the parametrizations)."""
    threshold.pre_hook.remove()
    threshold.pre_hook = None
    hooks = getattr(model, "_deepcopy_hooks", None) if isinstance(model, fx.GraphModule) else None
    if hooks:
        hooks[:] = [hook for hook in hooks if not isinstance(hook, _ReattachOnDeepcopy)]
