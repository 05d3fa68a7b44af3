"""The sparsifying graph pass: find every conv/linear weight use, parametrize it, add the threshold node.

Weight uses found (DESIGN.md "The graph pass"):
  * call_module on the modules fxsparse.layers defines as carrying a prunable weight (Linear, Conv,
    ConvTranspose, transformers' Conv1D, MultiheadAttention; subclasses too, e.g. timm's Conv2dSame),
  * call_function F.conv1d/2d/3d and F.linear whose weight is a get_attr parameter,
  * the same modules inside opaque leaf modules, which the graph cannot see into, found by walking them.
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
from .layers import EMBEDDING_TYPES, embedding_weights, prunable_weights
from .methods.base import Method
from .parametrization import SparseWeight
from .pool import THRESHOLD_NAME

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
    """Walk ``module`` (and its children) for prunable weights (fxsparse.layers), as for an opaque leaf or
    untraceable model."""
    uses = []
    for name, sub in module.named_modules():
        fqn = _join(prefix, name)
        uses += [WeightUse(fqn, w) for w in prunable_weights(sub) if isinstance(getattr(sub, w), nn.Parameter)]
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


def _parameter(model: nn.Module, use: WeightUse) -> nn.Parameter:
    return getattr(model.get_submodule(use.module_fqn), use.name)


def _output_axis(model: nn.Module, use: WeightUse) -> Optional[int]:
    """The dim of the weight indexing the op's outputs (fxsparse.layers); None for a use that is not a
    prunable layer of its own (an embedding tied to one); 0 for F.conv*/F.linear weights."""
    layout = prunable_weights(model.get_submodule(use.module_fqn)).get(use.name)
    if layout is not None:
        return layout.output_axis
    return None if isinstance(model.get_submodule(use.module_fqn), EMBEDDING_TYPES) else 0


def weights_left_dense(model: nn.Module, uses: list[WeightUse], excluded: list[WeightUse],
                       include_embedding_tied: bool = False) -> dict[WeightUse, str]:
    """The uses the pool must leave dense, with the reason (sparsify names them in a warning).

    * a transposed conv with groups > 1: an output channel is not one index of a weight dim, so neither
      ST-3's per-channel rescale nor ST-3-sigma's shape sum S_l = O + I/g + k applies to the stored tensor;
    * a weight tied to an nn.Embedding (a tied LM head), unless ``include_embedding_tied``: the lookup
      would read the dense weight while the head multiplies by the sparse one, and fold would change both;
    * a weight shared with an ``excluded`` use, or by layers whose outputs lie along different dims:
      one effective weight cannot serve both uses.
    A parameter left dense is left dense in every one of its uses.
    """
    embeddings = embedding_weights(model)
    excluded_ids = {id(_parameter(model, use)): use.fqn for use in excluded}
    axes: dict[int, set] = {}
    for use in uses:
        axes.setdefault(id(_parameter(model, use)), set()).add(_output_axis(model, use))
    by_parameter: dict[int, str] = {}
    for use in uses:
        param_id = id(_parameter(model, use))
        layout = prunable_weights(model.get_submodule(use.module_fqn)).get(use.name)
        if layout is not None and not layout.channels_are_a_dim:
            by_parameter[param_id] = f"a transposed conv with groups={layout.groups}"
        elif param_id in embeddings and not include_embedding_tied:
            by_parameter[param_id] = (f"tied to the embedding {', '.join(embeddings[param_id])}; "
                                      "sparsify(..., include_embedding_tied=True) sparsifies both uses")
        elif param_id in excluded_ids:
            by_parameter[param_id] = f"tied to the excluded {excluded_ids[param_id]!r}"
        elif len(axes[param_id]) > 1:
            by_parameter[param_id] = "shared by layers whose outputs lie along different weight dims"
    reasons = {use: by_parameter.get(id(_parameter(model, use))) for use in uses}
    return {use: reason for use, reason in reasons.items() if reason is not None}


def tied_embedding_uses(model: nn.Module, uses: list[WeightUse]) -> list[WeightUse]:
    """The nn.Embedding weights that are the same parameter as one of ``uses`` (a tied LM head's input
    embedding): parametrized too, both uses read one effective weight, which fold then bakes."""
    pooled = {id(_parameter(model, use)) for use in uses}
    return [WeightUse(name, "weight") for param_id, names in embedding_weights(model).items() if param_id in pooled
            for name in names]


def install_parametrizations_(
    model: nn.Module, uses: list[WeightUse], method: Method, threshold: GlobalThreshold
) -> list[WeightUse]:
    """Register a SparseWeight on every use; returns one use per distinct parameter (the pool).

    Every use of one parameter gets the output axis of its first layer use, so all read one effective weight.
    """
    axes: dict[int, int] = {}
    for use in uses:
        axis = _output_axis(model, use)
        if axis is not None:
            axes.setdefault(id(_parameter(model, use)), axis)
    seen, pool = set(), []
    for use in uses:
        module = model.get_submodule(use.module_fqn)
        param = getattr(module, use.name)
        parametrization = SparseWeight(method, threshold, output_axis=axes.get(id(param), 0))
        parametrize.register_parametrization(module, use.name, parametrization, unsafe=True)
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
