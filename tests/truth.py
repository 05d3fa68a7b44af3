"""The truth at the aten level: what one forward of a model actually multiplies (test code, not library code).

``record(model, inputs)`` runs one forward under a TorchDispatchMode and lists every aten op that
multiplies (convolution, mm, addmm, bmm, baddbmm, addbmm, mv, addmv, dot, fused attention), in order of
execution, with its dense MACs from the shapes and, where one operand is a weight, that operand's shape,
exact zeros and the parameter it comes from; and the random ops drawn (dropout, DropPath). Nothing here
reads fxsparse's bookkeeping.

Which operand is the weight is decided by taint tracking, not by module types:
  * every tensor computed from a model input is an *activation*;
  * every other tensor computed from an ``nn.Parameter`` is *parameter-derived* (a weight);
  * the rest (buffers, arange, masks, ...) are *constants*.
An op with exactly one parameter-derived operand is a weight op (a sparsified weight, a weight-standardized
conv's standardized kernel and a transposed view of a linear weight all count: the operand is what the op
multiplies); activation-by-activation products (attention) are activation ops; the others are constant ops.
Taint lives on storages, so views share it and in-place writes merge into it.

Each weight operand is named by the parameter it is computed from: the parameter ids flow only from
inputs of the same numel as the output, and into a concatenation (cat, stack) from every input (elementwise
work, views and stacking keep the name; reductions such as a global threshold over all weights do not
spread it).

Mixture-of-experts stacks: an operand that is the e-th slice along dim 0 of a tensor of a 3-D parameter's
shape computed from that parameter alone (the parameter itself, or its effective value) is named
``<parameter>[e]``: expert e's matrix. ``torch._grouped_mm`` (and transformers' fallback op of the same
semantics) is recorded as one product per expert that received rows: rows_e * K * N with expert e's
(K, N) matrix as operand.

MACs (one multiply-add = 1):
  conv = N * C_out * (C_in / groups) * prod(kernel) * prod(out spatial)   (transposed: prod(in spatial))
  mm = M * K * N, bmm = B * M * K * N, mv = M * K, dot = K, grouped mm = rows of each group * K * N,
  fused attention = prod(q.shape[:-1]) * S * (E + Ev)   (q @ k^T and attn @ v).
The sparse MACs of a weight op are nonzeros(operand) * dense / numel(operand).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter, defaultdict
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten

# fused ops that would hide weight products from the recorder (they must not run; record() disables
# the nn.MultiheadAttention fast path, which is what produces the first two)
_OPAQUE = {
    "_native_multi_head_attention",
    "_transformer_encoder_layer_fwd",
    "lstm",
    "gru",
    "rnn_tanh",
    "rnn_relu",
    "mkldnn_rnn_layer",
    "_thnn_fused_lstm_cell",
    "_thnn_fused_gru_cell",
    "mkldnn_linear",
    "_int_mm",
    "_weight_int8pack_mm",
    "_weight_int4pack_mm",
    "linear",
    "matmul",
    "einsum",
}
# ops that draw random numbers: an eval forward of a model draws none (dropout and DropPath are off)
_RANDOM = {
    "bernoulli",
    "bernoulli_",
    "native_dropout",
    "rand",
    "rand_like",
    "randn",
    "randn_like",
    "randint",
    "randint_like",
    "randperm",
    "uniform_",
    "normal_",
    "normal",
    "exponential_",
    "multinomial",
    "geometric_",
    "cauchy_",
    "log_normal_",
    "random_",
}
_FUSED_ATTENTION = {
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
}


# ------------------------------------------------------------------------------------------------
# parameter names
# ------------------------------------------------------------------------------------------------
_PARAMETRIZED = re.compile(r"parametrizations\.([^.]+)\.original(\d*)$")
_EXPERT = re.compile(r"(.+)\[(\d+)\]")  # "<3-D parameter>[e]": expert e's matrix


def plain_name(fqn: str) -> str:
    """'a.parametrizations.weight.original' -> 'a.weight' (a torch parametrization's raw tensor, named
    as the attribute it parametrizes); 'original0'/'original1' keep their suffix ('a.weight.original1')."""
    return _PARAMETRIZED.sub(lambda m: m[1] + (f".original{m[2]}" if m[2] else ""), fqn)


def expert_of(name: str | None) -> tuple[str, int] | None:
    """(stack, e) for an expert's name ``<stack>[e]``, else None."""
    found = _EXPERT.fullmatch(name) if name else None
    return (found[1], int(found[2])) if found else None


class ParamNames:
    """Every parameter of a model, with all its names (a tied parameter has several)."""

    def __init__(self, model: nn.Module):
        self.params: list[nn.Parameter] = []
        self.aliases: list[list[str]] = []
        index_of: dict[int, int] = {}
        for fqn, param in model.named_parameters(remove_duplicate=False):
            i = index_of.get(id(param))
            if i is None:
                i = index_of[id(param)] = len(self.params)
                self.params.append(param)
                self.aliases.append([])
            if plain_name(fqn) not in self.aliases[i]:
                self.aliases[i].append(plain_name(fqn))
        self.index_of = index_of
        self._by_alias = {alias: i for i, names in enumerate(self.aliases) for alias in names}
        self._model = model

    def name(self, index: int) -> str:
        """The canonical name: the first one named_parameters gives."""
        return self.aliases[index][0]

    def parameter(self, name: str) -> nn.Parameter:
        """The parameter whose canonical name (or any alias) is ``name``; ``<name>[e]``: its expert e's slice."""
        expert = _EXPERT.fullmatch(name)
        if expert:
            return self.params[self._by_alias[expert[1]]][int(expert[2])]
        return self.params[self._by_alias[name]]

    def aliases_of(self, name: str) -> list[str]:
        """Every name of the parameter whose canonical name is ``name`` ([name] for an unknown one)."""
        index = self._by_alias.get(name)
        return list(self.aliases[index]) if index is not None else [name]

    def resolve(self, fqn: str, numel: int | None = None) -> str | None:
        """The canonical name of the parameter another tool calls ``fqn``: any alias, the plain or raw name
        of a parametrized tensor, or the only parameter of that numel on the module ``fqn`` names;
        ``<fqn>[e]``: expert e of that (3-D) parameter."""
        expert = _EXPERT.fullmatch(fqn)
        if expert:
            stack = self.resolve(expert[1])
            return f"{stack}[{expert[2]}]" if stack is not None else None
        fqn = plain_name(fqn)
        if fqn in self._by_alias:
            return self.name(self._by_alias[fqn])
        owner, _, _ = fqn.rpartition(".")
        try:
            module = self._model.get_submodule(owner)
        except AttributeError:
            return None
        candidates = {id(p): p for p in module.parameters(recurse=True) if numel is None or p.numel() == numel}
        own = [p for p in candidates.values() if id(p) in self.index_of]
        direct = [p for p in own if any(p is q for q in _direct_parameters(module))]
        for group in (direct, own):
            if len(group) == 1:
                return self.name(self.index_of[id(group[0])])
        return None


def _direct_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The module's own parameters, including a torch parametrization's raw tensors."""
    params = list(module.parameters(recurse=False))
    for plist in getattr(module, "parametrizations", {}).values():
        params += list(plist.parameters(recurse=False))
    return params


# ------------------------------------------------------------------------------------------------
# what was multiplied
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class MulOp:
    """One multiplying aten op of the forward."""

    index: int  # order of execution among the multiplying ops
    op: str  # "conv2d", "mm", "bmm", "mv", "dot", "sdpa", ...
    kind: str  # "weight", "activation" (activation x activation), "parameter" (weight x weight), "constant"
    dense_macs: int
    out_shape: tuple[int, ...]
    weight_shape: tuple[int, ...] | None = None  # the operand as multiplied (a linear's is W^T), without
    # broadcast dims: an expanded weight's elements count once
    numel: int = 0
    nonzeros: int = 0
    param: str | None = None  # canonical name of the parameter the weight operand is computed from
    weight: Tensor | None = None  # a copy of the operand, when record(keep_weights=True)
    times: str | None = None  # a weight op's other operand: "activation" (a layer's product) or "constant"

    @property
    def zeros(self) -> int:
        return self.numel - self.nonzeros

    @property
    def density(self) -> float:
        return self.nonzeros / self.numel if self.numel else 1.0

    @property
    def sparse_macs(self) -> int:
        if self.kind != "weight" or not self.numel:
            return self.dense_macs
        return self.nonzeros * self.dense_macs // self.numel


@dataclasses.dataclass
class WeightUse:
    """A parameter's weight ops summed (a weight used several times, e.g. tied, adds up)."""

    param: str
    calls: int
    dense_macs: int
    sparse_macs: int
    numel: int  # of the first use's operand
    nonzeros: int  # of the first use's operand
    densities: tuple[float, ...]  # of every use


@dataclasses.dataclass
class Truth:
    ops: list[MulOp]
    names: ParamNames
    output: Any
    opaque: list[str]  # fused ops seen that hide products from the recorder (a recorder gap: must be empty)
    random: Counter  # random ops drawn during the forward (dropout, DropPath, ...) -> count

    @property
    def weight_ops(self) -> list[MulOp]:
        return [o for o in self.ops if o.kind == "weight"]

    @property
    def layer_ops(self) -> list[MulOp]:
        """The layers' products: a parameter's weight ops that multiply an activation, leaving out its arithmetic
        with buffers alone (spectral_norm's power iteration); all weight ops of a parameter that never
        multiplies an activation (a conv on a positional encoding computed from constants)."""
        by_activation = {o.param for o in self.weight_ops if o.times == "activation"}
        return [o for o in self.weight_ops if o.times == "activation" or (o.param and o.param not in by_activation)]

    @property
    def weight_dense_macs(self) -> int:
        return sum(o.dense_macs for o in self.weight_ops)

    @property
    def weight_sparse_macs(self) -> int:
        return sum(o.sparse_macs for o in self.weight_ops)

    @property
    def other_macs(self) -> int:
        """MACs of every multiplying op that is not a weight op (attention, constants)."""
        return sum(o.dense_macs for o in self.ops if o.kind != "weight")

    def by_param(self) -> dict[str, WeightUse]:
        """Weight ops grouped by the parameter they come from ('?a+b' where that is ambiguous)."""
        groups: dict[str, list[MulOp]] = defaultdict(list)
        for op in self.weight_ops:
            groups[op.param or "?"].append(op)
        return {
            name: WeightUse(
                name,
                len(ops),
                sum(o.dense_macs for o in ops),
                sum(o.sparse_macs for o in ops),
                ops[0].numel,
                ops[0].nonzeros,
                tuple(o.density for o in ops),
            )
            for name, ops in groups.items()
        }

    def uses(self) -> Counter:
        """How many weight ops each parameter feeds (a tied weight used twice counts 2)."""
        return Counter(o.param for o in self.weight_ops)

    def tied(self) -> dict[str, list[str]]:
        """Parameters with several names (tied weights) -> their names."""
        return {names[0]: names for names in self.names.aliases if len(names) > 1}


# ------------------------------------------------------------------------------------------------
# MAC formulas (pure)
# ------------------------------------------------------------------------------------------------
def conv_dense_macs(x: tuple[int, ...], w: tuple[int, ...], out: tuple[int, ...], transposed: bool) -> int:
    """N * C_out * C_in/groups * prod(kernel) * prod(out spatial); transposed: every input position."""
    batched = len(x) == len(w)
    n = x[0] if batched else 1
    spatial = (x if transposed else out)[2 if batched else 1 :]
    return n * math.prod(w) * math.prod(spatial)  # w = (C_out, C_in/groups, *k) or (C_in, C_out/groups, *k)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _grouped_products(args) -> list[tuple[str, list[Tensor], int]]:
    """(S, K) @ (E, K, N) with cumulative row ends ``offs``: one product per expert that received rows."""
    x, w, offs = args[0], args[1], args[2]
    products, start = [], 0
    for expert, end in enumerate(offs.tolist()):
        if end > start:
            products.append(("grouped_mm", [x[start:end], w[expert]], (end - start) * w.shape[1] * w.shape[2]))
        start = end
    return products


def _products(func, args, out) -> list[tuple[str, list[Tensor], int]]:
    """(op name, the two multiplied operands, dense MACs) of each product of a multiplying aten op."""
    name = func.overloadpacket.__name__
    if name in ("_grouped_mm", "grouped_mm_fallback") and len(args) > 2 and isinstance(args[2], Tensor):
        if args[0].dim() == 2 and args[1].dim() == 3:
            return _grouped_products(args)
    found = _product(name, args, out)
    return [found] if found is not None else []


def _product(name: str, args, out) -> tuple[str, list[Tensor], int] | None:
    """(op name, the two multiplied operands, dense MACs) of a one-product aten op; None for the rest."""
    if name in ("mm", "addmm", "_addmm_activation"):
        a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
        return "mm", [a, b], a.shape[0] * a.shape[1] * b.shape[1]
    if name in ("bmm", "baddbmm", "addbmm"):
        a, b = (args[0], args[1]) if name == "bmm" else (args[1], args[2])
        return "bmm", [a, b], a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    if name in ("mv", "addmv"):
        a, b = (args[0], args[1]) if name == "mv" else (args[1], args[2])
        return "mv", [a, b], a.shape[0] * a.shape[1]
    if name in ("dot", "vdot"):
        return "dot", [args[0], args[1]], args[0].shape[0]
    if name in ("convolution", "_convolution"):
        x, w, transposed = args[0], args[1], bool(args[6])
        macs = conv_dense_macs(_shape(x), _shape(w), _shape(out), transposed)
        return ("conv_transpose" if transposed else "conv") + f"{w.dim() - 2}d", [x, w], macs
    if name in _FUSED_ATTENTION:
        q, k, v = args[0], args[1], args[2]
        return "sdpa", [q, k], math.prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    return None


# ------------------------------------------------------------------------------------------------
# the recorder
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Taint:
    act: bool = False  # computed from a model input
    param: bool = False  # computed from a parameter
    ids: frozenset = frozenset()  # indices of the parameters it is (elementwise) computed from
    base: tuple[int, int] | None = None  # (storage offset, dim-0 stride) of a 3-D parameter's value in it


_CONSTANT = _Taint()


def _storage_key(t: Tensor) -> int | None:
    try:
        key = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return key or None


def _distinct(t: Tensor) -> Tensor:
    """The operand without its broadcast dims (stride 0: an expanded weight, e.g. for a batched matmul),
    so that every weight element counts once."""
    index = tuple(0 if stride == 0 and size > 1 else slice(None) for size, stride in zip(t.shape, t.stride()))
    return t[index]


def _tensors(tree: Any) -> list[Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, Tensor)]


class _Recorder(TorchDispatchMode):
    def __init__(self, names: ParamNames, inputs: Any, keep_weights: bool):
        super().__init__()
        self.names = names
        self.keep_weights = keep_weights
        self.ops: list[MulOp] = []
        self.opaque: list[str] = []
        self.random: Counter = Counter()
        self.table: dict[int, _Taint] = {}
        for i, param in enumerate(names.params):
            key = _storage_key(param)
            if key is not None:
                self.table[key] = _Taint(param=True, ids=frozenset([i]), base=self._base(param, frozenset([i])))
        for t in _tensors(inputs):
            key = _storage_key(t)
            if key is not None:
                self.table[key] = _Taint(act=True)

    def taint(self, t: Tensor) -> _Taint:
        key = _storage_key(t)
        return self.table.get(key, _CONSTANT) if key is not None else _CONSTANT

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _tensors((args, kwargs))
        taints = [self.taint(t) for t in inputs]
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _OPAQUE:
            self.opaque.append(name)
        if name in _RANDOM:
            self.random[name] += 1
        for found in _products(func, args, out):
            self._record(found, out)
        self._propagate(func, args, kwargs, inputs, taints, out)
        return out

    def _base(self, t: Tensor, ids: frozenset) -> tuple[int, int] | None:
        """Where a 3-D parameter's value lies in ``t``'s storage, when ``t`` is that value (one id, its shape)."""
        if len(ids) != 1:
            return None
        param = self.names.params[next(iter(ids))]
        return (t.storage_offset(), t.stride(0)) if param.dim() == 3 and t.shape == param.shape else None

    def _expert(self, weight: Tensor, ids: list[int]) -> int | None:
        """e when ``weight`` is the e-th dim-0 slice of a 3-D parameter's value (an expert's matrix)."""
        base = self.taint(weight).base
        if len(ids) != 1 or base is None:
            return None
        param = self.names.params[ids[0]]
        if weight.numel() * param.shape[0] != param.numel():
            return None
        offset, stride = base
        return (weight.storage_offset() - offset) // stride

    def _role(self, t: Tensor) -> str:
        taint = self.taint(t)
        return "activation" if taint.act else "weight" if taint.param else "constant"

    def _record(self, found: tuple[str, list[Tensor], int], out: Any) -> None:
        op, operands, dense = found
        out = out[0] if isinstance(out, (tuple, list)) else out
        roles = [self._role(t) for t in operands]
        index = len(self.ops)
        if op == "sdpa" or roles.count("weight") != 1:
            kind = "parameter" if roles.count("weight") == 2 else "activation" if "activation" in roles else "constant"
            self.ops.append(MulOp(index, op, "activation" if op == "sdpa" else kind, dense, _shape(out)))
            return
        weight = _distinct(operands[roles.index("weight")])
        other = roles[1 - roles.index("weight")]
        ids = sorted(self.taint(weight).ids)
        param = "+".join(self.names.name(i) for i in ids) if ids else None
        if len(ids) > 1:
            param = "?" + param
        expert = self._expert(weight, ids)
        if expert is not None:
            param = f"{param}[{expert}]"
        self.ops.append(
            MulOp(
                index,
                op,
                "weight",
                dense,
                _shape(out),
                _shape(weight),
                weight.numel(),
                int(torch.count_nonzero(weight)),
                param,
                weight.detach().clone() if self.keep_weights else None,
                other,
            )
        )

    def _propagate(self, func, args, kwargs, inputs: list[Tensor], taints: list[_Taint], out: Any) -> None:
        """Outputs (and arguments written in place) take the union of the inputs' taints; storages an
        input already had (views, in-place writes) keep their own taint too; parameter ids flow only
        from inputs of the output's numel."""
        act = any(t.act for t in taints)
        param = any(t.param for t in taints)
        concatenation = func.overloadpacket.__name__ in ("cat", "stack")
        input_keys = {_storage_key(t) for t in inputs}
        written = list(_tensors(out))
        for i, argument in enumerate(func._schema.arguments):
            alias = argument.alias_info
            if alias is not None and alias.is_write:
                value = args[i] if i < len(args) else kwargs.get(argument.name)
                written += _tensors(value)
        for t in written:
            key = _storage_key(t)
            if key is None:
                continue
            ids = frozenset().union(
                *(taint.ids for x, taint in zip(inputs, taints) if concatenation or x.numel() == t.numel())
            )
            new = _Taint(act, param, ids, self._base(t, ids))
            if key in input_keys:
                old = self.table.get(key, _CONSTANT)
                new = _Taint(old.act or act, old.param or param, old.ids | ids, old.base or new.base)
            self.table[key] = new


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, Tensor):
        return model(inputs)
    return model(*inputs)


def record(model: nn.Module, inputs: Any, keep_weights: bool = False) -> Truth:
    """One forward of ``model`` on ``inputs`` (a tensor, a tuple of positional inputs or a dict of keyword
    inputs) in its current train/eval mode, without grad, with every multiplying op recorded.

    nn.MultiheadAttention's fused fast path is switched off for the forward (same maths, but one fused
    op would hide the projections)."""
    names = ParamNames(model)
    recorder = _Recorder(names, inputs, keep_weights)
    mha = getattr(torch.backends, "mha", None)
    fast_path = mha.get_fastpath_enabled() if mha is not None else None
    try:
        if mha is not None:
            mha.set_fastpath_enabled(False)
        with torch.no_grad(), recorder:
            output = _call(model, inputs)
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fast_path)
    return Truth(recorder.ops, names, output, sorted(set(recorder.opaque)), recorder.random)


def layer_operands(model: nn.Module, inputs: Any) -> list[Tensor]:
    """The weight operand of every layer product (a weight times an activation) of one forward, in order."""
    return [op.weight for op in record(model, inputs, keep_weights=True).layer_ops]


def zero_fraction(tensors: list[Tensor]) -> float:
    """Exact zeros over all elements of ``tensors``."""
    return sum(int((t == 0).sum()) for t in tensors) / sum(t.numel() for t in tensors)
