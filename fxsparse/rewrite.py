"""The sparsifying graph pass: find every conv/linear weight use, parametrize it, add the threshold node.

Weight uses found (DESIGN.md "The graph pass"):
  * call_module on Conv1d/2d/3d and Linear (and subclasses, e.g. timm's Conv2dSame),
  * call_function F.conv1d/2d/3d and F.linear whose weight is a get_attr parameter,
  * Conv/Linear (and MultiheadAttention projection weights) inside opaque leaf modules, which the
    graph cannot see into, found by walking them.
A parameter shared by several uses (tied weights) enters the pool once.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .global_threshold import GlobalThreshold
from .methods.base import Method
from .parametrization import SparseWeight
from .pool import THRESHOLD_NAME

SPARSE_MODULE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
WEIGHT_FUNCTIONS = {F.linear, F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}


@dataclasses.dataclass(frozen=True)
class WeightUse:
    module_fqn: str  # "" for the root
    name: str  # attribute holding the parameter on that module

    @property
    def fqn(self) -> str:
        return f"{self.module_fqn}.{self.name}" if self.module_fqn else self.name


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def weight_uses_in_module(module: nn.Module, prefix: str = "") -> list[WeightUse]:
    """Walk ``module`` (and its children) for conv/linear weights, as for an opaque leaf or untraceable model."""
    uses = []
    for name, sub in module.named_modules():
        fqn = _join(prefix, name)
        if isinstance(sub, SPARSE_MODULE_TYPES) and isinstance(getattr(sub, "weight", None), nn.Parameter):
            uses.append(WeightUse(fqn, "weight"))
        elif isinstance(sub, nn.MultiheadAttention):
            uses += [WeightUse(fqn, w) for w in MHA_WEIGHTS if isinstance(getattr(sub, w, None), nn.Parameter)]
    return uses


def weight_uses_in_graph(gm: fx.GraphModule) -> list[WeightUse]:
    """Every conv/linear weight the traced graph uses, directly or inside opaque leaf modules."""
    uses: list[WeightUse] = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            uses += weight_uses_in_module(gm.get_submodule(node.target), node.target)
        elif node.op == "call_function" and node.target in WEIGHT_FUNCTIONS:
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if isinstance(weight, fx.Node) and weight.op == "get_attr":
                module_fqn, _, name = weight.target.rpartition(".")
                if isinstance(getattr(gm.get_submodule(module_fqn), name, None), nn.Parameter):
                    uses.append(WeightUse(module_fqn, name))
    return list(dict.fromkeys(uses))  # a module called twice is one use


def reroute_functional_weights_(gm: fx.GraphModule, uses: list[WeightUse]) -> None:
    """Read parametrized weights used by F.conv*/F.linear as ``getattr(<module>, name)`` at run time.

    A ``get_attr`` node on a parametrized attribute would make GraphModule (and its deepcopy) copy the
    attribute's current *value*; fetching the owning module keeps the parametrization live.
    """
    graph, targets = gm.graph, {use.fqn: use for use in uses}
    for node in list(graph.nodes):
        if node.op == "get_attr" and node.target in targets:
            use = targets[node.target]
            with graph.inserting_before(node):
                owner = graph.get_attr(use.module_fqn)
                value = graph.call_function(getattr, (owner, use.name))
            node.replace_all_uses_with(value)
            graph.erase_node(node)


def split_root_uses(uses: list[WeightUse]) -> tuple[list[WeightUse], list[WeightUse]]:
    """(uses on submodules, uses of parameters held by the root module itself).

    torch.nn.utils.parametrize swaps the class of the module it parametrizes; on a GraphModule root
    that breaks GraphModule's copy semantics, so such weights stay dense (sparsify warns).
    """
    return [u for u in uses if u.module_fqn], [u for u in uses if not u.module_fqn]


LayerFilter = Callable[[str, nn.Parameter], bool]


def select_uses(
    model: nn.Module, uses: Iterable[WeightUse], exclude: Optional[LayerFilter], min_numel: int
) -> list[WeightUse]:
    """Drop excluded or too-small weights (Feather's ``pthres``)."""
    kept = []
    for use in uses:
        param = getattr(model.get_submodule(use.module_fqn), use.name)
        if param.numel() < min_numel or (exclude is not None and exclude(use.fqn, param)):
            continue
        kept.append(use)
    return kept


def install_parametrizations_(model: nn.Module, uses: list[WeightUse], method: Method, threshold: GlobalThreshold) -> list[WeightUse]:
    """Register a SparseWeight on every use; returns one use per distinct parameter (the pool)."""
    seen, pool = set(), []
    for use in uses:
        module = model.get_submodule(use.module_fqn)
        param = getattr(module, use.name)
        parametrize.register_parametrization(module, use.name, SparseWeight(method, threshold), unsafe=True)
        if id(param) not in seen:
            seen.add(id(param))
            pool.append(use)
    return pool


def original_path(use: WeightUse) -> str:
    """Attribute path of the raw (dense) parameter behind a parametrized weight."""
    return _join(use.module_fqn, f"parametrizations.{use.name}.original")


def insert_threshold_node_(gm: fx.GraphModule, threshold: GlobalThreshold, pool: list[WeightUse]) -> fx.Node:
    """Add the GlobalThreshold as the first computation of forward, fed by every pooled dense weight."""
    gm.add_submodule(THRESHOLD_NAME, threshold)
    graph = gm.graph
    first_op = next(n for n in graph.nodes if n.op != "placeholder")  # the output node at least
    with graph.inserting_before(first_op):
        weights = [graph.get_attr(original_path(use)) for use in pool]
        node = graph.call_module(THRESHOLD_NAME, tuple(weights))
    graph.lint()
    gm.recompile()
    return node
