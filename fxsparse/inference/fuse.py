"""Fused epilogues of the compiled kernels: a ReLU or GELU, and a residual add, done as the output is stored.

A layer on the compiled kernel (path ``direct+native`` or ``native``) writes each output tile once; when the
layer's only user is a ReLU, or an add of another tensor (a ResNet block's shortcut) followed by a ReLU, or, for
a linear, an exact (erf) GELU (a transformer's MLP), the kernel applies them to the tile it holds in registers,
so the activations are not read and written again:

    relu(conv(x))             -> conv(x) with activation "relu"
    relu(conv(x) + shortcut)  -> conv(x, residual=shortcut) with activation "relu"
    gelu(linear(x))           -> linear(x) with activation "gelu"

Done on the torch.fx graph after planning (the layers know their paths then). In a model torch.fx cannot trace
(transformers' models), a GELU module applied to a linear's output alone is found by following one forward
(fuse_gelus_by_probe_); its other ops stay as they are.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable, Collection

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from . import ops
from .chain import _close_outputs, accelerated_graph, probe_forward
from .layers import SparseConv2d, SparseLinear

RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_}
GELU_FUNCTIONS = {F.gelu}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


def _native_layer(node: fx.Node, graph_module: fx.GraphModule, calls: Counter):
    if node.op != "call_module" or calls[node.target] != 1:
        return None
    layer = graph_module.get_submodule(node.target)
    if isinstance(layer, (SparseConv2d, SparseLinear)) and layer.kernel == ops.NATIVE and layer.activation is None:
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


def _is_exact_gelu(node: fx.Node, graph_module: fx.GraphModule) -> bool:
    """GELU in its exact (erf) form, the one the kernels compute: nn.GELU() or F.gelu(x)."""
    if len(node.args) != 1:
        return False
    if node.op == "call_module":
        module = graph_module.get_submodule(node.target)
        return type(module) is nn.GELU and module.approximate == "none" and not node.kwargs
    if node.op == "call_method":
        return node.target == "gelu" and node.kwargs.get("approximate", "none") == "none"
    exact = node.kwargs.get("approximate", "none") == "none"
    return node.op == "call_function" and node.target in GELU_FUNCTIONS and exact


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


def fuse_epilogues_(
    model: nn.Module, keep: Collection[str] = (), run: Callable[[nn.Module], object] | None = None
) -> tuple[nn.Module, list[str]]:
    """(the model with ReLUs, GELUs and residual adds fused into its compiled-kernel layers, the fused layers'
    names); the modules named in ``keep`` stay called (their forward hooks fire). A model torch.fx cannot trace
    has its GELU modules fused by following ``run(model)`` (fuse_gelus_by_probe_) when ``run`` is given."""
    if not any(isinstance(m, (SparseConv2d, SparseLinear)) and m.kernel == ops.NATIVE for m in model.modules()):
        return model, []
    graph_module = accelerated_graph(model)
    if graph_module is None:
        return model, fuse_gelus_by_probe_(model, run, keep) if run is not None else []
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
            layer.activation = "relu"
        elif isinstance(layer, SparseLinear) and user is not None and _is_exact_gelu(user, graph_module):
            user.replace_all_uses_with(result)
            graph.erase_node(user)
            layer.activation = "gelu"
        if result is not node or layer.activation:
            fused.append(str(node.target))
    if not fused:
        return model, []
    graph.lint()
    graph_module.recompile()
    return graph_module, fused


class _FollowOutputs(TorchDispatchMode):
    """During one forward: the aten ops that read each followed tensor (a linear's output), and the ops each
    probed module's forward runs."""

    def __init__(self):
        super().__init__()
        self.followed: dict[int, str] = {}  # id(tensor) -> the linear that produced it
        self.alive: list[Tensor] = []  # the followed tensors, so that no id is reused during the forward
        self.readers: dict[str, list] = {}  # linear -> the ops that read its output
        self.capture: list | None = None  # the ops of the module running now (None: none probed)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        record = (func, args, kwargs)
        for t in pytree.tree_leaves((args, kwargs)):
            if isinstance(t, Tensor) and id(t) in self.followed:
                self.readers.setdefault(self.followed[id(t)], []).append(record)
        if self.capture is not None:
            self.capture.append(record)
        return func(*args, **kwargs)


def _runs_exact_gelu_of(ops_run: list, tensor: Tensor) -> bool:
    """The forward ran one aten op, the exact (erf) GELU of ``tensor``."""
    if len(ops_run) != 1:
        return False
    func, args, kwargs = ops_run[0]
    approximate = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
    return func is torch.ops.aten.gelu.default and args[0] is tensor and approximate == "none"


def fuse_gelus_by_probe_(model: nn.Module, run: Callable[[nn.Module], object], keep: Collection[str] = ()) -> list[str]:
    """GELU fused into the compiled-kernel linears of a model torch.fx cannot trace (transformers' models reach
    fxsparse through the module walk; BERT's intermediate: a linear, then a GELU module).

    One forward (``run(model)``) is followed: a parameterless module called once whose input is the output of a
    linear called once, read by nothing else, and whose forward runs the exact GELU of it alone (aten.gelu, no
    approximation) is replaced by nn.Identity, and the linear computes the GELU in its epilogue. The result must
    match the unfused model's (chain._close_outputs), else nothing is fused. Modules named in ``keep`` (forward
    hooks) stay. Returns the fused linears' names."""
    linears = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, SparseLinear) and m.kernel == ops.NATIVE and m.activation is None
    }
    if not linears:
        return []
    names = {id(m): n for n, m in model.named_modules()}
    candidates = {
        n: m
        for n, m in model.named_modules()
        if n
        and n not in keep
        and not isinstance(m, (SparseConv2d, SparseLinear))
        and next(iter(m.children()), None) is None
        and next(iter(m.parameters()), None) is None
    }
    probe, calls, inputs, captured = _FollowOutputs(), Counter(), {}, {}

    def linear_done(module, args, output):
        calls[names[id(module)]] += 1
        if isinstance(output, Tensor):
            probe.followed[id(output)] = names[id(module)]
            probe.alive.append(output)

    def candidate_starts(module, args):
        name = names[id(module)]
        calls[name] += 1
        if len(args) == 1 and isinstance(args[0], Tensor) and id(args[0]) in probe.followed:
            inputs[name] = (probe.followed[id(args[0])], args[0])
            probe.capture = captured.setdefault(name, [])

    def candidate_done(module, args, output):
        probe.capture = None

    handles = [m.register_forward_hook(linear_done) for m in linears.values()]
    for m in candidates.values():
        handles += [m.register_forward_pre_hook(candidate_starts), m.register_forward_hook(candidate_done)]
    ran, reference = probe_forward(model, run, probe, handles)
    if not ran:
        return []
    fused = {}  # linear -> the GELU module after it
    for name, (linear, tensor) in inputs.items():
        readers = probe.readers.get(linear, [])
        if (
            calls[name] == 1
            and calls[linear] == 1
            and len(readers) == 1
            and _runs_exact_gelu_of(captured.get(name, []), tensor)
            and readers[0] is captured[name][0]
        ):
            fused[linear] = name
    if not fused:
        return []
    replaced = {}
    for linear, name in fused.items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        replaced[name] = getattr(owner, child)
        setattr(owner, child, nn.Identity())
        linears[linear].activation = "gelu"
    try:
        with torch.no_grad():
            same = _close_outputs(run(model), reference)
    except Exception:  # noqa: BLE001 - an op that cannot take the fused layer's output: fuse nothing
        same = False
    if not same:
        for linear, name in fused.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, replaced[name])
            linears[linear].activation = None
        return []
    return list(fused)


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


__all__ = ["fuse_epilogues_", "fuse_gelus_by_probe_", "replace_max_pools_", "MaxPool2d"]
