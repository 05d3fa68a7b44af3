"""Per-layer dense and sparse MACs of a model, from its torch.fx graph with real shapes (docs/METHODS.md sec. 4).

Conventions (the papers'; printed with every report):
  * one multiply-add = 1 MAC; FLOPs = 2 x MACs; counted for the whole ``example_input`` (batch included).
  * weight layers (the layers of fxsparse.layers: conv, transposed conv, linear, transformers' Conv1D;
    functional F.conv*/F.linear):
        conv   = N * C_out * (C_in / groups) * kh * kw * H_out * W_out     (transposed: H_in * W_in)
        linear = rows * in * out                                       (rows = every leading dim)
    sparse MACs = density x dense MACs per layer, density = nonzeros / numel of the weight the layer
    multiplies with (for a sparsified model: the effective weight, i.e. the actual zeros). Exact in
    integers: sparse = nonzeros * (dense / numel).
  * mixture-of-experts stacks (fxsparse.layers: transformers' experts modules): one row per expert that
    received tokens, ``<stack>[<expert>]``, counted as a linear layer on the tokens routed to it in this
    forward:  dense = tokens_e * out * in, sparse = tokens_e * nonzeros of expert e's matrix. The routing
    is read from the experts module's own arguments (its integer top-k expert indices), so every
    implementation (eager loop, grouped_mm, batched_mm) gives the same rows. An expert stack fxsparse does
    not know is counted where it is multiplied (mm on a slice, _grouped_mm: the rows it processes), as it is.
  * activation-by-activation matmuls (attention: q @ k^T, attn @ v, scaled_dot_product_attention, bmm,
    einsum) are rows of their own, density 1, so transformer totals are complete.
  * not counted: norms, activations, pooling, residual adds, biases, softmax.

How: the graph (``fxsparse.trace``, or the model's own graph when it is a GraphModule, e.g. a
sparsified one) runs in a torch.fx Interpreter with ``example_input``, so every node sees real shapes.
Weight-layer modules are measured by forward hooks, wherever they sit (as graph nodes or inside opaque
leaf modules); F.conv*/F.linear graph nodes from their arguments, named by the parameter they read.
Everything else that multiplies (attention inside graph nodes or inside opaque leaves) is caught at
the aten level (mm, addmm, bmm, baddbmm, convolution, fused attention) by a TorchDispatchMode, the same
op set torch.utils.flop_counter counts. Each graph node gets its share in ``node.meta["fxsparse.macs"]``.
A model torch.fx cannot trace runs eagerly under the same hooks and dispatch mode (nothing is lost but
the node.meta annotations).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode

from .atomic import atomic_write
from .fqn import join
from .kernel_layer import KernelLayer
from .layers import expert_matrices, expert_stacks, is_linear, weight_layout
from .op_weight import has_torch_forward
from .pool import THRESHOLD_NAME, distribution_record, is_sparsified, refresh_threshold_

META_KEY = "fxsparse.macs"

CONVENTION = (
    "MACs: one multiply-add = 1, FLOPs = 2 x MACs, for one forward of the example input (batch included).\n"
    "Weight layers (conv, linear): conv = N*C_out*C_in/groups*kh*kw*H_out*W_out, linear = rows*in*out;\n"
    "MoE experts: one row per expert, linear on the tokens routed to it (rows = tokens of this forward);\n"
    "sparse = density x dense per layer, density measured from the zeros of the weight actually used.\n"
    "Activation-by-activation matmuls (attention) are listed separately at density 1.\n"
    "Not counted: norms, activations, pooling, residual adds, biases, softmax."
)

_aten = torch.ops.aten
_SDPA_OPS = tuple(
    getattr(_aten, name)
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(_aten, name)
)

# graph-level weight functions: target -> (op name, transposed conv?)
_WEIGHT_FUNCTIONS = {
    F.conv1d: ("conv1d", False),
    F.conv2d: ("conv2d", False),
    F.conv3d: ("conv3d", False),
    F.conv_transpose1d: ("conv_transpose1d", True),
    F.conv_transpose2d: ("conv_transpose2d", True),
    F.conv_transpose3d: ("conv_transpose3d", True),
    F.linear: ("linear", False),
}


@dataclasses.dataclass
class LayerMacs:
    """One report row: a weight (keyed by its fqn) or an activation matmul (keyed by module:op)."""

    name: str  # "layer1.0.conv1.weight", or "blocks.0.attn:sdpa" for an activation matmul
    op: str  # "conv2d", "linear", "mm", "bmm", "sdpa", ...
    kind: str  # "weight" or "activation"
    weight_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...]
    density: float  # nonzeros / numel of the weight; 1.0 for activation matmuls
    dense_macs: int
    sparse_macs: int
    calls: int = 1  # a weight applied several times (or several matmuls of one module) adds up here

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["weight_shape"] = list(self.weight_shape) if self.weight_shape is not None else None
        out["output_shape"] = list(self.output_shape)
        return out


def _fmt_int(value: int) -> str:
    return f"{value:,}"


@dataclasses.dataclass
class FlopReport:
    """Per-layer MACs of one forward of ``input_shapes``; FLOPs = 2 x MACs."""

    rows: list[LayerMacs]
    input_shapes: list[tuple[int, ...]]
    traced: bool  # False: the model ran eagerly (torch.fx could not trace it), no node.meta written
    notes: list[str] = dataclasses.field(default_factory=list)
    distribution: dict[str, Any] | None = None  # a sparsified model's fxsparse.pool.distribution_record

    # --- totals ---------------------------------------------------------------------------------
    @property
    def weight_rows(self) -> list[LayerMacs]:
        return [r for r in self.rows if r.kind == "weight"]

    @property
    def activation_rows(self) -> list[LayerMacs]:
        return [r for r in self.rows if r.kind == "activation"]

    @property
    def weight_dense_macs(self) -> int:
        return sum(r.dense_macs for r in self.weight_rows)

    @property
    def weight_sparse_macs(self) -> int:
        return sum(r.sparse_macs for r in self.weight_rows)

    @property
    def activation_macs(self) -> int:
        return sum(r.dense_macs for r in self.activation_rows)

    @property
    def dense_macs(self) -> int:
        return self.weight_dense_macs + self.activation_macs

    @property
    def sparse_macs(self) -> int:
        return self.weight_sparse_macs + self.activation_macs

    @property
    def dense_flops(self) -> int:
        return 2 * self.dense_macs

    @property
    def sparse_flops(self) -> int:
        return 2 * self.sparse_macs

    def row(self, name: str) -> LayerMacs:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(
            f"no row {name!r} in this report; rows are keyed by weight fqn, e.g. {self.rows[0].name!r}"
            if self.rows
            else f"no row {name!r}: the report is empty"
        )

    def totals(self) -> dict[str, int]:
        return {
            "weight_dense_macs": self.weight_dense_macs,
            "weight_sparse_macs": self.weight_sparse_macs,
            "activation_macs": self.activation_macs,
            "dense_macs": self.dense_macs,
            "sparse_macs": self.sparse_macs,
            "dense_flops": self.dense_flops,
            "sparse_flops": self.sparse_flops,
        }

    # --- output ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "convention": CONVENTION,
            "input_shapes": [list(s) for s in self.input_shapes],
            "traced": self.traced,
            "notes": list(self.notes),
            "rows": [r.to_dict() for r in self.rows],
            "totals": self.totals(),
        } | ({"distribution": self.distribution} if self.distribution is not None else {})

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self, tablefmt: str = "simple") -> str:
        """The per-layer table (weights, then activation matmuls), totals and the convention lines."""
        from tabulate import tabulate

        headers = ["layer", "op", "weight shape", "output shape", "density", "dense MACs", "sparse MACs"]

        def line(r: LayerMacs) -> list[Any]:
            shape = "x".join(map(str, r.weight_shape)) if r.weight_shape is not None else "-"
            calls = f" (x{r.calls})" if r.calls > 1 else ""
            return [
                r.name + calls,
                r.op,
                shape,
                "x".join(map(str, r.output_shape)),
                f"{r.density:.4f}",
                _fmt_int(r.dense_macs),
                _fmt_int(r.sparse_macs),
            ]

        def rows_table(rows: list[LayerMacs]) -> str:
            return tabulate(
                [line(r) for r in rows],
                headers,
                tablefmt=tablefmt,
                disable_numparse=True,
                colalign=("left", "left", "left", "left", "right", "right", "right"),
            )

        parts = [rows_table(self.weight_rows)]
        if self.activation_rows:
            parts.append("activation-by-activation matmuls (attention), density 1:")
            parts.append(rows_table(self.activation_rows))
        dense, sparse = self.dense_macs, self.sparse_macs
        weight_density = self.weight_sparse_macs / self.weight_dense_macs if self.weight_dense_macs else 1.0
        totals = [
            [
                "weight layers",
                _fmt_int(self.weight_dense_macs),
                _fmt_int(self.weight_sparse_macs),
                f"{weight_density:.4f}",
            ],
            ["activation matmuls", _fmt_int(self.activation_macs), _fmt_int(self.activation_macs), "1.0000"],
            ["total MACs", _fmt_int(dense), _fmt_int(sparse), f"{sparse / dense if dense else 1.0:.4f}"],
            ["total FLOPs (2 x MACs)", _fmt_int(2 * dense), _fmt_int(2 * sparse), ""],
        ]
        parts.append(
            tabulate(
                totals,
                ["totals", "dense", "sparse", "sparse/dense"],
                tablefmt=tablefmt,
                disable_numparse=True,
                colalign=("left", "right", "right", "right"),
            )
        )
        shapes = ", ".join("x".join(map(str, s)) for s in self.input_shapes)
        parts.append(f"input: {shapes}\n{CONVENTION}")
        if self.distribution is not None:  # distribution: the per-layer targets are in to_dict()
            caps = {k: v for k, v in self.distribution.items() if k.endswith("_layer_sparsity") or k == "patterns"}
            parts.append(f"distribution: {self.distribution['name']}" + (f" {caps}" if caps else ""))
        parts += [f"note: {n}" for n in self.notes]
        return "\n\n".join(parts)

    def __str__(self) -> str:
        return self.table()

    def plot(self, path: str) -> None:
        """Save a PNG of per-layer density and dense/sparse MACs of the weight layers (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise ImportError(
                "FlopReport.plot needs matplotlib: pip install matplotlib (or pip install 'fxsparse[plot]')"
            ) from exc
        rows = self.weight_rows
        index = list(range(len(rows)))
        fig, (ax_density, ax_macs) = plt.subplots(2, 1, figsize=(max(8.0, 0.12 * len(rows) + 4), 7), sharex=True)
        ax_density.bar(index, [r.density for r in rows], color="tab:blue")
        ax_density.set_ylabel("density")
        ax_density.set_ylim(0, 1.05)
        ax_density.set_title(
            f"dense {self.dense_macs / 1e6:,.1f} M MACs -> sparse {self.sparse_macs / 1e6:,.1f} M MACs"
        )
        ax_macs.bar(index, [r.dense_macs / 1e6 for r in rows], color="lightgray", label="dense")
        ax_macs.bar(index, [r.sparse_macs / 1e6 for r in rows], color="tab:orange", label="sparse")
        ax_macs.set_ylabel("M MACs")
        ax_macs.legend()
        ax_macs.set_xticks(index)
        ax_macs.set_xticklabels([r.name for r in rows], rotation=90, fontsize=5)
        fig.tight_layout()
        suffix = os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
        try:  # through a temporary file: an error never leaves half a figure over an existing one
            atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=150, format=suffix))
        finally:
            plt.close(fig)


# ------------------------------------------------------------------------------------------------
# MAC formulas (pure)
# ------------------------------------------------------------------------------------------------
def conv_macs(x_shape: Sequence[int], weight: Sequence[int], out_shape: Sequence[int], transposed: bool) -> int:
    """N * numel(weight) * output positions (transposed: input positions); unbatched input means N = 1."""
    batched = len(x_shape) == len(weight)
    spatial = (x_shape if transposed else out_shape)[2 if batched else 1 :]
    return (x_shape[0] if batched else 1) * math.prod(weight) * math.prod(spatial)


def linear_macs(x_shape: Sequence[int], weight: Sequence[int]) -> int:
    """rows * in * out: every leading dim of the input is a row."""
    in_features = weight[-1]
    rows = math.prod(x_shape) // in_features if in_features else 0
    return rows * math.prod(weight)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _aten_macs(func, args, out) -> tuple[str, int, tuple[Tensor, ...]] | None:
    """(op, MACs, operands that may be weights) for the aten ops that multiply; None for the rest."""
    packet = func.overloadpacket
    if packet is _aten.mm:
        a, b = args[0], args[1]
        return "mm", a.shape[0] * a.shape[1] * b.shape[1], (a, b)
    if packet is _aten.addmm:
        a, b = args[1], args[2]
        return "mm", a.shape[0] * a.shape[1] * b.shape[1], (a, b)
    if packet is _aten.bmm:
        a, b = args[0], args[1]
        return "bmm", a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2], (a, b)
    if packet is _aten.baddbmm:
        a, b = args[1], args[2]
        return "bmm", a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2], (a, b)
    if packet is _aten.convolution or packet is _aten._convolution:
        x, w, transposed = args[0], args[1], bool(args[6])
        return f"conv{w.dim() - 2}d", conv_macs(_shape(x), _shape(w), _shape(out), transposed), (w,)
    if _is_grouped_mm(func) and len(args) > 2 and isinstance(args[2], Tensor) and args[1].dim() == 3:
        x, w, offs = args[0], args[1], args[2]  # (S, K) @ (E, K, N), rows [offs[e-1], offs[e]) by expert e
        rows = int(offs[-1]) if offs.numel() else 0
        return "grouped_mm", rows * w.shape[1] * w.shape[2], (w,)
    if packet in _SDPA_OPS:
        q, k, v = args[0], args[1], args[2]
        return "sdpa", math.prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1]), ()
    return None


def _is_grouped_mm(func) -> bool:
    """torch._grouped_mm, or transformers' fallback op with its semantics (torch < 2.9, or CPU alignment)."""
    return func.overloadpacket.__name__ in ("_grouped_mm", "grouped_mm_fallback")


def _routed_tokens(module: nn.Module, args: tuple, kwargs: dict) -> list[int] | None:
    """Tokens routed to each expert of an experts module in this call, from its integer (tokens, top_k)
    expert indices (an index >= num_experts is an expert-parallel sentinel: no expert); None if absent."""
    count = module.num_experts
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor) and not value.is_floating_point() and value.dtype != torch.bool:
            index = value.reshape(-1).long()
            index = index[(index >= 0) & (index < count)]
            return [int(n) for n in torch.bincount(index, minlength=count)]
    return None


# ------------------------------------------------------------------------------------------------
# the audit: hooks + interpreter + dispatch mode, writing rows
# ------------------------------------------------------------------------------------------------
class _Audit:
    def __init__(self, model: nn.Module):
        self.model = model
        self.rows: OrderedDict[str, LayerMacs] = OrderedDict()
        self.module_stack: list[str] = []
        self.suspended = 0  # > 0 inside a weight-layer module, a graph-counted node or the threshold
        self.node: fx.Node | None = None
        self.node_macs: dict[fx.Node, dict[str, Any]] = {}
        self.storage_names: dict[int, str] = {}  # storage data_ptr -> weight fqn, for functional uses
        self.layers: list[list[Tensor]] = []  # per conv/linear module running: the weights its ops multiplied
        self.routing: list[list[int] | None] = []  # per experts module running: tokens routed to each expert
        for name, param in model.named_parameters():
            self.name_storage(param, name)

    def name_storage(self, tensor: Tensor, fqn: str) -> None:
        key = _storage_key(tensor)
        if key is not None:
            self.storage_names.setdefault(key, fqn)

    # -- bookkeeping ----------------------------------------------------------------------------
    def add(
        self,
        name: str,
        op: str,
        kind: str,
        weight: Tensor | None,
        out_shape: tuple[int, ...],
        dense: int,
        weight_shape: tuple[int, ...] | None = None,
        nonzeros: int | None = None,
    ) -> None:
        """A row, or a call added to its row; the weight's nonzeros are counted from ``weight``, or given as
        ``nonzeros`` (of a weight of ``weight_shape`` held by a kernel layer)."""
        numel = weight.numel() if weight is not None else math.prod(weight_shape or ())
        if nonzeros is None and weight is not None and numel:
            nonzeros = int(torch.count_nonzero(weight))
        if nonzeros is not None and numel:
            sparse = nonzeros * (dense // numel)
            density = nonzeros / numel
            weight_shape = weight_shape or _shape(weight)
        else:
            sparse, density = dense, 1.0
        row = self.rows.get(name)
        if row is None:
            self.rows[name] = LayerMacs(name, op, kind, weight_shape, out_shape, density, dense, sparse)
        else:
            row.dense_macs += dense
            row.sparse_macs += sparse
            row.calls += 1
        if self.node is not None:
            meta = self.node_macs.setdefault(self.node, {"dense_macs": 0, "sparse_macs": 0, "rows": []})
            meta["dense_macs"] += dense
            meta["sparse_macs"] += sparse
            if name not in meta["rows"]:
                meta["rows"].append(name)

    def scope(self) -> str:
        """The innermost module running (hooks), else the graph node's module, else the node's name."""
        if self.module_stack:
            return self.module_stack[-1]
        if self.node is not None:
            stack = self.node.meta.get("nn_module_stack")
            if stack:
                return next(reversed(stack))
            return self.node.name
        return ""

    # -- module hooks ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        handles = []
        for name, module in self.model.named_modules():
            if not name:
                continue
            if expert_stacks(module):
                handles.append(module.register_forward_pre_hook(self._experts_pre_hook(name), with_kwargs=True))
                handles.append(module.register_forward_hook(self._experts_post_hook(name)))
                continue
            counted = weight_layout(module) is not None or isinstance(module, KernelLayer)
            handles.append(module.register_forward_pre_hook(self._pre_hook(name, counted, name == THRESHOLD_NAME)))
            handles.append(module.register_forward_hook(self._post_hook(name, counted, name == THRESHOLD_NAME)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _pre_hook(self, name: str, counted: bool, silent: bool):
        def hook(module, args):
            self.module_stack.append(name)
            if counted or silent:
                self.suspended += 1
            if counted:
                self.layers.append([])

        return hook

    def _post_hook(self, name: str, counted: bool, silent: bool):
        def hook(module, args, output):
            self.module_stack.pop()
            if counted or silent:
                self.suspended -= 1
            operands = self.layers.pop() if counted else []
            if counted and args and isinstance(args[0], Tensor) and isinstance(output, Tensor):
                self._module_row(name, module, args[0], output, operands)

        return hook

    # -- mixture-of-experts stacks: one row per expert, on the tokens routed to it ---------------
    def _experts_pre_hook(self, name: str):
        def hook(module, args, kwargs):
            self.module_stack.append(name)
            routing = _routed_tokens(module, args, kwargs)
            self.routing.append(routing)
            if routing is not None:  # the rows come from the routing: its products are not counted again
                self.suspended += 1

        return hook

    def _experts_post_hook(self, name: str):
        def hook(module, args, output):
            self.module_stack.pop()
            routing = self.routing.pop()
            if routing is None:
                return
            self.suspended -= 1
            for stack, layout in expert_stacks(module).items():
                matrices = expert_matrices(getattr(module, stack), layout.output_axis)  # effective, cached
                out_features, in_features = matrices.shape[1:]
                for expert, tokens in enumerate(routing):
                    if tokens:
                        dense = tokens * out_features * in_features
                        row = f"{join(name, stack)}[{expert}]"
                        self.add(row, "experts", "weight", matrices[expert], (tokens, out_features), dense)

        return hook

    def _module_row(self, name: str, module: nn.Module, x: Tensor, out: Tensor, operands: list[Tensor]) -> None:
        if isinstance(module, KernelLayer):
            self._kernel_layer_row(name, module, x, out)
            return
        weight = module.weight  # the effective weight on a parametrized module (cached while we run)
        if is_linear(module):  # nn.Linear, or transformers' Conv1D whose (in, out) weight is the matrix's transpose
            matrix = weight_layout(module).matrix_shape(_shape(weight))
            op, dense = "linear", linear_macs(_shape(x), matrix)
        else:
            op = ("conv_transpose" if module.transposed else "conv") + f"{weight.dim() - 2}d"
            dense = conv_macs(_shape(x), _shape(weight), _shape(out), module.transposed)
        # a forward of its own may multiply another tensor than the stored weight (timm's StdConv2d
        # standardizes it): the density is that of the one weight its op multiplied, read at the aten level
        multiplied = operands[0] if len(operands) == 1 and not has_torch_forward(module) else weight
        self.add(join(name, "weight"), op, "weight", multiplied, _shape(out), dense, _shape(weight))

    def _kernel_layer_row(self, name: str, module: KernelLayer, x: Tensor, out: Tensor) -> None:
        """A layer running a sparse kernel: the MACs of the plain conv/linear it computes, at its nonzeros."""
        weight = module.kernel_weight()
        if len(weight.shape) == 2:
            op, dense = "linear", linear_macs(_shape(x), weight.shape)
        else:
            op, dense = f"conv{len(weight.shape) - 2}d", conv_macs(_shape(x), weight.shape, _shape(out), False)
        self.add(join(name, "weight"), op, "weight", None, _shape(out), dense, weight.shape, weight.nonzeros)

    # -- graph-level functional weights ---------------------------------------------------------
    def graph_weight_row(self, root: nn.Module, node: fx.Node, args, kwargs, out) -> None:
        op, transposed = _WEIGHT_FUNCTIONS[node.target]
        x = args[0] if args else kwargs["input"]
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        if op == "linear":
            dense = linear_macs(_shape(x), _shape(weight))
        else:
            dense = conv_macs(_shape(x), _shape(weight), _shape(out), transposed)
        weight_node = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        fqn = _parameter_source(root, weight_node, _shape(weight))
        if fqn is None:  # a weight computed from the input (dynamic kernels): an activation product
            self.add(f"{self.scope()}:{op}", op, "activation", None, _shape(out), dense, _shape(weight))
        else:
            self.add(fqn, op, "weight", weight, _shape(out), dense)

    # -- aten level -----------------------------------------------------------------------------
    def aten_row(self, func, args, out) -> None:
        found = _aten_macs(func, args, out)
        if found is None:
            return
        op, dense, operands = found
        out = out[0] if isinstance(out, (tuple, list)) else out  # fused attention returns (out, lse, ...)
        for operand in operands:
            fqn = self.storage_names.get(_storage_key(operand))
            if fqn is not None:  # a functional use of a known parameter (e.g. MultiheadAttention's in_proj)
                self.add(fqn, op, "weight", operand, _shape(out), dense)
                return
        self.add(f"{self.scope()}:{op}", op, "activation", None, _shape(out), dense)


def _storage_key(tensor: Tensor) -> int | None:
    """The address of a tensor's storage (shared by its views); None where there is none to compare."""
    try:
        key = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return key or None


def _parameter_source(root: nn.Module, node: Any, shape: tuple[int, ...]) -> str | None:
    """The attribute a weight argument is computed from, when no input feeds it: the only one, or the
    only one of the weight's shape (e.g. ScaledStdConv2d's weight beside its gain).

    Attributes are get_attr targets, or ``getattr(get_attr(module), name)``, which is how a sparsified
    graph reads a parametrized weight used by F.conv*/F.linear.
    """
    if not isinstance(node, fx.Node):
        return None
    sources, seen, todo = set(), set(), [node]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder":
            return None
        if current.op == "get_attr":
            sources.add(current.target)
            continue
        if current.op == "call_function" and current.target is getattr and len(current.args) == 2:
            owner, name = current.args
            if isinstance(owner, fx.Node) and owner.op == "get_attr" and isinstance(name, str):
                sources.add(f"{owner.target}.{name}" if owner.target else name)
                continue
        todo.extend(current.all_input_nodes)
    if len(sources) > 1:
        sources = {target for target in sources if tuple(getattr(_fetch(root, target), "shape", ())) == shape}
    return sources.pop() if len(sources) == 1 else None


def _fetch(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


class _Counter(TorchDispatchMode):
    def __init__(self, audit: _Audit):
        super().__init__()
        self.audit = audit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.audit.suspended:
            self.audit.aten_row(func, args, out)
        elif self.audit.layers:  # inside a conv/linear module: note the weight its op multiplies
            found = _aten_macs(func, args, out)
            if found is not None and found[2]:
                self.audit.layers[-1].append(found[2][-1])
        return out


class _Interpreter(fx.Interpreter):
    def __init__(self, module: fx.GraphModule, audit: _Audit):
        super().__init__(module)
        self.audit = audit

    def run_node(self, n: fx.Node) -> Any:
        self.audit.node = n
        graph_counted = n.op == "call_function" and n.target in _WEIGHT_FUNCTIONS
        try:
            if not graph_counted:
                return super().run_node(n)
            self.audit.suspended += 1
            try:
                out = super().run_node(n)
            finally:
                self.audit.suspended -= 1
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.audit.graph_weight_row(self.module, n, args, kwargs, out)
            return out
        finally:
            self.audit.node = None


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------
def _graph_of(model: nn.Module) -> tuple[fx.GraphModule | None, str | None]:
    if isinstance(model, fx.GraphModule):
        return model, None
    if is_sparsified(model):  # sparsified without a graph: its threshold runs as a forward pre-hook
        return None, "the model is sparsified without a graph; ran it eagerly"
    from .trace import trace

    result = trace(model)
    if result.graph_module is None:
        return None, f"torch.fx could not trace {type(model).__name__} ({result.error}); ran it eagerly"
    return result.graph_module, None


@contextlib.contextmanager
def _no_fused_attention() -> Iterator[None]:
    """nn.MultiheadAttention / TransformerEncoderLayer run their decomposed path (one fused aten op
    would hide the projections and the attention matmuls); same math, so the same MACs."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _graph_inputs(graph_module: fx.GraphModule, keywords: Mapping[str, Any]) -> list[Any]:
    """The placeholders' values: from ``keywords`` by name, else the forward's default."""
    values, names = [], []
    for node in graph_module.graph.nodes:
        if node.op != "placeholder":
            continue
        name = node.target.lstrip("*")
        names.append(name)
        if name in keywords:
            values.append(keywords[name])
        elif node.args:
            values.append(node.args[0])
        else:
            raise TypeError(f"flops(): the forward needs {name!r}, missing from the example input's keywords")
    unknown = sorted(set(keywords) - set(names))
    if unknown:
        raise TypeError(f"flops(): the forward takes {names}, not {unknown}")
    return values


def flops(model: nn.Module, example_input: Tensor | Sequence[Any] | Mapping[str, Any]) -> FlopReport:
    """Per-layer dense and sparse MACs of one forward of ``example_input`` (see the module docstring).

    example_input: a tensor, a sequence of positional inputs, or a dict of keyword inputs, as Hugging Face
    models are called: ``flops(model, {"input_ids": ids, "attention_mask": mask})``.
    Works on a plain dense model, a sparsified model (density from the effective weights) and a
    folded model. The model's weights, training flags and buffers are left as they were; the graph's
    nodes get ``node.meta["fxsparse.macs"]`` = {"dense_macs", "sparse_macs", "rows"}.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"flops() takes a torch.nn.Module, got {type(model).__name__}")
    keywords: dict[str, Any] = {}
    if isinstance(example_input, Mapping):
        inputs, keywords = (), dict(example_input)
        if not all(isinstance(key, str) for key in keywords):
            raise TypeError("flops(): a dict example input maps the forward's argument names to values")
    elif isinstance(example_input, Tensor):
        inputs = (example_input,)
    else:
        inputs = tuple(example_input)
    graph_module, note = _graph_of(model)
    positional = _graph_inputs(graph_module, keywords) if graph_module is not None and keywords else inputs
    audit = _Audit(model)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(_eval_mode(model))
        if graph_module is not None and graph_module is not model:  # its own flag is read by its graph
            stack.enter_context(_eval_mode(graph_module))
        stack.enter_context(_no_fused_attention())
        if is_sparsified(model):
            refresh_threshold_(model)
        stack.enter_context(parametrize.cached())
        for prefix, module in model.named_modules():  # cache the effective weights now, to name their uses
            if parametrize.is_parametrized(module):
                for tensor_name in module.parametrizations:
                    audit.name_storage(getattr(module, tensor_name), join(prefix, tensor_name))
        stack.enter_context(audit.hooks())
        stack.enter_context(_Counter(audit))
        try:
            if graph_module is not None:
                _Interpreter(graph_module, audit).run(*positional)
            else:
                model(*inputs, **keywords)
        except Exception as exc:
            shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in inputs]
            shapes += [
                f"{k}={tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}" for k, v in keywords.items()
            ]
            raise RuntimeError(
                f"the forward of {type(model).__name__} on the example input {shapes} failed "
                f"({type(exc).__name__}: {exc}); pass an input the model accepts, e.g. torch.randn(1, 3, 224, 224)"
            ) from exc
    if graph_module is not None:
        for node in graph_module.graph.nodes:
            node.meta.pop(META_KEY, None)
        for node, meta in audit.node_macs.items():
            node.meta[META_KEY] = meta
    input_shapes = [_shape(t) for t in (*inputs, *keywords.values()) if isinstance(t, Tensor)]
    notes = [note] if note else []
    return FlopReport(
        list(audit.rows.values()), input_shapes, graph_module is not None, notes, distribution_record(model)
    )
