"""The sparse CPU kernels: one CSR product per conv or linear layer, as torch.library custom ops.

Every kernel computes ``out[b] = sum_e weights[e] * table[indices[e]]`` over the entries e of bag b
(``offsets`` are the CSR row pointers of the bags), with one of torch's two CPU CSR products:

* ``"ebag"``: ``F.embedding_bag(mode="sum", per_sample_weights=...)``, which torch runs with FBGEMM's
  SpMDM kernels (JIT-compiled, vectorised, prefetching);
* ``"mkl"``: ``torch.sparse_csr_tensor(offsets, indices, weights) @ table`` (MKL's sparse BLAS).

The table is built from the input with one strided copy, never a full F.unfold, and always ends with a
row of ones whose entry in each bag is the bias (so the bias costs no extra pass):

* linear: ``table = [x^T; 1]`` of shape (in + 1, tokens); one bag per output feature.
* conv, layout ``"im2col"``: rows (c, i, j) of the kernel taps, columns (y, x) of one sample's output,
  shape (C kh kw + 1, Ho Wo); one bag per output channel. For a 1x1 conv this is a copy of the input.
* conv, layout ``"rows"``: only the kw horizontally shifted copies of the input, rows (c, j, r) for input
  row r, columns x, shape (C kw H + 1, Wo); one bag per (output channel, output row y) whose entries point
  at input row r = y*stride + i*dilation - pad of each tap (taps in the vertical padding are dropped when
  the bags are built). Three times the input instead of nine for a 3x3 conv.

Convs run one product per sample (the tables of a whole batch outgrow the caches); both layouts then
produce NCHW directly. Grouped convs use the same tables: a weight's column is mapped to the global input
channel of its group. The bag arrays are built once per layer by :func:`dense_bags`, :func:`im2col_bags`
and :func:`rows_bags` (rows bags depend on the input height). The ops take them as plain tensors (sparse tensors break
torch.compile and torch.export) and have fake kernels, so compiled and exported models keep one opaque
node per layer.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native

KERNELS = ("ebag", "mkl")  # the bag kernels (torch's own products)
CONV_LAYOUTS = ("im2col", "rows")
NATIVE = "native"  # the compiled kernels (csrc/, native.py): path "native" for linears, "direct+native" for convs
DIRECT = "direct"  # the conv layout of the compiled kernel: no table at all
NATIVE_CONV_PATH = f"{DIRECT}+{NATIVE}"

_LIBRARY = torch.library.Library("fxsparse", "DEF")
_LIBRARY.define(
    "conv2d(Tensor x, Tensor indices, Tensor offsets, Tensor weights, int out_channels, int[2] kernel_size, "
    "int[2] stride, int[4] padding, int[2] dilation, int[2] input_size, str layout, str kernel) -> Tensor"
)
_LIBRARY.define(
    "linear(Tensor x, Tensor indices, Tensor offsets, Tensor weights, Tensor? bias, int out_features, "
    "bool features_first_in, bool features_first_out, str kernel) -> Tensor"
)
_LIBRARY.define(
    "native_conv2d(Tensor x, Tensor indices, Tensor offsets, Tensor weights, Tensor? bias, Tensor? residual, "
    "int out_channels, int groups, int[2] kernel_size, int[2] stride, int[4] padding, int[2] dilation, bool relu) "
    "-> Tensor"
)
_LIBRARY.define("native_max_pool2d(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding) -> Tensor")
_LIBRARY.define(
    "native_linear(Tensor x, Tensor indices, Tensor offsets, Tensor weights, Tensor? bias, int out_features, "
    "bool features_first_in, bool features_first_out, int activation) -> Tensor"
)
# the activation a compiled-kernel linear applies in its epilogue, by the code native_linear takes
ACTIVATIONS = {None: 0, "relu": 1, "gelu": 2}


def activated(out: Tensor, activation: str | None) -> Tensor:
    """out through the named epilogue activation (None: as it is); GELU is the exact (erf) form."""
    if activation == "relu":
        return out.relu()
    return F.gelu(out) if activation == "gelu" else out


# ------------------------------------------------------------------------------------------------
# geometry
# ------------------------------------------------------------------------------------------------
def conv_output_size(
    size: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[int, int]:
    """(Ho, Wo) of a conv over an (H, W) input; padding is (top, bottom, left, right)."""
    (h, w), (kh, kw), (sh, sw), (pt, pb, pl, pr), (dh, dw) = size, kernel_size, stride, padding, dilation
    return (h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1


def check_input_size(
    size: Sequence[int], kernel_size: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> None:
    """Raise F.conv2d's error (a RuntimeError) when the padded input is smaller than the dilated kernel."""
    (h, w), (kh, kw), (pt, pb, pl, pr), (dh, dw) = size, kernel_size, padding, dilation
    hp, wp, eh, ew = h + pt + pb, w + pl + pr, dh * (kh - 1) + 1, dw * (kw - 1) + 1
    if hp < eh or wp < ew:
        raise RuntimeError(
            f"Calculated padded input size per channel: ({hp} x {wp}). Kernel size: ({eh} x {ew}). "
            "Kernel size can't be greater than actual input size"
        )


# ------------------------------------------------------------------------------------------------
# tables (the dense operand of the CSR product)
# ------------------------------------------------------------------------------------------------
def _with_ones_row(rows: int, columns: int, like: Tensor) -> Tensor:
    table = torch.empty(rows + 1, columns, dtype=like.dtype, device=like.device)
    table[rows].fill_(1)
    return table


def linear_table(x2d: Tensor) -> Tensor:
    """[x^T; 1]: (in + 1, tokens) for x2d of shape (tokens, in)."""
    tokens, features = x2d.shape
    table = _with_ones_row(features, tokens, x2d)
    table[:features].copy_(x2d.t())
    return table


def im2col_table(
    x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> Tensor:
    """(C kh kw + 1, N Ho Wo): every kernel tap of every output position, then the row of ones."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (pt, pb, pl, pr), (dh, dw) = kernel_size, stride, padding, dilation
    ho, wo = conv_output_size((h, w), kernel_size, stride, padding, dilation)
    if pt or pb or pl or pr:
        x = F.pad(x, (pl, pr, pt, pb))
    s_n, s_c, s_h, s_w = x.stride()
    taps = x.as_strided((c, kh, kw, n, ho, wo), (s_c, dh * s_h, dw * s_w, s_n, sh * s_h, sw * s_w), x.storage_offset())
    table = _with_ones_row(c * kh * kw, n * ho * wo, x)
    table[:-1].view(c, kh, kw, n, ho, wo).copy_(taps)
    return table


def rows_table(
    x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> Tensor:
    """(C kw H + 1, N Wo): each input row seen through each horizontal tap, then the row of ones."""
    n, c, h, w = x.shape
    (_, kw), (_, sw), (_, _, pl, pr), (_, dw) = kernel_size, stride, padding, dilation
    wo = conv_output_size((h, w), kernel_size, stride, padding, dilation)[1]
    if pl or pr:
        x = F.pad(x, (pl, pr))
    s_n, s_c, s_h, s_w = x.stride()
    shifted = x.as_strided((c, kw, h, n, wo), (s_c, dw * s_w, s_h, s_n, sw * s_w), x.storage_offset())
    table = _with_ones_row(c * kw * h, n * wo, x)
    table[:-1].view(c, kw, h, n, wo).copy_(shifted)
    return table


# ------------------------------------------------------------------------------------------------
# the product
# ------------------------------------------------------------------------------------------------
_csr_warning_silenced = False


def _csr_matrix(offsets: Tensor, indices: Tensor, weights: Tensor, size: tuple[int, int]) -> Tensor:
    global _csr_warning_silenced
    if not _csr_warning_silenced:  # torch warns once per process that sparse CSR is in beta
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.sparse_csr_tensor(offsets[:1], indices[:0], weights[:0], (0, 0), check_invariants=False)
        _csr_warning_silenced = True
    return torch.sparse_csr_tensor(offsets, indices, weights, size, check_invariants=False)


def bag_product(table: Tensor, indices: Tensor, offsets: Tensor, weights: Tensor, kernel: str) -> Tensor:
    """(bags, table columns): bag b is sum_e weights[e] * table[indices[e]] for e in offsets[b]:offsets[b+1]."""
    if kernel == "ebag":
        return F.embedding_bag(
            indices, table, offsets, mode="sum", per_sample_weights=weights, include_last_offset=True
        )
    if kernel == "mkl":
        return torch.mm(_csr_matrix(offsets, indices, weights, (offsets.numel() - 1, table.shape[0])), table)
    raise ValueError(f"unknown sparse kernel {kernel!r}; expected one of {KERNELS}")


# ------------------------------------------------------------------------------------------------
# the ops
# ------------------------------------------------------------------------------------------------
def _conv2d(
    x: Tensor,
    indices: Tensor,
    offsets: Tensor,
    weights: Tensor,
    out_channels: int,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    input_size: list[int],
    layout: str,
    kernel: str,
) -> Tensor:
    """One product per sample, each on that sample's table: a table of a whole batch outgrows the caches
    (16 ResNet-50 images: 38 MB for one 3x3 layer), and the products come out in NCHW order."""
    n, _, h, w = x.shape
    check_input_size((h, w), kernel_size, padding, dilation)
    ho, wo = conv_output_size((h, w), kernel_size, stride, padding, dilation)
    if n == 0:
        return x.new_empty((0, out_channels, ho, wo))
    if layout == "im2col":
        table = im2col_table
    elif layout == "rows":
        table = rows_table
        if [h, w] != list(input_size):
            raise ValueError(f"fxsparse::conv2d: the row bags were built for {list(input_size)} inputs, got {[h, w]}")
    else:
        raise ValueError(f"unknown conv layout {layout!r}; expected one of {CONV_LAYOUTS}")
    outs = [
        bag_product(table(x[i : i + 1], kernel_size, stride, padding, dilation), indices, offsets, weights, kernel)
        for i in range(n)
    ]
    return outs[0].view(1, out_channels, ho, wo) if n == 1 else torch.stack(outs).view(n, out_channels, ho, wo)


TABLE_CHUNK_BYTES = 2**21  # a linear layer's table is cut into token chunks of about this size (cache-resident)


def token_chunk(table_rows: int, tokens: int) -> int:
    """Tokens per product so that a chunk of the table stays in the caches (at least 64)."""
    return min(tokens, max(64, TABLE_CHUNK_BYTES // (4 * table_rows)))


def _linear(
    x: Tensor,
    indices: Tensor,
    offsets: Tensor,
    weights: Tensor,
    bias: Tensor | None,
    out_features: int,
    features_first_in: bool,
    features_first_out: bool,
    kernel: str,
) -> Tensor:
    """x is (..., in), or (in, ...) when features_first_in (then the table is x itself, with no row of ones,
    and the bias comes separately); the result is (..., out), or (out, ...) when features_first_out.
    Many tokens are multiplied chunk by chunk (token_chunk), each chunk's table staying in the caches."""
    if features_first_in:
        lead, x2d = x.shape[1:], x.reshape(x.shape[0], -1)  # (in, tokens)
        tokens, chunk = x2d.shape[1], token_chunk(x2d.shape[0], x2d.shape[1])
    else:
        lead, x2d = x.shape[:-1], x.reshape(-1, x.shape[-1])  # (tokens, in)
        tokens, chunk = x2d.shape[0], token_chunk(x2d.shape[1] + 1, x2d.shape[0])
    if tokens == 0:  # an empty batch: an empty result, as F.linear gives
        return x.new_empty((out_features, *lead) if features_first_out else (*lead, out_features))

    def product(start: int, stop: int) -> Tensor:  # (out_features, stop - start), bias included
        if features_first_in:
            table = x2d if stop - start == tokens else x2d[:, start:stop].contiguous()
        else:
            table = linear_table(x2d[start:stop])
        part = bag_product(table, indices, offsets, weights, kernel)
        return part if bias is None else part.add_(bias[:, None])

    if features_first_out:
        if chunk == tokens:
            return product(0, tokens).view(out_features, *lead)
        out = torch.empty(out_features, tokens, dtype=x.dtype)
        for start in range(0, tokens, chunk):
            out[:, start : start + chunk] = product(start, min(tokens, start + chunk))
        return out.view(out_features, *lead)
    if tokens == 1:
        return product(0, 1).view(*lead, out_features)
    out = torch.empty(tokens, out_features, dtype=x.dtype)
    for start in range(0, tokens, chunk):
        out[start : start + chunk] = product(start, min(tokens, start + chunk)).t()
    return out.view(*lead, out_features)


def _conv2d_fake(
    x, indices, offsets, weights, out_channels, kernel_size, stride, padding, dilation, input_size, layout, kernel
):
    ho, wo = conv_output_size(x.shape[-2:], kernel_size, stride, padding, dilation)
    return x.new_empty((x.shape[0], out_channels, ho, wo))


def _linear_fake(x, indices, offsets, weights, bias, out_features, features_first_in, features_first_out, kernel):
    lead = x.shape[1:] if features_first_in else x.shape[:-1]
    return x.new_empty((out_features, *lead) if features_first_out else (*lead, out_features))


# ------------------------------------------------------------------------------------------------
# the compiled kernels' ops, with their plain torch reference (used when the extension is unavailable)
# ------------------------------------------------------------------------------------------------
def native_conv2d_reference(
    x, indices, offsets, weights, bias, residual, out_channels, groups, kernel_size, stride, padding, dilation, relu
):
    """What fxsparse::native_conv2d computes, in torch ops: the CSR weight densified, then F.conv2d."""
    in_per_group = x.shape[1] // groups
    weight = _densify(offsets, indices, weights, (out_channels, in_per_group * kernel_size[0] * kernel_size[1]))
    weight = weight.view(out_channels, in_per_group, *kernel_size)
    pt, pb, pl, pr = padding
    out = F.conv2d(F.pad(x, (pl, pr, pt, pb)), weight.to(x.dtype), bias, stride, 0, dilation, groups)
    if residual is not None:
        out = out + residual
    return out.relu() if relu else out


def native_linear_reference(
    x, indices, offsets, weights, bias, out_features, features_first_in, features_first_out, activation
):
    """What fxsparse::native_linear computes, in torch ops: the CSR weight densified, then F.linear and the
    activation of code ``activation`` (ACTIVATIONS)."""
    if features_first_in:
        x = x.movedim(0, -1)
    weight = _densify(offsets, indices, weights, (out_features, x.shape[-1]))
    out = F.linear(x, weight.to(x.dtype), bias)
    out = activated(out, {code: name for name, code in ACTIVATIONS.items()}[activation])
    return out.movedim(-1, 0).contiguous() if features_first_out else out


def _densify(offsets: Tensor, indices: Tensor, weights: Tensor, shape: tuple[int, int]) -> Tensor:
    dense = torch.zeros(shape, dtype=weights.dtype)
    rows = torch.repeat_interleave(torch.arange(shape[0]), offsets.to(torch.int64).diff(), output_size=weights.numel())
    dense[rows, indices.to(torch.int64)] = weights
    return dense


def _native_conv2d(
    x, indices, offsets, weights, bias, residual, out_channels, groups, kernel_size, stride, padding, dilation, relu
):
    args = (x, indices, offsets, weights, bias, residual, out_channels, groups, kernel_size, stride, padding, dilation)
    module = native.kernels()
    if module is None:
        return native_conv2d_reference(*args, relu)
    return _compiled_conv2d(module, *args, relu)


def _compiled_conv2d(
    module,
    x,
    indices,
    offsets,
    weights,
    bias,
    residual,
    out_channels,
    groups,
    kernel_size,
    stride,
    padding,
    dilation,
    relu,
):
    if residual is not None:
        residual = residual.contiguous()
    return module.conv2d(
        x, indices, offsets, weights, bias, residual, out_channels, groups, kernel_size, stride, padding, dilation, relu
    )


def _native_linear(x, indices, offsets, weights, bias, out_features, features_first_in, features_first_out, activation):
    args = (x, indices, offsets, weights, bias, out_features, features_first_in, features_first_out, activation)
    module = native.kernels()
    return native_linear_reference(*args) if module is None else module.linear(*args)


def _eager_kernels(x: Tensor):
    """The compiled kernels' module when a call on x may skip the torch.library op, else None: an eager call on a
    plain float32 tensor outside autograd. The op's dispatch and Python wrapper cost about 10 us a call, 0.5-1 ms
    of ResNet-50's 54 layers; torch.fx, torch.compile, torch.export (proxies, fake or functional tensors) and
    torch.jit.trace still see the op."""
    if _is_compiling() or type(x) is not torch.Tensor or x.requires_grad or x.dtype != torch.float32:
        return None
    if torch.jit.is_tracing():
        return None
    return native.kernels()


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def native_conv2d(
    x, indices, offsets, weights, bias, residual, out_channels, groups, kernel_size, stride, padding, dilation, relu
) -> Tensor:
    """fxsparse::native_conv2d, called straight on the compiled kernel when _eager_kernels allows."""
    module = _eager_kernels(x)
    args = (x, indices, offsets, weights, bias, residual, out_channels, groups, kernel_size, stride, padding, dilation)
    if module is not None:
        return _compiled_conv2d(module, *args, relu)
    return torch.ops.fxsparse.native_conv2d(*args, relu)


def native_linear(
    x, indices, offsets, weights, bias, out_features, features_first_in, features_first_out, activation
) -> Tensor:
    """fxsparse::native_linear, called straight on the compiled kernel when _eager_kernels allows."""
    module = _eager_kernels(x)
    args = (x, indices, offsets, weights, bias, out_features, features_first_in, features_first_out, activation)
    if module is not None:
        return module.linear(*args)
    return torch.ops.fxsparse.native_linear(*args)


def _native_max_pool2d(x, kernel_size, stride, padding):
    """F.max_pool2d (dilation 1, floor mode) on the compiled kernel for float32 inputs (torch's own elsewhere)."""
    module = native.kernels()
    if module is None or x.dtype != torch.float32 or x.dim() != 4:
        return F.max_pool2d(x, kernel_size, stride, padding)
    return module.max_pool2d(x, kernel_size, stride, padding)


def _native_max_pool2d_fake(x, kernel_size, stride, padding):
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    return x.new_empty((*x.shape[:-2], (x.shape[-2] + 2 * ph - kh) // sh + 1, (x.shape[-1] + 2 * pw - kw) // sw + 1))


def _native_conv2d_fake(
    x, indices, offsets, weights, bias, residual, out_channels, groups, kernel_size, stride, padding, dilation, relu
):
    ho, wo = conv_output_size(x.shape[-2:], kernel_size, stride, padding, dilation)
    return x.new_empty((x.shape[0], out_channels, ho, wo))


def _native_linear_fake(
    x, indices, offsets, weights, bias, out_features, features_first_in, features_first_out, activation
):
    return _linear_fake(x, indices, offsets, weights, bias, out_features, features_first_in, features_first_out, "")


_LIBRARY.impl("conv2d", _conv2d, "CPU")
_LIBRARY.impl("native_conv2d", _native_conv2d, "CPU")
_LIBRARY.impl("native_linear", _native_linear, "CPU")
_LIBRARY.impl("native_max_pool2d", _native_max_pool2d, "CPU")
torch.library.register_fake("fxsparse::native_max_pool2d", _native_max_pool2d_fake, lib=_LIBRARY)
torch.library.register_fake("fxsparse::native_conv2d", _native_conv2d_fake, lib=_LIBRARY)
torch.library.register_fake("fxsparse::native_linear", _native_linear_fake, lib=_LIBRARY)
_LIBRARY.impl("linear", _linear, "CPU")
torch.library.register_fake("fxsparse::conv2d", _conv2d_fake, lib=_LIBRARY)
torch.library.register_fake("fxsparse::linear", _linear_fake, lib=_LIBRARY)


# ------------------------------------------------------------------------------------------------
# bags: the CSR of each layout, built once per layer from the weight's CSR
# ------------------------------------------------------------------------------------------------
def _index_dtype(*bounds: int) -> torch.dtype:
    """int32 when every index and offset fits (what MKL's LP64 interface takes), else int64."""
    return torch.int32 if max(bounds) < 2**31 else torch.int64


def _bag_index_dtype(crow: Tensor, ones_row: int) -> torch.dtype:
    """The index dtype of the bags of a CSR weight with a bias entry per row, over a table of ones_row + 1 rows."""
    rows = crow.numel() - 1
    return _index_dtype(ones_row + 1, int(crow[-1]) + rows)


def _csr_bags(
    crow: Tensor, index: Tensor, values: Tensor, bias: Tensor | None, ones_row: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(indices, offsets, weights): the weight's CSR rows as bags, with ``index`` (increasing within each row,
    as the CSR columns) as table rows, and each row's bias entry last, on the row of ones (if there is a bias).
    Beyond the result, the temporaries are one byte per entry (a mask), so building a model's bags layer by
    layer stays close to the size of the bags."""
    crow = crow.to(torch.int64)
    rows = crow.numel() - 1
    dtype = _bag_index_dtype(crow, ones_row)
    if bias is None:
        return index.to(dtype), crow.to(dtype), values.contiguous()
    offsets = crow + torch.arange(rows + 1)
    stored = torch.ones(index.numel() + rows, dtype=torch.bool)
    stored[offsets[1:] - 1] = False  # each bag's last entry is its bias, on the row of ones
    indices = torch.full((index.numel() + rows,), ones_row, dtype=dtype).masked_scatter_(stored, index.to(dtype))
    weights = torch.empty(index.numel() + rows, dtype=values.dtype).masked_scatter_(stored, values)
    weights[offsets[1:] - 1] = bias.detach().to(values.dtype)
    return indices, offsets.to(dtype), weights


def split_bias(bags: tuple[Tensor, Tensor, Tensor], ones_row: int) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
    """(the bags without their entries on the table's row of ones, the bias those entries carried)."""
    indices, offsets, weights = bags
    on_ones = indices == ones_row
    bag = csr_rows(offsets)
    bias = torch.zeros(offsets.numel() - 1, dtype=weights.dtype)
    bias[bag[on_ones]] = weights[on_ones]
    kept = torch.bincount(bag[~on_ones], minlength=offsets.numel() - 1)
    new_offsets = torch.zeros_like(offsets, dtype=torch.int64)
    torch.cumsum(kept, 0, out=new_offsets[1:])
    return (indices[~on_ones], new_offsets.to(offsets.dtype), weights[~on_ones]), bias


def csr_rows(crow: Tensor) -> Tensor:
    """The row of every stored entry of a CSR matrix."""
    crow = crow.to(torch.int64)
    return torch.repeat_interleave(torch.arange(crow.numel() - 1), crow.diff())


def _conv_taps(
    crow: Tensor, col: Tensor, in_channels: int, groups: int, kernel_size: Sequence[int], start: int, stop: int
):
    """(row, global input channel, tap row i, tap column j) of every stored entry of rows [start, stop) of a conv
    weight's (O, C/groups * kh * kw) CSR view (crow in int64)."""
    kh, kw = kernel_size
    out_channels = crow.numel() - 1
    rows = torch.repeat_interleave(torch.arange(start, stop), crow[start : stop + 1].diff())
    col = col[int(crow[start]) : int(crow[stop])].to(torch.int64)
    channel = col // (kh * kw) + (rows // (out_channels // groups)) * (in_channels // groups)
    tap = col % (kh * kw)
    return rows, channel, tap // kw, tap % kw


def dense_bags(
    crow: Tensor, col: Tensor, values: Tensor, bias: Tensor | None, columns: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Bags of a linear layer's (out, columns) CSR weight over linear_table: one per output feature."""
    return _csr_bags(crow, col.to(torch.int64), values, bias, columns)


def im2col_bags(
    crow: Tensor,
    col: Tensor,
    values: Tensor,
    bias: Tensor | None,
    in_channels: int,
    groups: int,
    kernel_size: Sequence[int],
) -> tuple[Tensor, Tensor, Tensor]:
    """Bags of a conv weight over im2col_table: one per output channel."""
    kh, kw = kernel_size
    ones_row = in_channels * kh * kw
    # the table row of tap (channel, i, j), (channel * kh + i) * kw + j, is the weight's column plus its
    # group's first row: increasing within a row, and computed in the bags' own dtype
    index = col.to(_bag_index_dtype(crow, ones_row))
    if groups > 1:
        group = csr_rows(crow) // ((crow.numel() - 1) // groups)
        index = index + (group * (in_channels // groups * kh * kw)).to(index.dtype)  # col itself stays as it is
    return _csr_bags(crow, index, values, bias, ones_row)


ROWS_BLOCK_ENTRIES = 2**17  # rows_bags works on blocks of output channels of about this many entries


def rows_bags(
    crow: Tensor,
    col: Tensor,
    values: Tensor,
    bias: Tensor | None,
    in_channels: int,
    groups: int,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    input_size: Sequence[int],
) -> tuple[Tensor, Tensor, Tensor]:
    """Bags of a conv weight over rows_table for (H, W) inputs: one per (output channel, output row).

    Built block of output channels by block, so the temporaries stay small next to the result.
    """
    kw, h = kernel_size[1], input_size[0]
    ho = conv_output_size(input_size, kernel_size, stride, padding, dilation)[0]
    out_channels = crow.numel() - 1
    ones_row = in_channels * kw * h
    y = torch.arange(ho)
    crow64 = crow.to(torch.int64)
    indices, weights, counts = [], [], []
    start = 0
    while start < out_channels:  # a block of output channels [start, stop)
        stop = start + 1
        while (
            stop < out_channels
            and (int(crow64[stop + 1]) - int(crow64[start]) + stop + 1 - start) * ho <= ROWS_BLOCK_ENTRIES
        ):
            stop += 1
        rows, channel, i, j = _conv_taps(crow64, col, in_channels, groups, kernel_size, start, stop)
        base = (channel * kw + j) * h  # the table row of each entry's tap for input row 0
        source_row = y[None, :] * stride[0] + (i * dilation[0] - padding[0])[:, None]  # (entries, Ho)
        entry, out_row = ((source_row >= 0) & (source_row < h)).nonzero(as_tuple=True)
        bag = (rows[entry] - start) * ho + out_row
        index = base[entry] + source_row[entry, out_row]
        weight = values[int(crow64[start]) : int(crow64[stop])][entry]
        if bias is not None:
            every = torch.arange((stop - start) * ho)
            bag = torch.cat([bag, every])
            index = torch.cat([index, torch.full_like(every, ones_row)])
            weight = torch.cat([weight, bias[start:stop].detach().to(values.dtype).repeat_interleave(ho)])
        order = torch.argsort(bag * (ones_row + 1) + index)
        dtype = _index_dtype(ones_row + 1, (int(crow64[-1]) + out_channels) * ho)
        indices.append(index[order].to(dtype))
        weights.append(weight[order])
        counts.append(torch.bincount(bag, minlength=(stop - start) * ho))
        start = stop
    offsets = torch.zeros(out_channels * ho + 1, dtype=torch.int64)
    torch.cumsum(torch.cat(counts), 0, out=offsets[1:])
    index_dtype = indices[0].dtype
    return torch.cat(indices), offsets.to(index_dtype), torch.cat(weights)


def rows_bag_entries(nnz: int, output_height: int) -> int:
    """An upper bound on the entries rows_bags builds (its memory is ~8 bytes per entry)."""
    return nnz * output_height


__all__ = [
    "KERNELS",
    "CONV_LAYOUTS",
    "NATIVE",
    "DIRECT",
    "NATIVE_CONV_PATH",
    "check_input_size",
    "native_conv2d_reference",
    "native_linear_reference",
    "native_conv2d",
    "native_linear",
    "conv_output_size",
    "linear_table",
    "im2col_table",
    "rows_table",
    "bag_product",
    "dense_bags",
    "im2col_bags",
    "rows_bags",
    "csr_rows",
    "rows_bag_entries",
    "split_bias",
    "token_chunk",
]
