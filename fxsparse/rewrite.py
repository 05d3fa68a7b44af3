"""The sparsifying graph pass: find the weight every conv/linear op multiplies, parametrize it, add the threshold node.

Weight uses found (docs/GRAPH_PASS.md):
  * call_module on the modules fxsparse.layers defines as carrying a prunable weight (Linear, Conv,
    ConvTranspose, transformers' Conv1D, MultiheadAttention; subclasses too, e.g. timm's Conv2dSame),
  * call_function F.conv1d/2d/3d and F.linear whose weight is a get_attr parameter,
  * the same modules inside opaque leaf modules, which the graph cannot see into, found by walking them,
  * an op weight computed from parameters alone (weight standardization: timm's StdConv2d and
    ScaledStdConv2d): that parameter-only subgraph is lifted out of the graph into a `DerivedWeight`
    parametrization of the parameter of the weight's shape, the op reads the parametrized attribute, and
    SparseWeight after it sparsifies the weight the op multiplies.
A weight that already carries torch parametrizations (weight_norm, spectral_norm) gets SparseWeight at
the end of its chain. A parameter shared by several uses (tied weights) enters the pool once. What the
pass cannot sparsify stays dense and is reported with the reason (`PassResult.dense`, warned by api.py).
Every node the pass inserts is tagged in ``node.meta["fxsparse.role"]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .fqn import join
from .global_threshold import GlobalThreshold
from .layers import EMBEDDING_TYPES, embedding_weights, prunable_weights, unknown_expert_weights, weight_layout
from .methods.base import Method
from .op_weight import has_torch_forward, multiplies_stored_weight
from .parametrization import DerivedWeight, SparseWeight, chain_originals
from .pool import THRESHOLD_NAME
from .trace import ROLE

WEIGHT_FUNCTIONS = {F.linear, F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}

# node.meta[ROLE] of the nodes the pass inserts
THRESHOLD = "threshold"  # the GlobalThreshold call
THRESHOLD_INPUT = "threshold-input"  # a pooled weight read for it
WEIGHT_READ = "weight"  # getattr(<module>, <name>): a parametrized weight read at run time by F.conv*/F.linear


@dataclasses.dataclass(frozen=True)
class WeightUse:
    module_fqn: str  # "" for the root
    name: str  # attribute holding the parameter on that module

    @property
    def fqn(self) -> str:
        return join(self.module_fqn, self.name)


@dataclasses.dataclass(frozen=True)
class DenseWeight:
    """A weight an op multiplies that the pass cannot sparsify: it stays dense, and reports count it so."""

    fqn: str
    numel: int
    reason: str


@dataclasses.dataclass
class LiftedWeight:
    """An op weight computed by a parameter-only subgraph, to move into its parameter's parametrization."""

    use: WeightUse  # the parameter of the weight's shape, which gets DerivedWeight then SparseWeight
    op: fx.Node
    value: fx.Node  # the subgraph's output: the op's weight argument
    nodes: list[fx.Node]  # the subgraph, without its get_attr inputs
    reads: list[fx.Node]  # its get_attr inputs
    compute: fx.GraphModule  # the subgraph as a function of (parameter, *extras)
    extras: list[str]  # get_attr targets of the other inputs, in compute's argument order


@dataclasses.dataclass
class Survey:
    uses: list[WeightUse] = dataclasses.field(default_factory=list)  # stored weights the ops multiply
    lifted: list[LiftedWeight] = dataclasses.field(default_factory=list)
    dense: list[DenseWeight] = dataclasses.field(default_factory=list)

    def add(self, other: Survey) -> None:
        self.uses += other.uses
        self.lifted += other.lifted
        self.dense += other.dense


@dataclasses.dataclass(frozen=True)
class PassResult:
    """What sparsify() changed in the model it returns."""

    pooled: tuple[str, ...]  # each distinct pooled weight (the weight the op multiplies), by fqn
    chained: tuple[str, ...]  # of those, the ones after other parametrizations (lifted, weight_norm, ...)
    lifted: tuple[str, ...]  # of those, the ones whose transform moved out of the graph (DerivedWeight)
    dense: tuple[DenseWeight, ...]  # weights that could not be sparsified, and why
    excluded: tuple[str, ...]  # weights left dense by exclude= / min_numel=
    threshold_in_graph: bool  # False: the threshold runs as a forward pre-hook (no graph)
    training_leaves: tuple[str, ...] = ()  # classes kept opaque because they branch on self.training
    traced_through: tuple[str, ...] = ()  # registry leaves traced through to see their weight transforms


# ------------------------------------------------------------------------------------------------
# finding the weights
# ------------------------------------------------------------------------------------------------
def _tensor_use(module: nn.Module, fqn: str, name: str, survey: Survey) -> None:
    """Record the weight ``name`` of a layer whose op multiplies it as stored (plain or parametrized)."""
    if parametrize.is_parametrized(module, name) or isinstance(module._parameters.get(name), nn.Parameter):
        survey.uses.append(WeightUse(fqn, name))
    elif name not in module._buffers:  # a buffer is a constant (a fixed filter): nothing to prune
        value = getattr(module, name, None)
        if isinstance(value, Tensor):
            survey.dense.append(
                DenseWeight(
                    join(fqn, name),
                    value.numel(),
                    "its weight is not a parameter but a tensor recomputed before each forward (e.g. by the "
                    "deprecated torch.nn.utils.weight_norm hook; torch.nn.utils.parametrizations.weight_norm "
                    "can be sparsified)",
                )
            )


def survey_module(module: nn.Module, prefix: str = "") -> Survey:
    """Walk ``module`` (and its children) for prunable weights (fxsparse.layers), as for an opaque leaf or an
    untraceable model.

    A layer whose forward is not torch's own is run once on a sample input to check that its op
    multiplies its stored weight; otherwise (timm's StdConv2dSame standardizes it first) it stays dense.
    """
    survey = Survey()
    for name, sub in module.named_modules():
        fqn = join(prefix, name)
        weights = prunable_weights(sub)
        if weights and weight_layout(sub) is not None and not has_torch_forward(sub):
            verdict = multiplies_stored_weight(sub)
            if verdict.stored is not True:
                survey.dense.append(DenseWeight(join(fqn, "weight"), sub.weight.numel(), verdict.detail))
                continue
        for weight in weights:
            _tensor_use(sub, fqn, weight, survey)
        for name, reason in unknown_expert_weights(sub).items():  # an MoE router, an unknown expert stack
            survey.dense.append(DenseWeight(join(fqn, name), getattr(sub, name).numel(), reason))
    return survey


def weight_uses_in_module(module: nn.Module, prefix: str = "") -> list[WeightUse]:
    """The weights `survey_module` can sparsify."""
    return survey_module(module, prefix).uses


def _weight_argument(node: fx.Node) -> object:
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")


def _fetch(gm: fx.GraphModule, target: str) -> object:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner), name, None)


def _subgraph(value: fx.Node) -> tuple[list[fx.Node], list[fx.Node], list[fx.Node]] | None:
    """(computation nodes, get_attr inputs, module calls) that ``value`` depends on; None when it depends
    on the forward's input (a weight computed from activations is an activation product, not a weight)."""
    nodes, reads, calls, seen, todo = [], [], [], set(), [value]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            return None
        if node.op == "get_attr":
            reads.append(node)
            continue
        (calls if node.op == "call_module" else nodes).append(node)
        todo.extend(node.all_input_nodes)
    return nodes, reads, calls


def _compute_module(gm: fx.GraphModule, nodes: list[fx.Node], value: fx.Node, targets: list[str]) -> fx.GraphModule:
    """The subgraph as a function of the tensors it reads (``targets``, in order)."""
    graph = fx.Graph()
    inputs = {target: graph.placeholder(target.replace(".", "_")) for target in targets}
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    env: dict[fx.Node, fx.Node] = {}
    for node in sorted(nodes, key=order.__getitem__):
        env[node] = graph.node_copy(node, lambda arg: inputs[arg.target] if arg.op == "get_attr" else env[arg])
    graph.output(env[value])
    return fx.GraphModule(nn.Module(), graph, "DerivedWeightCompute")


def _lift_candidate(gm: fx.GraphModule, op: fx.Node, value: fx.Node, leaf_params: set[int]):
    """A LiftedWeight for the op weight ``value``, a DenseWeight saying why it cannot be, or None (activation)."""
    found = _subgraph(value)
    if found is None:
        return None
    nodes, reads, calls = found
    targets = sorted({read.target for read in reads})
    values = {target: _fetch(gm, target) for target in targets}
    params = [t for t in targets if isinstance(values[t], nn.Parameter)]
    name = params[0] if len(params) == 1 else f"{op.name} (computed from {', '.join(params) or 'constants'})"

    def dense(reason: str, numel: int = 0) -> DenseWeight:
        return DenseWeight(
            name, numel, f"the weight {op.target.__name__} multiplies is computed from parameters and {reason}"
        )

    if calls:
        return dense(f"a module call ({calls[0].target}) the pass cannot lift")
    odd = [t for t in targets if not isinstance(values[t], Tensor)]
    if odd:
        return dense(f"depends on {odd[0]}, which is not a tensor (e.g. the train/eval flag)")
    if not params:
        return None  # a constant kernel (no parameter): nothing to prune
    compute = _compute_module(gm, nodes, value, targets)
    try:
        with torch.no_grad():
            weight = compute(*[values[t] for t in targets])
    except Exception as exc:
        return dense(f"its computation cannot run on its own ({type(exc).__name__}: {exc})")
    numel = weight.numel() if isinstance(weight, Tensor) else 0
    shaped = [t for t in params if values[t].shape == getattr(weight, "shape", None)]
    if len(shaped) != 1:
        return dense(f"no single parameter among {params} has its shape", numel)
    primary = shaped[0]
    name = primary
    module_fqn, _, attribute = primary.rpartition(".")
    if not module_fqn:
        return dense("its parameter is held by the model's root module (move it into a submodule)", numel)
    if id(values[primary]) in leaf_params:
        return dense("its parameter is also read by an opaque module", numel)
    inside = set(nodes)
    private = all(user in inside or user is op for node in nodes for user in node.users)
    private = private and sum(arg is value for arg in (*op.args, *op.kwargs.values())) == 1
    private = private and all(
        user in inside
        for node in gm.graph.nodes
        if node.op == "get_attr" and node.target == primary
        for user in node.users
    )
    if not private:
        return dense("the computation or its parameter is shared with other parts of the graph", numel)
    extras = [t for t in targets if t != primary]
    return LiftedWeight(
        WeightUse(module_fqn, attribute),
        op,
        value,
        nodes,
        reads,
        _compute_module(gm, nodes, value, [primary] + extras),
        extras,
    )


def survey_graph(gm: fx.GraphModule) -> Survey:
    """Every conv/linear weight the traced graph multiplies: in call_module layers (and inside opaque
    leaves), in F.conv*/F.linear calls on parameters, and computed from parameters (to lift)."""
    survey = Survey()
    functional: list[tuple[fx.Node, fx.Node]] = []
    leaf_params: set[int] = set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            survey.add(survey_module(module, node.target))
            leaf_params.update(id(p) for p in module.parameters())
        elif node.op == "call_function" and node.target in WEIGHT_FUNCTIONS:
            weight = _weight_argument(node)
            if isinstance(weight, fx.Node):
                functional.append((node, weight))
        elif node.op == "get_attr":
            survey.uses += _passed_to_opaque_function(gm, node)
    for node, weight in functional:
        if weight.op == "get_attr":
            if isinstance(_fetch(gm, weight.target), nn.Parameter):
                module_fqn, _, name = weight.target.rpartition(".")
                survey.uses.append(WeightUse(module_fqn, name))
            continue  # a buffer or constant kernel: nothing to prune
        found = _lift_candidate(gm, node, weight, leaf_params)
        if isinstance(found, LiftedWeight):
            survey.lifted.append(found)
        elif isinstance(found, DenseWeight):
            survey.dense.append(found)
    survey.uses = list(dict.fromkeys(survey.uses))  # a module called twice is one use
    _drop_conflicting_lifts_(gm, survey)
    return survey


def _is_opaque_function(target: object) -> bool:
    """A Python function the tracer called without entering it (torch.fx.wrap, timm's notrace registry), as
    opposed to a torch op or a Python builtin whose effect on its arguments is known."""
    package = (getattr(target, "__module__", None) or "").partition(".")[0]
    return callable(target) and package not in ("torch", "_operator", "operator", "builtins", "math", "")


def _passed_to_opaque_function(gm: fx.GraphModule, read: fx.Node) -> list[WeightUse]:
    """The prunable weight of a layer (fxsparse.layers) that the graph hands to an opaque function
    (torchvision's shifted_window_attention receives qkv.weight and proj.weight): that function multiplies
    it, so it is pooled, and the function then reads the sparse weight through the parametrization."""
    module_fqn, _, name = read.target.rpartition(".")
    try:
        owner = gm.get_submodule(module_fqn)
    except AttributeError:
        return []
    if name not in prunable_weights(owner) or not isinstance(owner._parameters.get(name), nn.Parameter):
        return []
    opaque = any(user.op == "call_function" and _is_opaque_function(user.target) for user in read.users)
    return [WeightUse(module_fqn, name)] if opaque else []


def _drop_conflicting_lifts_(gm: fx.GraphModule, survey: Survey) -> None:
    """A parameter lifted for one op and also multiplied elsewhere (or lifted twice) stays dense."""
    plain = {id(_fetch(gm, use.fqn)) for use in survey.uses}
    counts: dict[int, int] = {}
    for lifted in survey.lifted:
        key = id(_fetch(gm, lifted.use.fqn))
        counts[key] = counts.get(key, 0) + 1
    kept = []
    for lifted in survey.lifted:
        param = _fetch(gm, lifted.use.fqn)
        if id(param) in plain or counts[id(param)] > 1:
            survey.dense.append(
                DenseWeight(
                    lifted.use.fqn, param.numel(), "its transformed value and the parameter itself are both multiplied"
                )
            )
        else:
            kept.append(lifted)
    survey.lifted = kept


def weight_uses_in_graph(gm: fx.GraphModule) -> list[WeightUse]:
    """The stored weights the graph's ops multiply (`survey_graph` without the lifts and dense layers)."""
    return survey_graph(gm).uses


# ------------------------------------------------------------------------------------------------
# changing the model
# ------------------------------------------------------------------------------------------------
def _read_weight(graph: fx.Graph, use: WeightUse) -> fx.Node:
    """``getattr(<module>, name)`` nodes: a parametrized weight read when the graph runs."""
    owner = graph.get_attr(use.module_fqn)
    value = graph.call_function(getattr, (owner, use.name))
    owner.meta[ROLE] = value.meta[ROLE] = WEIGHT_READ
    return value


def lift_weights_(gm: fx.GraphModule, lifted: list[LiftedWeight]) -> list[WeightUse]:
    """Move each lifted computation into a DerivedWeight on its parameter; the op reads that attribute."""
    graph = gm.graph
    for item in lifted:
        extras = []
        for target in item.extras:
            owner, _, name = target.rpartition(".")
            extras.append((gm.get_submodule(owner), name))
        module = gm.get_submodule(item.use.module_fqn)
        parametrize.register_parametrization(module, item.use.name, DerivedWeight(item.compute, extras), unsafe=True)
        with graph.inserting_before(item.op):
            read = _read_weight(graph, item.use)
        item.op.replace_input_with(item.value, read)
        for node in reversed([n for n in graph.nodes if n in set(item.nodes) | set(item.reads)]):
            if not node.users:
                graph.erase_node(node)
    return [item.use for item in lifted]


def reroute_functional_weights_(gm: fx.GraphModule, uses: list[WeightUse]) -> None:
    """Read parametrized weights used by F.conv*/F.linear as ``getattr(<module>, name)`` at run time.

    A ``get_attr`` node on a parametrized attribute would make GraphModule (and its deepcopy) copy the
    attribute's current *value*; fetching the owning module keeps the parametrization live.
    """
    graph, targets = gm.graph, {use.fqn: use for use in uses}
    for node in list(graph.nodes):
        if node.op == "get_attr" and node.target in targets:
            with graph.inserting_before(node):
                value = _read_weight(graph, targets[node.target])
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
    model: nn.Module, uses: Iterable[WeightUse], exclude: LayerFilter | None, min_numel: int
) -> list[WeightUse]:
    """Drop excluded or too-small weights (Feather's ``pthres``)."""
    kept = []
    for use in uses:
        param = getattr(model.get_submodule(use.module_fqn), use.name)
        if param.numel() < min_numel or (exclude is not None and exclude(use.fqn, param)):
            continue
        kept.append(use)
    return kept


def _weight_key(model: nn.Module, use: WeightUse) -> int:
    """What identifies the tensor a use multiplies: its parameter, or the parametrization chain computing it
    (tied uses share one)."""
    module = model.get_submodule(use.module_fqn)
    if parametrize.is_parametrized(module, use.name):
        return id(module.parametrizations[use.name])
    return id(getattr(module, use.name))


def _output_axis(model: nn.Module, use: WeightUse) -> int | None:
    """The dim of the weight indexing the op's outputs (fxsparse.layers); None for a use that is not a
    prunable layer of its own (an embedding tied to one); 0 for F.conv*/F.linear weights."""
    layout = prunable_weights(model.get_submodule(use.module_fqn)).get(use.name)
    if layout is not None:
        return layout.output_axis
    return None if isinstance(model.get_submodule(use.module_fqn), EMBEDDING_TYPES) else 0


def weights_left_dense(
    model: nn.Module, uses: list[WeightUse], excluded: list[WeightUse], include_embedding_tied: bool = False
) -> dict[WeightUse, str]:
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
    excluded_ids = {_weight_key(model, use): use.fqn for use in excluded}
    axes: dict[int, set] = {}
    for use in uses:
        axes.setdefault(_weight_key(model, use), set()).add(_output_axis(model, use))
    by_parameter: dict[int, str] = {}
    for use in uses:
        param_id = _weight_key(model, use)
        layout = prunable_weights(model.get_submodule(use.module_fqn)).get(use.name)
        if layout is not None and not layout.channels_are_a_dim:
            by_parameter[param_id] = f"a transposed conv with groups={layout.groups}"
        elif param_id in embeddings and not include_embedding_tied:
            by_parameter[param_id] = (
                f"tied to the embedding {', '.join(embeddings[param_id])}; "
                "sparsify(..., include_embedding_tied=True) sparsifies both uses"
            )
        elif param_id in excluded_ids:
            by_parameter[param_id] = f"tied to the excluded {excluded_ids[param_id]!r}"
        elif len(axes[param_id]) > 1:
            by_parameter[param_id] = "shared by layers whose outputs lie along different weight dims"
    reasons = {use: by_parameter.get(_weight_key(model, use)) for use in uses}
    return {use: reason for use, reason in reasons.items() if reason is not None}


def tied_embedding_uses(model: nn.Module, uses: list[WeightUse]) -> list[WeightUse]:
    """The nn.Embedding weights that are the same parameter as one of ``uses`` (a tied LM head's input
    embedding): parametrized too, both uses read one effective weight, which fold then bakes."""
    pooled = {_weight_key(model, use) for use in uses}
    return [
        WeightUse(name, "weight")
        for param_id, names in embedding_weights(model).items()
        if param_id in pooled
        for name in names
    ]


@dataclasses.dataclass(frozen=True)
class PoolItem:
    path: str  # attribute path of the raw parameter the threshold is given
    use: WeightUse
    parametrization: SparseWeight

    def original(self, model: nn.Module) -> nn.Parameter:
        return model.get_parameter(self.path)


def install_parametrizations_(model: nn.Module, uses: list[WeightUse], method: Method) -> list[PoolItem]:
    """Register a SparseWeight (last in the chain) on every use; returns one item per distinct parameter.

    Every use of one parameter gets the output axis of its first layer use, so all read one effective
    weight; a mixture-of-experts stack (fxsparse.layers) is sparsified expert by expert. The SparseWeights
    get their threshold afterwards (`SparseWeight.bind_threshold_`), once the pool it thresholds is known.
    """
    axes: dict[int, int] = {}
    stacks: set[int] = set()
    for use in uses:
        axis = _output_axis(model, use)
        if axis is not None:
            axes.setdefault(_weight_key(model, use), axis)
        layout = prunable_weights(model.get_submodule(use.module_fqn)).get(use.name)
        if layout is not None and layout.experts:
            stacks.add(_weight_key(model, use))
    seen, pool = set(), []
    for use in uses:
        module = model.get_submodule(use.module_fqn)
        key = _weight_key(model, use)
        sparse = SparseWeight(method, None, output_axis=axes.get(key, 0), experts=key in stacks)
        parametrize.register_parametrization(module, use.name, sparse, unsafe=True)
        sparse.attach_(module, use.name)
        chain = module.parametrizations[use.name]
        original = chain_originals(chain)[sparse.primary]
        if id(original) not in seen:
            seen.add(id(original))
            name = "original" if chain.is_tensor else f"original{sparse.primary}"
            pool.append(PoolItem(join(use.module_fqn, f"parametrizations.{use.name}.{name}"), use, sparse))
    return pool


def original_path(use: WeightUse) -> str:
    """Attribute path of the raw (dense) parameter behind a weight parametrized by SparseWeight alone."""
    return join(use.module_fqn, f"parametrizations.{use.name}.original")


def threshold_node(gm: fx.GraphModule) -> fx.Node | None:
    """The graph's GlobalThreshold call (tagged by the pass), if any."""
    return next((n for n in gm.graph.nodes if n.meta.get(ROLE) == THRESHOLD), None)


def insert_threshold_node_(gm: fx.GraphModule, threshold: GlobalThreshold, pool: list[PoolItem]) -> fx.Node:
    """Add the GlobalThreshold as the first computation of forward, fed by every pooled dense weight."""
    gm.add_submodule(THRESHOLD_NAME, threshold)
    graph = gm.graph
    first_op = next(n for n in graph.nodes if n.op != "placeholder")  # the output node at least
    with graph.inserting_before(first_op):
        weights = [graph.get_attr(item.path) for item in pool]
        node = graph.call_module(THRESHOLD_NAME, tuple(weights))
    for weight in weights:
        weight.meta[ROLE] = THRESHOLD_INPUT
    node.meta[ROLE] = THRESHOLD
    graph.lint()
    gm.recompile()
    return node
