"""SparseConv2d and SparseLinear: a conv or linear layer that runs one of the sparse kernels of ops.py.

A layer is built from its weight's CSR (crow, col, values of the 2-D view (out, in/groups*kh*kw), as in
docs/FORMAT.md) and its bias, with or without the dense weight. It chooses its path on its first call
(the planning pass of fxsparse.accelerate): every candidate path (dense, the compiled kernel when it is
available, and each layout and kernel of ops.py) is timed on that very input at the current thread count,
and the sparse one kept (the compiled kernel's, unless a torch-op kernel is faster by ``compiled_margin``) runs
when it beats dense by ``min_speedup``; otherwise the layer is dense and accelerate() puts a plain module back.
After planning it keeps only what its path needs, as plain buffers (indices, offsets, weights; the compiled
kernel also keeps the bias and may fuse a ReLU or GELU, see fuse.py).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..export import from_csr
from ..kernel_layer import KernelLayer, KernelWeight
from . import native, ops
from .timing import Timer, default_timer

DENSE = "dense"


@dataclasses.dataclass
class Planner:
    """How layers choose their path: the timer, the allowed kernels and layouts, and the rules."""

    timer: Timer = default_timer
    kernels: tuple[str, ...] = (ops.NATIVE, *ops.KERNELS)
    layouts: tuple[str, ...] = (ops.DIRECT, *ops.CONV_LAYOUTS)
    min_speedup: float = 1.05  # a sparse path must be this much faster than dense to be chosen
    max_density: float = 0.6  # denser layers stay dense without timing
    # a torch-op kernel replaces the compiled one only when this much faster alone (preferred_sparse_path)
    compiled_margin: float = 1.25
    max_row_entries: int = 16_000_000  # the rows layout is not tried when its bags would be larger (8 B/entry)
    check_tolerance: float = 1e-3  # a candidate whose output differs more from dense's is refused
    paths: dict[str, str] = dataclasses.field(default_factory=dict)  # layer name -> path, taken without timing


@dataclasses.dataclass
class LayerPlan:
    """What one layer measured and chose (times in seconds per call at the planned input)."""

    name: str
    kind: str  # "conv" or "linear"
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...] | None
    density: float
    times: dict[str, float]
    path: str  # "dense", "<layout>+<kernel>" for convs, "<kernel>" for linears
    reason: str = ""  # why a layer was not timed, or a refused candidate

    @property
    def dense_ms(self) -> float | None:
        return 1e3 * self.times[DENSE] if DENSE in self.times else None

    @property
    def best_sparse(self) -> str | None:
        sparse = {k: v for k, v in self.times.items() if k != DENSE}
        return min(sparse, key=sparse.get) if sparse else None

    @property
    def sparse_ms(self) -> float | None:
        best = self.best_sparse
        return 1e3 * self.times[best] if best else None

    @property
    def chosen_ms(self) -> float | None:
        return 1e3 * self.times[self.path] if self.path in self.times else None

    def to_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "dense_ms": self.dense_ms,
            "sparse_ms": self.sparse_ms,
            "best_sparse": self.best_sparse,
        }


def preferred_sparse_path(times: dict[str, float], margin: float) -> str | None:
    """The sparse path to run, of those timed (seconds a call): the compiled kernel's unless a torch-op kernel is
    faster by ``margin``. Timed alone, a layer does not show what only the compiled path gains in the model: the
    epilogues fuse.py folds into it and chain.py's feature-first hand-offs. BERT-base 90% ran 1.08x slower at
    one thread and 1.12x at two with five of its 768 -> 3072 linears (GELU next) on ebag, which had timed 0-10%
    faster alone (1.2 ms more a layer in the model against 0.1-0.2 ms less alone); its twelve value linears
    on ebag cost 1.01x (AMD EPYC Zen 4, 7 Dec)."""
    if not times:
        return None
    best = min(times, key=times.get)
    native = next((n for n in times if n in (ops.NATIVE, ops.NATIVE_CONV_PATH)), None)
    if native is not None and times[native] <= margin * times[best]:
        return native
    return best


def density_of(nnz: int, shape: Sequence[int]) -> float:
    return nnz / max(math.prod(shape), 1)


_dtype_warned: set[torch.dtype] = set()


def float32_input(x: Tensor, name: str) -> Tensor:
    """x in float32, the sparse kernels' dtype; another dtype (autocast, .half(), .bfloat16()) is converted,
    with a warning once per dtype, and the caller converts the result back."""
    if x.dtype == torch.float32:
        return x
    if not x.is_floating_point():
        raise TypeError(f"{name}: the sparse kernels take floating-point inputs, got {x.dtype}")
    if x.dtype not in _dtype_warned:
        _dtype_warned.add(x.dtype)
        warnings.warn(
            f"fxsparse.accelerate: {name} got a {x.dtype} input; the sparse kernels compute in float32 and the "
            f"result is converted back to {x.dtype}",
            stacklevel=3,
        )
    return x.float()


def features_first_table(x: Tensor) -> Tensor | None:
    """The (in, ...) table of an (..., in) input stored feature-first (a chained linear's view, chain.py): the
    compiled linear reads it with no transpose. None for any other layout."""
    if x.dim() < 2 or x.is_contiguous():
        return None
    table = x.movedim(-1, 0)
    return table if table.is_contiguous() else None


def native_csr(crow: Tensor, col: Tensor, values: Tensor, columns: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """(indices, offsets, weights) of the compiled kernels: column indices in int16 when there are fewer than
    32768 columns (int32 otherwise), int32 row pointers, float32 values; None when the CSR is too large."""
    if values.numel() >= 2**31:
        return None
    index_dtype = torch.int16 if columns < 2**15 else torch.int32
    return col.to(index_dtype).contiguous(), crow.to(torch.int32).contiguous(), values.float().contiguous()


class _SparseLayer(KernelLayer):
    """Shared by SparseConv2d and SparseLinear: the CSR weight, the bias and the planning pass."""

    kind = ""

    def __init__(
        self,
        crow: Tensor,
        col: Tensor,
        values: Tensor,
        bias: Tensor | None,
        weight_shape: Sequence[int],
        dense_weight: Tensor | None,
    ):
        super().__init__()
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.register_buffer("crow", crow)
        self.register_buffer("col", col)
        self.register_buffer("values", values.detach())
        self.register_buffer("bias", None if bias is None else bias.detach())
        for name in ("indices", "offsets", "weights"):  # the bags of the chosen path, after planning
            self.register_buffer(name, None)
        self.nnz = int(values.numel())
        self.has_bias = bias is not None
        # the activation fused into the compiled kernel's epilogue (fuse.py): None, "relu", or "gelu" (linears)
        self.activation: str | None = None
        self.dense_weight = None if dense_weight is None else dense_weight.detach()
        self.path: str | None = None
        self.planner: Planner | None = None
        self.plan: LayerPlan | None = None
        self.name = ""

    def _native_operands(self) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor | None]:
        """(indices, offsets, float32 weights) and the float32 bias (or None) the compiled kernels take, read from
        ``_buffers`` directly: nn.Module's ``__getattr__`` costs about 1 us a buffer on every call."""
        buffers = self._buffers
        bias = buffers["bias"]
        csr = (buffers["indices"], buffers["offsets"], buffers["weights"].float())
        return csr, None if bias is None else bias.float()

    # -- what a subclass provides ------------------------------------------------------------------
    def _dense(self, x: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def _sparse_candidates(
        self, x: Tensor, only: str | None = None
    ) -> dict[str, tuple[Callable[[], Tensor], Callable[[], None]]]:
        """name -> (run on x, keep this path's buffers), for every allowed path, or just ``only``."""
        raise NotImplementedError

    def _plain_module(self) -> nn.Module:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------------
    def kernel_weight(self) -> KernelWeight:
        """fxsparse.kernel_layer's interface: what flops(), layer_densities() and ``.weight`` read."""
        held = next(t for t in (self.values, self.weights, self.dense_weight) if t is not None)
        return KernelWeight(self.weight_shape, self.nnz, held.dtype, held.device)

    def fold_batchnorm_(self, scale: Tensor, shift: Tensor) -> None:
        """Fold an eval BatchNorm after this layer: w <- scale[o] w, b <- scale b + shift (zeros stay zeros)."""
        scale, shift = scale.detach().to(self.values.dtype), shift.detach().to(self.values.dtype)
        counts = self.crow.to(torch.int64).diff()
        self.values.mul_(scale.repeat_interleave(counts, output_size=self.nnz))  # in place: no second copy
        self.bias = shift.clone() if self.bias is None else self.bias * scale + shift
        self.has_bias = True
        if self.dense_weight is not None:
            self.dense_weight = self.dense_weight * scale.view(-1, *([1] * (self.dense_weight.dim() - 1)))

    def dense_weight_(self) -> Tensor:
        """The dense weight (from the CSR when the layer was built without it)."""
        if self.dense_weight is not None:
            return self.dense_weight
        return from_csr(self.crow, self.col, self.values, self.weight_shape)

    def forward(self, x: Tensor) -> Tensor:
        if self.path is None:
            return self._plan_and_run(x)
        return self._run(x)

    def _run(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _plan_and_run(self, x: Tensor) -> Tensor:
        planner = self.planner = self.planner or Planner()
        density = density_of(self.nnz, self.weight_shape)
        reason = ""
        if x.dtype != torch.float32 or self.values.dtype != torch.float32:
            reason = f"dtype {x.dtype}: sparse kernels are float32 only"
        elif x.device.type != "cpu":
            reason = f"device {x.device}: sparse kernels are CPU only"
        elif density > planner.max_density:
            reason = f"density {density:.3f} > max_density {planner.max_density}"
        given = planner.paths.get(self.name)
        if given is not None and not reason:  # no timing, no dense weight unless dense is the given path
            candidates = {} if given == DENSE else self._sparse_candidates(x, only=given)
            if given == DENSE or given in candidates:
                return self._finish(x, given, candidates, {}, density, "path given")
            warnings.warn(
                f"fxsparse.accelerate: {self.name} cannot run the given path {given!r}; timing its paths", stacklevel=2
            )
        candidates = {} if reason else self._sparse_candidates(x)
        weight = self.dense_weight = self.dense_weight_()
        times: dict[str, float] = {}
        if candidates:
            reference = self._dense(x, weight)
            scale = float(reference.abs().max()) or 1.0
            for name in list(candidates):
                error = float(candidates[name][0]().sub_(reference).abs_().max()) / scale  # no temporaries
                if not error <= planner.check_tolerance:
                    warnings.warn(
                        f"fxsparse.accelerate: {self.name} path {name} differs from the dense result by "
                        f"{error:.2e} (relative); it is not used",
                        stacklevel=2,
                    )
                    reason = f"{name} refused (error {error:.1e})"
                    del candidates[name]
            runs = {name: run for name, (run, _) in candidates.items()}
            times = dict(planner.timer({DENSE: lambda: self._dense(x, weight), **runs}))
        best = preferred_sparse_path({n: times[n] for n in candidates if n in times}, planner.compiled_margin)
        chosen = best if best is not None and times[DENSE] >= planner.min_speedup * times[best] else DENSE
        return self._finish(x, chosen, candidates, times, density, reason)

    def _finish(
        self, x: Tensor, path: str, candidates: dict, times: dict[str, float], density: float, reason: str
    ) -> Tensor:
        """Keep what ``path`` needs, record the plan, and run the path on x."""
        self.path = path
        if path == DENSE:
            self.dense_weight = self.dense_weight_()
            self.crow = self.col = self.values = None
        else:
            candidates[path][1]()
            self.dense_weight = None
        self.plan = LayerPlan(self.name, self.kind, self.weight_shape, tuple(x.shape), density, times, path, reason)
        self.planner = None
        return self._dense(x, self.dense_weight) if path == DENSE else self._run(x)

    def plain_module(self) -> nn.Module:
        """The equivalent nn.Conv2d / nn.Linear with the dense weight (for layers that chose dense)."""
        with torch.device("meta"):
            module = self._plain_module()
        module.weight = nn.Parameter(self.dense_weight_(), requires_grad=False)
        module.bias = None if self.bias is None else nn.Parameter(self.bias, requires_grad=False)
        return module.eval()

    def _keep_bags(self, bags: tuple[Tensor, Tensor, Tensor], canonical: bool) -> None:
        self.indices, self.offsets, self.weights = bags
        if not canonical:  # everything the path needs is in the bags
            self.crow = self.col = self.values = None
            self.bias = None

    def extra_repr(self) -> str:
        return f"{self.weight_shape}, nnz={self.nnz}, path={self.path}"


def _pairs(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def four_sided_padding(
    padding: str | Sequence[int], kernel_size: Sequence[int], dilation: Sequence[int]
) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of nn.Conv2d's padding (a pair, "valid" or "same", extra on the far side)."""
    if padding == "valid":
        return 0, 0, 0, 0
    if padding == "same":
        sides = []
        for k, d in zip(kernel_size, dilation):
            total = d * (k - 1)
            sides += [total // 2, total - total // 2]
        return sides[0], sides[1], sides[2], sides[3]
    ph, pw = _pairs(padding)
    return ph, ph, pw, pw


class SparseConv2d(_SparseLayer):
    """nn.Conv2d (zeros padding, any stride, dilation and groups) on a CSR weight."""

    kind = "conv"

    def __init__(
        self,
        crow: Tensor,
        col: Tensor,
        values: Tensor,
        bias: Tensor | None,
        *,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        stride: Sequence[int] = (1, 1),
        padding: str | Sequence[int] = (0, 0),
        dilation: Sequence[int] = (1, 1),
        groups: int = 1,
        dense_weight: Tensor | None = None,
    ):
        kernel_size, stride, dilation = _pairs(kernel_size), _pairs(stride), _pairs(dilation)
        super().__init__(crow, col, values, bias, (out_channels, in_channels // groups, *kernel_size), dense_weight)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.padding = padding if isinstance(padding, str) else _pairs(padding)
        self.sides = four_sided_padding(self.padding, kernel_size, dilation)
        self.layout = self.kernel = ""
        self.input_size: tuple[int, int] = (0, 0)
        self._rows_cache: dict[tuple[int, int], tuple[Tensor, Tensor, Tensor]] = {}  # rows bags of other heights

    @classmethod
    def from_module(cls, conv: nn.Conv2d, keep_dense: bool = True) -> SparseConv2d:
        dense_weight = conv.weight.detach() if keep_dense else None
        return cls.from_csr(conv, *_dense_to_csr(conv.weight), conv.bias, dense_weight)

    @classmethod
    def from_csr(
        cls, conv: nn.Conv2d, crow: Tensor, col: Tensor, values: Tensor, bias: Tensor | None, dense_weight=None
    ) -> SparseConv2d:
        """The layer of ``conv``'s geometry with the given CSR weight (its own weight is not read)."""
        return cls(
            crow,
            col,
            values,
            bias,
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            kernel_size=conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            dense_weight=dense_weight,
        )

    def _plain_module(self) -> nn.Module:
        return nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            bias=self.bias is not None,
        )

    def _dense(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _geometry(self) -> tuple[list[int], list[int], list[int], list[int]]:
        return list(self.kernel_size), list(self.stride), list(self.sides), list(self.dilation)

    def _bags(self, layout: str, input_size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        if layout == "im2col":
            return ops.im2col_bags(
                self.crow, self.col, self.values, self.bias, self.in_channels, self.groups, self.kernel_size
            )
        return ops.rows_bags(
            self.crow,
            self.col,
            self.values,
            self.bias,
            self.in_channels,
            self.groups,
            self.kernel_size,
            self.stride,
            self.sides,
            self.dilation,
            input_size,
        )

    def _call_op(
        self, x: Tensor, bags: tuple[Tensor, Tensor, Tensor], layout: str, kernel: str, input_size: tuple[int, int]
    ) -> Tensor:
        kernel_size, stride, sides, dilation = self._geometry()
        return torch.ops.fxsparse.conv2d(
            x, *bags, self.out_channels, kernel_size, stride, sides, dilation, list(input_size), layout, kernel
        )

    def _native_candidate(self, x: Tensor) -> dict:
        """{"direct+native": (run, keep)} when the compiled kernels are available, else {}."""
        csr = native_csr(self.crow, self.col, self.values, 2**31) if native.available() else None
        if csr is None:
            return {}
        bias = None if self.bias is None else self.bias.float().contiguous()

        def run():
            return self._call_native(x, csr, bias)

        def keep():
            self.layout, self.kernel = ops.DIRECT, ops.NATIVE
            self.indices, self.offsets, self.weights = csr
            self.bias = bias
            self.crow = self.col = self.values = None

        return {ops.NATIVE_CONV_PATH: (run, keep)}

    def _call_native(
        self,
        x: Tensor,
        csr: tuple[Tensor, Tensor, Tensor],
        bias: Tensor | None,
        residual: Tensor | None = None,
        relu: bool | None = None,
    ) -> Tensor:
        kernel_size, stride, sides, dilation = self._geometry()
        relu = self.activation == "relu" if relu is None else relu
        return ops.native_conv2d(
            x, *csr, bias, residual, self.out_channels, self.groups, kernel_size, stride, sides, dilation, relu
        )

    def _sparse_candidates(self, x: Tensor, only: str | None = None):
        input_size = (int(x.shape[-2]), int(x.shape[-1]))
        output_height = ops.conv_output_size(input_size, self.kernel_size, self.stride, self.sides, self.dilation)[0]
        candidates = {}
        layouts = self.planner.layouts if only is None else [only.partition("+")[0]]
        kernels = self.planner.kernels if only is None else [only.partition("+")[2]]
        if ops.DIRECT in layouts and ops.NATIVE in kernels:
            candidates.update(self._native_candidate(x))
        rows_entries = ops.rows_bag_entries(self.nnz + self.out_channels, output_height)
        for layout in layouts:
            if (
                layout not in ops.CONV_LAYOUTS
                or layout == "rows"
                and (self.kernel_size == (1, 1) or rows_entries > self.planner.max_row_entries)
            ):
                continue
            bags = self._bags(layout, input_size)
            for kernel in kernels:
                if kernel not in ops.KERNELS or kernel == "mkl" and bags[0].numel() == 0:  # MKL refuses empty matrices
                    continue

                def run(bags=bags, layout=layout, kernel=kernel):
                    return self._call_op(x, bags, layout, kernel, input_size)

                def keep(bags=bags, layout=layout, kernel=kernel):
                    self.layout, self.kernel, self.input_size = layout, kernel, input_size
                    self._keep_bags(bags, canonical=layout == "rows")

                candidates[f"{layout}+{kernel}"] = (run, keep)
        return candidates

    ROWS_CACHE_SIZE = 4  # rows bags kept for this many other input sizes

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """The conv of x; with ``residual`` (set up by fuse.py for the compiled kernel), conv(x) + residual
        before the fused ReLU."""
        if residual is None:
            return super().forward(x)
        dtype, x = x.dtype, float32_input(x, self.name)
        csr, bias = self._native_operands()
        ho, wo = ops.conv_output_size(x.shape[-2:], self.kernel_size, self.stride, self.sides, self.dilation)
        if tuple(residual.shape) == (x.shape[0], self.out_channels, ho, wo):
            out = self._call_native(x, csr, bias, residual.to(torch.float32))
            return out if dtype == torch.float32 else out.to(dtype)
        out = self._call_native(x, csr, bias, relu=False).to(dtype) + residual  # broadcast: not fused
        return ops.activated(out, self.activation)

    def _run(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = float32_input(x, self.name)
        if self.kernel == ops.NATIVE:
            out = self._call_native(x, *self._native_operands())
            return out if dtype == torch.float32 else out.to(dtype)
        weights = self.weights.float()
        bags, input_size = (self.indices, self.offsets, weights), self.input_size
        if self.layout == "rows" and not all(isinstance(s, int) for s in x.shape[-2:]):
            # traced with a symbolic height or width (torch.export with a dynamic dim): rows bags exist for one
            # input size only, so the traced program runs the shape-agnostic direct conv on the layer's CSR
            csr = (self.col.to(torch.int32), self.crow.to(torch.int32), self.values.float())
            return self._call_native(x, csr, None if self.bias is None else self.bias.float()).to(dtype)
        if self.layout == "rows" and tuple(x.shape[-2:]) != self.input_size:
            input_size = (int(x.shape[-2]), int(x.shape[-1]))
            if input_size not in self._rows_cache:  # one set of bags per input size, a few sizes kept
                if len(self._rows_cache) >= self.ROWS_CACHE_SIZE:
                    self._rows_cache.pop(next(iter(self._rows_cache)), None)  # two threads may both evict
                self._rows_cache[input_size] = self._bags("rows", input_size)
            bags = self._rows_cache[input_size]
        return self._call_op(x, bags, self.layout, self.kernel, input_size).to(dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, nnz={self.nnz}, "
            f"path={self.path}"
        )


class SparseLinear(_SparseLayer):
    """nn.Linear on a CSR weight, for inputs of any number of leading dims."""

    kind = "linear"

    def __init__(
        self,
        crow: Tensor,
        col: Tensor,
        values: Tensor,
        bias: Tensor | None,
        *,
        in_features: int,
        out_features: int,
        dense_weight: Tensor | None = None,
    ):
        super().__init__(crow, col, values, bias, (out_features, in_features), dense_weight)
        self.in_features, self.out_features = in_features, out_features
        self.features_first_in = self.features_first_out = False  # set by chain.py between chained linears
        # chain.py, a model it cannot trace: the (out, ...) product handed over as a (..., out) view, which a
        # chained SparseLinear reads as its table (features_first_table)
        self.features_first_view_out = False
        self.register_buffer("separate_bias", None)

    @classmethod
    def from_module(cls, linear: nn.Module, keep_dense: bool = True) -> SparseLinear:
        """From an nn.Linear, or transformers' Conv1D (GPT-2), whose weight is stored (in, out)."""
        weight = linear.weight.detach()
        if is_conv1d(linear):
            weight = weight.t().contiguous()
        return cls.from_csr(linear, *_dense_to_csr(weight), linear.bias, weight if keep_dense else None)

    @classmethod
    def from_csr(
        cls, linear: nn.Module, crow: Tensor, col: Tensor, values: Tensor, bias: Tensor | None, dense_weight=None
    ) -> SparseLinear:
        """The layer of ``linear``'s shape (nn.Linear or Conv1D) with the given CSR weight of the (out, in) matrix
        (its own weight is not read)."""
        in_features, out_features = linear_features(linear)
        layer = cls(
            crow, col, values, bias, in_features=in_features, out_features=out_features, dense_weight=dense_weight
        )
        layer.conv1d_class = type(linear) if is_conv1d(linear) else None
        return layer

    conv1d_class: type | None = None  # transformers' Conv1D this layer replaces (its plain module), or None

    def _plain_module(self) -> nn.Module:
        if self.conv1d_class is not None:
            return self.conv1d_class(self.out_features, self.in_features)
        return nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)

    def plain_module(self) -> nn.Module:
        """The equivalent nn.Linear, or the Conv1D it replaced (weight stored (in, out) again)."""
        module = super().plain_module()
        if self.conv1d_class is not None:
            module.weight = nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=False)
            if module.bias is None:  # Conv1D always has a bias
                module.bias = nn.Parameter(torch.zeros(self.out_features), requires_grad=False)
        return module

    def _dense(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight, self.bias)

    def _native_candidate(self, x: Tensor) -> dict:
        """{"native": (run, keep)} when the compiled kernels are available, else {}."""
        csr = native_csr(self.crow, self.col, self.values, self.in_features) if native.available() else None
        if csr is None:
            return {}
        bias = None if self.bias is None else self.bias.float().contiguous()

        def run():
            return torch.ops.fxsparse.native_linear(x, *csr, bias, self.out_features, False, False, 0)

        def keep():
            self.kernel = ops.NATIVE
            self.indices, self.offsets, self.weights = csr
            self.bias = bias
            self.crow = self.col = self.values = None

        return {ops.NATIVE: (run, keep)}

    def _sparse_candidates(self, x: Tensor, only: str | None = None):
        kernels = self.planner.kernels if only is None else [only]
        candidates = self._native_candidate(x) if ops.NATIVE in kernels else {}
        kernels = [k for k in kernels if k in ops.KERNELS]
        if not kernels:
            return candidates
        bags = ops.dense_bags(self.crow, self.col, self.values, self.bias, self.in_features)
        for kernel in kernels:
            if kernel == "mkl" and bags[0].numel() == 0:
                continue

            def run(kernel=kernel):
                return torch.ops.fxsparse.linear(x, *bags, None, self.out_features, False, False, kernel)

            def keep(kernel=kernel):
                self.kernel = kernel
                self._keep_bags(bags, canonical=False)

            candidates[kernel] = (run, keep)
        return candidates

    def _run(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = float32_input(x, self.name)
        if self.kernel == ops.NATIVE:
            csr, bias = self._native_operands()
            features_first_in = self.features_first_in
            if not features_first_in and (table := features_first_table(x)) is not None:
                x, features_first_in = table, True
            out = ops.native_linear(
                x,
                *csr,
                bias,
                self.out_features,
                features_first_in,
                self.features_first_out or self.features_first_view_out,
                ops.ACTIVATIONS[self.activation],
            )
            if self.features_first_view_out:
                out = out.movedim(0, -1)
            return out if dtype == torch.float32 else out.to(dtype)
        separate_bias = None if self.separate_bias is None else self.separate_bias.float()
        return torch.ops.fxsparse.linear(
            x,
            self.indices,
            self.offsets,
            self.weights.float(),
            separate_bias,
            self.out_features,
            self.features_first_in,
            self.features_first_out,
            self.kernel,
        ).to(dtype)

    def read_features_first_(self) -> None:
        """Take (in, ...) inputs from a chained layer: the input is the table itself, so the bias, which sat on
        the table's row of ones, is added to the output instead (the compiled kernel keeps its bias apart)."""
        if self.kernel == ops.NATIVE:
            self.features_first_in = True
            return
        bags, bias = ops.split_bias((self.indices, self.offsets, self.weights), self.in_features)
        self.indices, self.offsets, self.weights = bags
        if self.has_bias:
            self.separate_bias = bias
        self.features_first_in = True

    def extra_repr(self) -> str:
        chained = "".join(
            f", {flag}"
            for flag in ("features_first_in", "features_first_out", "features_first_view_out")
            if getattr(self, flag)
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, "
            f"path={self.path}{chained}"
        )


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2's linear layers: y = x W + b with W stored (in, out)), matched by name so
    that transformers is not imported."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers.")


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a Conv1D."""
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return module.in_features, module.out_features


def _dense_to_csr(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    from ..export import to_csr

    return to_csr(weight.detach())
