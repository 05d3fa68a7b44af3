"""Model -> torch.fx GraphModule, with timm's "do not trace" registry as leaves when timm is present.

A model that cannot be traced is reported (``TraceResult.graph_module is None``) with the reason, so the
caller can fall back to walking modules instead of blocking training.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch.fx as fx
from torch import nn

from .layers import layer_types_outside_torch


def _timm_leaves() -> tuple[tuple[type, ...], tuple]:
    """timm's registry of modules and functions that symbolic tracing must not enter (empty without timm)."""
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except Exception:  # timm missing or too old: plain torch.fx rules
        return (), ()
    return tuple(get_notrace_modules()), tuple(get_notrace_functions())


class LeafAwareTracer(fx.Tracer):
    """torch.fx tracer that keeps timm's notrace modules (and any extra classes) as opaque leaves."""

    def __init__(self, extra_leaf_types: tuple[type, ...] = ()):
        leaf_modules, leaf_functions = _timm_leaves()
        super().__init__(autowrap_functions=leaf_functions)
        self.leaf_types = leaf_modules + layer_types_outside_torch() + tuple(extra_leaf_types)

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if self.leaf_types and isinstance(module, self.leaf_types):
            return True
        return super().is_leaf_module(module, qualified_name)


@dataclasses.dataclass
class TraceResult:
    graph_module: Optional[fx.GraphModule]
    leaf_names: list[str]  # call_module targets whose insides are invisible in the graph
    error: Optional[str] = None  # why tracing failed, when it did


def trace(model: nn.Module, extra_leaf_types: tuple[type, ...] = ()) -> TraceResult:
    """Symbolically trace ``model``; never raises for an untraceable model (see ``TraceResult.error``).

    The GraphModule shares submodules and parameters with ``model`` by reference (torch.fx semantics):
    copy the model first if it must stay untouched.
    """
    tracer = LeafAwareTracer(extra_leaf_types)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # torch.fx raises many types (TraceError, TypeError, RuntimeError, ...)
        return TraceResult(None, [], f"{type(exc).__name__}: {exc}")
    name = model.__class__.__name__
    graph_module = fx.GraphModule(tracer.root, graph, name)
    leaves = [n.target for n in graph.nodes if n.op == "call_module"]
    return TraceResult(graph_module, leaves)
