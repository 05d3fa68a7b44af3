"""Model -> torch.fx GraphModule that keeps the whole model and its train/eval behaviour.

* Leaves: timm's "do not trace" registry, the ``extra_leaf_types`` and modules that carry torch
  parametrizations (tracing them would freeze the parametrized value into a constant) stay opaque
  (call_module nodes).
* train/eval: while tracing, every module's ``training`` flag is replaced by a stand-in. Passed as an
  argument (``F.dropout(x, p, training=self.training)``) it becomes a graph node that reads the owning
  module's flag at run time. Used in Python control flow (``if self.training``, ``not training`` in timm's
  drop_path) it stops the trace, which is retried with that module's class as a leaf, so the branch runs
  eagerly, in the mode of the moment. A model whose root branches on its own flag (torchvision's
  GoogLeNet and Inception3 aux heads) is reported untraceable, and the caller walks its modules instead.
  The real flags are restored whatever happens.
* Weight transforms hidden in leaves: a registry leaf that is, or holds, a conv/linear layer whose op
  does not multiply its stored weight (timm's NormFreeBlock around ScaledStdConv2d, StdConv2dSame) is
  traced through where possible, so that the graph shows the transform and the pass can sparsify the
  weight the op multiplies. A helper that fails on symbolic values inside such a leaf's forward (timm's
  pad_same) is kept as one opaque call (torch.fx autowrap); a leaf that still cannot be traced stays a leaf.
* `TracedModule` keeps every parameter, buffer, submodule and public attribute of the model, and its
  class's methods.
"""

from __future__ import annotations

import copy
import dataclasses
import traceback
from collections.abc import Callable
from typing import Any

import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from .kernel_layer import KernelLayer
from .layers import layer_types_outside_torch
from .op_weight import has_torch_forward, multiplies_stored_weight

ROLE = "fxsparse.role"  # node.meta key naming what fxsparse inserted a node for
TRAINING_FLAG = "training-flag"  # role of a node that reads a module's train/eval flag at run time
SOURCE_CLASS = "_fxsparse_source_class"  # TracedModule attribute: the class of the traced model
METHODS_UNAVAILABLE = "_fxsparse_methods_unavailable"  # TracedModule attribute: why its original methods raise
_MAX_ATTEMPTS = 64  # traces per model: each retry makes one more class a leaf or traced through


def _timm_leaves() -> tuple[tuple[type, ...], tuple]:
    """timm's registry of modules and functions that symbolic tracing must not enter (empty without timm)."""
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:
        try:  # older timm (1.0.3) keeps the registry with its feature extractor
            from timm.models._features_fx import get_notrace_functions, get_notrace_modules
        except Exception:  # timm missing: plain torch.fx rules
            return (), ()
    except Exception:  # timm present but broken: plain torch.fx rules
        return (), ()
    return tuple(get_notrace_modules()), tuple(get_notrace_functions())


# ------------------------------------------------------------------------------------------------
# the train/eval flag while tracing
# ------------------------------------------------------------------------------------------------
class _BranchOnTraining(Exception):
    """Python control flow on a module's training flag (raised by the stand-in)."""

    def __init__(self, owner: nn.Module, fqn: str):
        super().__init__(f"the forward branches on the training flag of {fqn or 'the root module'}")
        self.owner = owner


class _TrainingFlag:
    """Stand-in for ``module.training`` during tracing (see the module docstring)."""

    def __init__(self, tracer: LeafAwareTracer, owner: nn.Module, fqn: str):
        self.tracer, self.owner, self.fqn = tracer, owner, fqn

    def _branch(self, *args: Any) -> Any:
        self.tracer.branched.append((self.owner, self.fqn))  # seen even if the model swallows the exception
        raise _BranchOnTraining(self.owner, self.fqn)

    __bool__ = __int__ = __index__ = __float__ = __eq__ = __ne__ = _branch
    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"<training flag of {self.fqn or 'the root module'}, traced>"


class LeafAwareTracer(fx.Tracer):
    """torch.fx tracer with timm's notrace modules (and any extra classes) as leaves, and live training flags."""

    def __init__(
        self,
        extra_leaf_types: tuple[type, ...] = (),
        traced_through: frozenset = frozenset(),
        opaque_helpers: tuple[Callable, ...] = (),
    ):
        registry_modules, registry_functions = _timm_leaves()
        super().__init__(autowrap_functions=registry_functions + tuple(opaque_helpers))
        self.registry_types = registry_modules
        self.leaf_types = layer_types_outside_torch() + (KernelLayer,) + tuple(extra_leaf_types)
        self.traced_through = traced_through
        self.branched: list[tuple[nn.Module, str]] = []
        self._flag_nodes: dict[int, fx.Node] = {}

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if isinstance(module, self.leaf_types) or parametrize.is_parametrized(module):
            return True
        if isinstance(module, self.registry_types) and type(module) not in self.traced_through:
            return True
        return super().is_leaf_module(module, qualified_name)

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, _TrainingFlag):
            return self._flag_node(a)
        return super().create_arg(a)

    def _flag_node(self, flag: _TrainingFlag) -> fx.Node:
        """A node reading ``flag.owner.training`` when the graph runs (one per module and trace)."""
        node = self._flag_nodes.get(id(flag.owner))
        if node is None:
            if flag.fqn:
                owner = self.create_node("get_attr", flag.fqn, (), {})
                node = self.create_node("call_function", getattr, (owner, "training"), {})
                owner.meta[ROLE] = TRAINING_FLAG
            else:
                node = self.create_node("get_attr", "training", (), {})
            node.meta[ROLE] = TRAINING_FLAG
            self._flag_nodes[id(flag.owner)] = node
        return node


# ------------------------------------------------------------------------------------------------
# a GraphModule that keeps the whole model
# ------------------------------------------------------------------------------------------------
class TracedModule(fx.GraphModule):
    """A GraphModule that keeps the whole model it was traced from.

    torch.fx keeps only what the graph reads and turns containers into plain Modules. Here every
    submodule (the model's own objects, containers included), parameter, buffer and public attribute of
    the model stays, so the state_dict has the model's keys and loads strictly into the original
    architecture. The original class's methods that GraphModule lacks (timm's ``forward_features``,
    ``get_classifier``, ``reset_classifier``, ...) are bound to it; they run the modules directly, not
    the graph. Both survive ``copy.deepcopy`` (fold, EMA copies).
    """

    def __init__(self, root: nn.Module, graph: fx.Graph, class_name: str = "GraphModule"):
        super().__init__(root, graph, class_name)
        _keep_whole_model_(self, vars(root), type(root))

    def __deepcopy__(self, memo: dict) -> TracedModule:
        copied = super().__deepcopy__(memo)
        # GraphModule rebuilt the copy from its graph alone; the same memo returns the copies it made
        state = copy.deepcopy(self.__dict__, memo)
        _keep_whole_model_(copied, state, state.get(SOURCE_CLASS))
        return copied


def _keep_whole_model_(gm: fx.GraphModule, state: dict, source_class: type | None) -> None:
    """Put back into ``gm`` what the traced module had (``state`` is its ``__dict__``), in its order."""
    for key in ("_parameters", "_buffers", "_modules"):
        kept, own = state.get(key, {}), getattr(gm, key)
        extra = {name: value for name, value in own.items() if name not in kept}
        own.clear()
        own.update(kept)
        own.update(extra)
        if key == "_buffers":  # tensors torch.fx made buffers (tracer constants): not in the model's state_dict
            gm._non_persistent_buffers_set.update(extra)
    gm._non_persistent_buffers_set.update(state.get("_non_persistent_buffers_set", ()))
    for name, value in state.items():  # timm's pretrained_cfg, num_classes, feature_info, ...
        if not name.startswith("_") and name != "training" and not hasattr(gm, name):
            setattr(gm, name, value)
    for name in (SOURCE_CLASS, METHODS_UNAVAILABLE):
        if name in state:
            gm.__dict__[name] = state[name]
    gm.__dict__.setdefault(SOURCE_CLASS, source_class)
    bind_original_methods_(gm)


def bind_original_methods_(gm: fx.GraphModule, unavailable: str | None = None) -> None:
    """Give ``gm``'s own class (torch.fx makes one per instance) the traced class's methods and properties
    that GraphModule lacks; with ``unavailable`` (why), each of them raises instead."""
    if unavailable is not None:
        gm.__dict__[METHODS_UNAVAILABLE] = unavailable
    reason = gm.__dict__.get(METHODS_UNAVAILABLE)
    source = gm.__dict__.get(SOURCE_CLASS)
    if source is None:
        return
    for cls in reversed(source.__mro__):  # bases first: a subclass's definition wins
        if issubclass(fx.GraphModule, cls):  # nn.Module, object, GraphModule itself
            continue
        for name, value in vars(cls).items():
            if name.startswith("__") or hasattr(TracedModule, name) or _instance_has(gm, name):
                continue
            if reason is not None and (callable(value) or isinstance(value, (property, staticmethod, classmethod))):
                value = _unavailable(name, reason, as_property=isinstance(value, property))
            setattr(type(gm), name, value)


def _instance_has(gm: nn.Module, name: str) -> bool:
    """A class attribute would shadow a submodule, parameter or buffer (nn.Module keeps them off __dict__)."""
    return name in gm.__dict__ or name in gm._modules or name in gm._parameters or name in gm._buffers


def _unavailable(name: str, reason: str, as_property: bool) -> Any:
    def refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{name} is not available on this model: {reason}")

    return property(refuse) if as_property else refuse


# ------------------------------------------------------------------------------------------------
# tracing, with retries
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TraceResult:
    graph_module: TracedModule | None
    error: str | None = None  # why tracing failed, when it did
    training_leaves: list[type] = dataclasses.field(default_factory=list)  # leaves: branch on their mode
    traced_through: list[type] = dataclasses.field(default_factory=list)  # registry leaves traced through
    opaque_helpers: list[Callable] = dataclasses.field(default_factory=list)  # autowrapped for those


@dataclasses.dataclass
class _Attempt:
    graph_module: TracedModule | None = None
    branch: tuple[nn.Module, str] | None = None
    exception: BaseException | None = None


def _attempt(model: nn.Module, tracer: LeafAwareTracer) -> _Attempt:
    """One trace with stand-in training flags, the real flags restored afterwards."""
    saved = []
    for fqn, module in model.named_modules():
        if "training" in vars(module):
            saved.append((module, vars(module)["training"]))
            vars(module)["training"] = _TrainingFlag(tracer, module, fqn)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # torch.fx raises many types (TraceError, TypeError, RuntimeError, ...)
        return _Attempt(branch=tracer.branched[0]) if tracer.branched else _Attempt(exception=exc)
    finally:
        for module, flag in saved:
            vars(module)["training"] = flag
    if tracer.branched:  # the model caught the stand-in's exception itself
        return _Attempt(branch=tracer.branched[0])
    return _Attempt(graph_module=TracedModule(tracer.root, graph, type(model).__name__))


def _hidden_weight_transforms(gm: fx.GraphModule, tracer: LeafAwareTracer, verdicts: dict) -> set[type]:
    """Classes of registry leaves in the graph that are, or hold, a conv/linear layer whose op does not
    multiply its stored weight (to trace through)."""
    found = set()
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        leaf = gm.get_submodule(node.target)
        if not isinstance(leaf, tracer.registry_types) or isinstance(leaf, tracer.leaf_types):
            continue
        for layer in leaf.modules():
            if isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)) and not has_torch_forward(layer):
                if id(layer) not in verdicts:
                    verdicts[id(layer)] = multiplies_stored_weight(layer).stored
                if verdicts[id(layer)] is not True:
                    found.add(type(leaf))
                    break
    return found


def _failing_frame(exc: BaseException, classes: set[type]) -> tuple[type | None, Callable | None]:
    """(the class among ``classes`` whose forward the error went through, innermost; the module-level
    function that forward called when it failed, if any)."""
    codes = {getattr(cls.forward, "__code__", None): cls for cls in classes}
    frames = [frame for frame, _ in traceback.walk_tb(exc.__traceback__)]
    for index in range(len(frames) - 1, -1, -1):
        cls = codes.get(frames[index].f_code)
        if cls is None:
            continue
        if index + 1 < len(frames):
            callee = frames[index + 1].f_code
            for name, value in frames[index].f_globals.items():
                if not name.startswith("_") and getattr(value, "__code__", None) is callee:
                    return cls, value
        return cls, None
    return None, None


def trace(model: nn.Module, extra_leaf_types: tuple[type, ...] = ()) -> TraceResult:
    """Symbolically trace ``model``; never raises for an untraceable model (see ``TraceResult.error``).

    The GraphModule shares submodules and parameters with ``model`` by reference (torch.fx semantics):
    copy the model first if it must stay untouched.
    """
    training_leaves: list[type] = []
    through: set[type] = set()
    untraceable: set[type] = set()
    helpers: list[Callable] = []
    verdicts: dict = {}
    good: TraceResult | None = None
    for _ in range(_MAX_ATTEMPTS):
        tracer = LeafAwareTracer(tuple(extra_leaf_types) + tuple(training_leaves), frozenset(through), tuple(helpers))
        attempt = _attempt(model, tracer)
        if attempt.branch is not None:
            owner, fqn = attempt.branch
            if owner is model:
                error = (
                    f"the forward of {type(model).__name__} itself branches on self.training (Python control "
                    "flow), which one graph cannot follow in both modes"
                )
                return TraceResult(None, error, training_leaves)
            training_leaves.append(type(owner))
            through.discard(type(owner))
            continue
        if attempt.exception is not None:
            exc = attempt.exception
            failing, helper = _failing_frame(exc, through)
            if helper is not None and helper not in helpers:
                helpers.append(helper)
            elif failing is not None:
                through.discard(failing)
                untraceable.add(failing)
            elif good is not None:
                return good
            else:
                return TraceResult(None, f"{type(exc).__name__}: {exc}", training_leaves)
            continue
        gm = attempt.graph_module
        good = TraceResult(gm, None, list(training_leaves), sorted(through, key=lambda c: c.__name__), list(helpers))
        more = _hidden_weight_transforms(gm, tracer, verdicts) - through - untraceable
        if not more:
            return good
        through |= more
    if good is not None:
        return good
    return TraceResult(None, f"tracing did not settle after {_MAX_ATTEMPTS} attempts", training_leaves)
