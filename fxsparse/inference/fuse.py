"""Fused epilogues of the compiled kernels: a ReLU, and a residual add before it, done as the output is stored.

A layer on the compiled kernel (path ``direct+native`` or ``native``) writes each output tile once; when the
layer's only user is a ReLU, or an add of another tensor (a ResNet block's shortcut) followed by a ReLU, the
kernel applies them to the tile it holds in registers, so the activations are not read and written again:

    relu(conv(x))             -> conv(x) with relu=True
    relu(conv(x) + shortcut)  -> conv(x, residual=shortcut) with relu=True

Done on the torch.fx graph after planning (the layers know their paths then); a model torch.fx cannot trace
keeps its ops as they are.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Collection

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import ops
from .chain import accelerated_graph
from .layers import SparseConv2d, SparseLinear

RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


def _native_layer(node: fx.Node, graph_module: fx.GraphModule, calls: Counter):
    if node.op != "call_module" or calls[node.target] != 1:
        return None
    layer = graph_module.get_submodule(node.target)
    if isinstance(layer, (SparseConv2d, SparseLinear)) and layer.kernel == ops.NATIVE and not layer.relu:
        return layer
    return None


def _is_relu(node: fx.Node, graph_module: fx.GraphModule) -> bool:
    if len(node.args) != 1 or node.kwargs.keys() - {"inplace"}:
        return False
    if node.op == "call_module":
        return type(graph_module.get_submodule(node.target)) is nn.ReLU
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return node.op == "call_function" and node.target in RELU_FUNCTIONS


def _is_add(node: fx.Node) -> bool:
    return (
        node.op == "call_function"
        and node.target in ADD_FUNCTIONS
        and len(node.args) == 2
        and not node.kwargs
        and all(isinstance(a, fx.Node) for a in node.args)
    ) or (node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs)


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _skip_identities_(graph_module: fx.GraphModule, keep: Collection[str]) -> None:
    """Bypass the graph's calls of plain nn.Identity modules (a folded BatchNorm, timm's unused drop_block / aa),
    except those named in ``keep`` (they get forward hooks), so that a ReLU after them is the layer's user."""
    for node in list(graph_module.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        module = graph_module.get_submodule(node.target)
        if type(module) is nn.Identity and node.target not in keep:
            node.replace_all_uses_with(node.args[0])
            graph_module.graph.erase_node(node)


def fuse_epilogues_(model: nn.Module, keep: Collection[str] = ()) -> tuple[nn.Module, list[str]]:
    """(the model with ReLUs and residual adds fused into its compiled-kernel layers, the fused layers' names);
    the modules named in ``keep`` stay called (their forward hooks fire)."""
    if not any(isinstance(m, (SparseConv2d, SparseLinear)) and m.kernel == ops.NATIVE for m in model.modules()):
        return model, []
    graph_module = accelerated_graph(model)
    if graph_module is None:
        return model, []
    _skip_identities_(graph_module, keep)
    graph = graph_module.graph
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    fused = []
    for node in list(graph.nodes):
        layer = _native_layer(node, graph_module, calls)
        if layer is None or len(node.args) != 1 or node.kwargs:
            continue
        result, user = node, _only_user(node)
        if isinstance(layer, SparseConv2d) and user is not None and _is_add(user):
            other = user.args[1] if user.args[0] is node else user.args[0]
            if other is not node:  # conv(x) + shortcut: the conv moves to the add, taking the shortcut along
                with graph.inserting_before(user):
                    result = graph.call_module(node.target, node.args, {"residual": other})
                user.replace_all_uses_with(result)
                graph.erase_node(user)
                graph.erase_node(node)
                user = _only_user(result)
        if user is not None and _is_relu(user, graph_module):
            user.replace_all_uses_with(result)
            graph.erase_node(user)
            layer.relu = True
        if result is not node or layer.relu:
            fused.append(str(node.target))
    if not fused:
        return model, []
    graph.lint()
    graph_module.recompile()
    return graph_module, fused


class MaxPool2d(nn.Module):
    """nn.MaxPool2d (dilation 1, floor mode, no indices) on the compiled kernel: torch's CPU max pooling of an
    NCHW float32 batch is slow (ResNet-50's stem pool: 6-8 ms, against about 0.3 ms), the result is the same."""

    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        pair = nn.modules.utils._pair
        self.kernel_size, self.padding = list(pair(pool.kernel_size)), list(pair(pool.padding))
        self.stride = list(pair(pool.stride if pool.stride is not None else pool.kernel_size))

    def forward(self, x):
        return torch.ops.fxsparse.native_max_pool2d(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


def replace_max_pools_(model: nn.Module) -> list[str]:
    """Put MaxPool2d in place of every plain nn.MaxPool2d it computes exactly (when the kernels are compiled);
    returns their names."""
    from . import native

    if not native.available():
        return []
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module) is nn.MaxPool2d and not module.return_indices and not module.ceil_mode:
            if nn.modules.utils._pair(module.dilation) != (1, 1) or not name:
                continue
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, MaxPool2d(module))
            replaced.append(name)
    return replaced


__all__ = ["fuse_epilogues_", "replace_max_pools_", "MaxPool2d"]
