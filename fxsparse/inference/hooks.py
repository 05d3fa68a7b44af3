"""The forward hooks of the model given to accelerate(), carried over to the accelerated model by module name.

accelerate() replaces modules (a conv by its SparseConv2d, a folded BatchNorm by nn.Identity) and may return
a torch.fx GraphModule, a new root that calls the leaf modules directly. Each module name that had forward
(pre-)hooks gets them on the module of that name in the accelerated model, after the planning pass (so they
do not fire while layers are timed). A hook that cannot fire there (a container or a folded BatchNorm that
the graph no longer calls) is named in a warning, as is a hook on a conv whose output now includes its
BatchNorm.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any

import torch.fx as fx
from torch import nn

# nn.Module's dicts of forward hooks (the last three are absent from some torch versions' modules)
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)

Hooks = dict[str, dict[str, Any]]


def forward_hooks(model: nn.Module) -> Hooks:
    """{module name: {hook dict name: a copy of it}} for every module of ``model`` with a forward hook."""
    out = {}
    for name, module in model.named_modules():
        dicts = {attr: OrderedDict(getattr(module, attr)) for attr in _HOOK_DICTS if hasattr(module, attr)}
        for key, hook in list(dicts["_forward_pre_hooks"].items()):
            if type(hook).__module__.startswith("torch.nn.utils."):  # torch's old weight_norm: a weight, baked in
                del dicts["_forward_pre_hooks"][key]
        if dicts["_forward_pre_hooks"] or dicts["_forward_hooks"]:
            out[name] = dicts
    return out


def remove_forward_hooks_(model: nn.Module) -> None:
    """No forward hook left on ``model``'s modules (a copy's, which would fire while its layers are timed)."""
    for module in model.modules():
        for attr in _HOOK_DICTS:
            if getattr(module, attr, None):
                getattr(module, attr).clear()


def carry_forward_hooks_(model: nn.Module, hooks: Hooks, folded_convs: list[str]) -> None:
    """Give each module of ``model`` the hooks its name had (see the module docstring)."""
    if not hooks:
        return
    modules = dict(model.named_modules())
    called = None
    if isinstance(model, fx.GraphModule):
        called = {str(node.target) for node in model.graph.nodes if node.op == "call_module"} | {""}
    lost, changed = [], []
    for name, dicts in hooks.items():
        module = modules.get(name)
        if module is None or (called is not None and name not in called):
            lost.append(name or "the root module")
            continue
        for attr, value in dicts.items():
            if hasattr(module, attr):
                setattr(module, attr, OrderedDict(value))
        if name in folded_convs:
            changed.append(name)
    if lost or changed:
        parts = []
        if lost:
            parts.append(
                f"the forward hooks of {', '.join(lost)} do not fire on the accelerated model (its graph calls the "
                "leaf modules directly, and a folded BatchNorm is not called): register them on its leaf modules"
            )
        if changed:
            parts.append(f"the outputs that the hooks of {', '.join(changed)} see now include their folded BatchNorm")
        warnings.warn("fxsparse.accelerate: " + "; ".join(parts), stacklevel=3)
