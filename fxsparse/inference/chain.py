"""Feature-first activations between chained sparse linears: no transposes in an MLP.

A sparse linear multiplies its CSR weight by the table [x^T; 1], so a (tokens, in) input is transposed on
the way in and the (out, tokens) product transposed on the way out. When a sparse linear's only use is a
chain of elementwise ops (GELU, ReLU, dropout in eval, ...) ending in another sparse linear, as in every
transformer MLP, the first layer can hand over its (out, ...) product as it is and the second read it as
its table: both transposes vanish and the elementwise ops run on the same values in another order.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..trace import trace
from .layers import DENSE, SparseConv2d, SparseLinear

ELEMENTWISE_MODULES = (
    nn.GELU,
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Mish,
    nn.LeakyReLU,
    nn.ELU,
    nn.Identity,
    nn.Dropout,
)
ELEMENTWISE_FUNCTIONS = {
    F.gelu,
    F.relu,
    torch.relu,
    F.relu6,
    F.silu,
    torch.tanh,
    torch.sigmoid,
    F.hardswish,
    F.mish,
    F.leaky_relu,
    F.elu,
}


def accelerated_graph(model: nn.Module) -> fx.GraphModule | None:
    """The model as a torch.fx GraphModule whose sparse layers are leaves (itself if it is one; traced
    otherwise), or None when it cannot be traced."""
    if isinstance(model, fx.GraphModule):
        return model
    return trace(model, extra_leaf_types=(SparseConv2d, SparseLinear)).graph_module


def _elementwise(node: fx.Node, graph_module: fx.GraphModule) -> bool:
    """A node that maps its first argument elementwise, with no other tensor input."""
    if (
        not node.args
        or not isinstance(node.args[0], fx.Node)
        or any(isinstance(a, fx.Node) for a in [*node.args[1:], *node.kwargs.values()])
    ):
        return False
    if node.op == "call_module":
        module = graph_module.get_submodule(node.target)
        return type(module) in ELEMENTWISE_MODULES and (type(module) is not nn.Dropout or not module.training)
    return node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS


def _sparse_linear(node: fx.Node, graph_module: fx.GraphModule, calls: Counter) -> SparseLinear | None:
    if node.op != "call_module" or calls[node.target] != 1:
        return None
    module = graph_module.get_submodule(node.target)
    return module if isinstance(module, SparseLinear) and module.path != DENSE else None


def chain_linears_(model: nn.Module) -> tuple[nn.Module, list[tuple[str, str]]]:
    """(the model, the (producer, consumer) pairs of sparse linears now passing feature-first activations).

    The model is returned as a torch.fx GraphModule when chains were found (traced if it was not one), else as
    it came; an untraceable model is returned unchanged.
    """
    if not any(isinstance(m, SparseLinear) and m.path != DENSE for m in model.modules()):
        return model, []
    graph_module = accelerated_graph(model)
    if graph_module is None:
        return model, []
    calls = Counter(node.target for node in graph_module.graph.nodes if node.op == "call_module")
    chains = []
    for node in graph_module.graph.nodes:
        consumer = _sparse_linear(node, graph_module, calls)
        if consumer is None or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            continue
        source = node.args[0]
        while len(source.users) == 1 and _elementwise(source, graph_module):
            source = source.args[0]
        producer = _sparse_linear(source, graph_module, calls)
        if (
            producer is None
            or len(source.users) != 1
            or producer is consumer
            or producer.features_first_out
            or producer.out_features != consumer.in_features
        ):
            continue
        producer.features_first_out = True
        consumer.read_features_first_()
        chains.append((str(source.target), str(node.target)))
    return (graph_module, chains) if chains else (model, [])
