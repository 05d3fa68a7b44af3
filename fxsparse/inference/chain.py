"""Feature-first activations between chained sparse linears: no transposes in an MLP.

A sparse linear multiplies its CSR weight by the table [x^T; 1], so a (tokens, in) input is transposed on
the way in and the (out, tokens) product transposed on the way out. When a sparse linear's only use is a
chain of elementwise ops (GELU, ReLU, dropout in eval, ...) ending in another sparse linear, as in every
transformer MLP, the first layer can hand over its (out, ...) product as it is and the second read it as
its table: both transposes vanish and the elementwise ops run on the same values in another order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..trace import trace
from . import ops
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


def chain_linears_(
    model: nn.Module, run: Callable[[nn.Module], object] | None = None
) -> tuple[nn.Module, list[tuple[str, str]]]:
    """(the model, the (producer, consumer) pairs of sparse linears now passing feature-first activations).

    The model is returned as a torch.fx GraphModule when chains were found in its graph (traced if it was not
    one), else as it came; a model that cannot be traced is probed instead (chain_linears_by_probe_) when
    ``run(model)`` calls it on the example.
    """
    if not any(isinstance(m, SparseLinear) and m.path != DENSE for m in model.modules()):
        return model, []
    graph_module = accelerated_graph(model)
    if graph_module is None:
        return model, chain_linears_by_probe_(model, run) if run is not None else []
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


class _FollowProducts(TorchDispatchMode):
    """Follows sparse linears' outputs through the aten ops of one forward: an op tagged pointwise passes its
    inputs' producers on to its outputs; any other op that reads a followed tensor is an escape."""

    def __init__(self):
        super().__init__()
        self.producers: dict[int, set[str]] = {}  # id(tensor) -> producers it was computed from elementwise
        self.alive: list[Tensor] = []  # the followed tensors, so that no id is reused during the forward
        self.escaped: set[str] = set()
        self.paused = False

    def follow(self, tensor: Tensor, producers: set[str]) -> None:
        self.producers[id(tensor)] = producers
        self.alive.append(tensor)

    def of(self, tensor: object) -> set[str]:
        return self.producers.get(id(tensor), set()) if isinstance(tensor, Tensor) else set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused:
            return out
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        followed = set().union(*(self.of(t) for t in inputs))
        if not followed:
            return out
        outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, Tensor)]
        same_shape = all(t.shape == outputs[0].shape for t in inputs if t.dim() > 0) if outputs else False
        if torch.Tag.pointwise in func.tags and same_shape and all(self.of(t) for t in inputs if t.dim() > 0):
            for t in outputs:
                self.follow(t, followed)
        else:
            self.escaped |= followed
        return out


def chain_linears_by_probe_(model: nn.Module, run: Callable[[nn.Module], object]) -> list[tuple[str, str]]:
    """Feature-first handover between sparse linears of a model torch.fx cannot trace (transformers' models
    reach fxsparse through the module walk): the chains chain_linears_ finds in a graph, found by following
    each sparse linear's output through one forward on the example (``run(model)``).

    A compiled-kernel linear whose output reaches only other compiled-kernel linears, through elementwise
    (pointwise) ops alone, hands its (out, ...) product over as a (..., out) view; the elementwise ops keep
    that layout, and a linear given such an input reads it as its table (SparseLinear: no transposes). The
    result must match the unchained model's (_close_outputs), else nothing is chained. Returns the
    (producer, consumer) pairs.
    """
    linears = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, SparseLinear) and m.kernel == ops.NATIVE and not (m.features_first_in or m.features_first_out)
    }
    if len(linears) < 2:
        return []
    probe = _FollowProducts()
    reads: dict[str, set[str]] = {n: set() for n in linears}  # producer -> consumers reading it

    def before(name):
        def hook(module, args):
            for producer in set().union(*(probe.of(a) for a in args)):
                reads[producer].add(name)
            probe.paused = True  # the layer's own use of its input is not an escape

        return hook

    def after(name):
        def hook(module, args, output):
            probe.paused = False
            if isinstance(output, Tensor):
                probe.follow(output, {name})

        return hook

    handles = [
        h
        for n, m in linears.items()
        for h in (m.register_forward_pre_hook(before(n)), m.register_forward_hook(after(n)))
    ]
    ran, reference = probe_forward(model, run, probe, handles)  # the probe only watches: its output is the model's
    if not ran:
        return []
    producers = [n for n in linears if reads[n] and n not in probe.escaped and n not in reads[n]]
    if not producers:
        return []
    for name in producers:
        linears[name].features_first_view_out = True
    try:
        with torch.no_grad():
            same = _close_outputs(run(model), reference)
    except Exception:  # noqa: BLE001 - an op downstream that cannot take the view: chain nothing
        same = False
    if not same:
        for name in producers:
            linears[name].features_first_view_out = False
        return []
    order = list(linears)
    return [(p, c) for p in producers for c in sorted(reads[p], key=order.index)]


def probe_forward(
    model: nn.Module, run: Callable[[nn.Module], object], probe: TorchDispatchMode, handles: list
) -> tuple[bool, object]:
    """(whether it ran, what it returned): ``run(model)`` without gradients under the dispatch mode ``probe``,
    the hooks in ``handles`` removed afterwards either way. The planning pass ran the model already, so a
    probe that raises only means nothing is rewritten."""
    try:
        with torch.no_grad(), probe:
            return True, run(model)
    except Exception:  # noqa: BLE001 - see above
        return False, None
    finally:
        for handle in handles:
            handle.remove()


def _close_outputs(a: object, b: object) -> bool:
    """The chained model's outputs against the unchained ones: the products are the same sums, but torch's
    elementwise ops may round differently on a strided layout (GELU's erf: 1e-6), so equal within 1e-5 of the
    largest magnitude; a wrong layout would be off by the values themselves."""
    leaves_a, leaves_b = pytree.tree_leaves(a), pytree.tree_leaves(b)
    if len(leaves_a) != len(leaves_b):
        return False
    for x, y in zip(leaves_a, leaves_b):
        if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
            if x != y:
                return False
        elif x.shape != y.shape or x.dtype != y.dtype:
            return False
        elif x.is_floating_point() and x.numel():
            scale = y.abs().max().item()
            if not (x - y).abs().max().item() <= 1e-5 * scale:
                return False
        elif not torch.equal(x, y):
            return False
    return True
