"""The compiled sparse kernels (fxsparse/inference/csrc, native.py): every instruction-set path equal to the
torch reference (ops.native_*_reference) and to the folded model, over conv geometries, batch sizes, thread
counts, layouts and dtypes; fused epilogues; Conv1D (GPT-2); compile/export; and the fallback without them."""

import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse.export import to_csr
from fxsparse.inference import SparseConv2d, SparseLinear, native, ops
from fxsparse.inference.layers import features_first_table

from test_inference import prefer
from test_inference import prune_ as prune_at_random_

kernels = native.kernels()
pytestmark = pytest.mark.skipif(kernels is None, reason=f"compiled kernels unavailable: {native.failure()}")


def _supported_isas() -> list[str]:
    if kernels is None:
        return []
    found = []
    for isa in ("avx512", "avx2", "portable"):
        try:
            kernels.force_isa(isa)
            found.append(isa)
        except RuntimeError:
            pass
    kernels.force_isa("auto")
    return found


ISAS = _supported_isas()


# (instruction set, threads): every vector path, and the best one at 1 and 2 threads
ISA_THREADS = [
    (isa, threads) for isa in ISAS for threads in ((1, 2) if isa == ISAS[0] else (2 if isa == "avx2" else 1,))
]


@pytest.fixture(params=ISA_THREADS, ids=[f"{isa}-{t}threads" for isa, t in ISA_THREADS])
def isa(request):
    before = torch.get_num_threads()
    kernels.force_isa(request.param[0])
    torch.set_num_threads(request.param[1])
    yield request.param
    kernels.force_isa("auto")
    torch.set_num_threads(before)


@pytest.fixture(params=[1, 2])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    if ref.numel() == 0:
        return 0.0
    return float((out - ref).abs().max()) / max(float(ref.abs().max()), 1e-12)


def sparse_weight(shape, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < density)


def csr32(weight):
    crow, col, values = to_csr(weight.reshape(weight.shape[0], -1))
    return col.to(torch.int32), crow.to(torch.int32), values


# ------------------------------------------------------------------------------------------------
# the ops against F.conv2d / F.linear and the torch reference
# ------------------------------------------------------------------------------------------------
CONVS = {  # name: (in, out, kernel, stride, padding (t, b, l, r), dilation, groups, input (H, W))
    "1x1": (6, 10, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, (7, 9)),
    "1x1-large": (5, 7, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, (17, 16)),  # no copy (rows of whole cache lines)
    "1x1-strided": (6, 10, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1, (9, 9)),
    "1x1-strided-large": (5, 7, (1, 1), (2, 3), (0, 0, 0, 0), (1, 1), 1, (35, 50)),  # 18 x 17 outputs, any batch
    "1x1-strided-grouped": (6, 9, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 3, (10, 7)),
    "3x3": (6, 10, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, (9, 8)),
    "3x3-strided": (6, 10, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1, (11, 10)),
    "3x3-strided-large": (4, 5, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1, (40, 34)),  # > 256 outputs: batch folded
    "5x3-stride-2x1": (4, 5, (5, 3), (2, 1), (0, 0, 0, 0), (1, 1), 1, (12, 9)),
    "dilated": (6, 8, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 1, (10, 10)),
    "dilated-strided": (3, 4, (3, 3), (2, 3), (1, 2, 0, 3), (2, 3), 1, (13, 14)),
    "grouped": (6, 9, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 3, (8, 8)),
    "depthwise": (6, 6, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 6, (8, 8)),
    "7x7-stem": (3, 8, (7, 7), (2, 2), (3, 3, 3, 3), (1, 1), 1, (17, 15)),
    "asymmetric-same": (4, 5, (4, 4), (1, 1), (1, 2, 1, 2), (1, 1), 1, (9, 8)),
    "kernel-equals-input": (3, 4, (3, 3), (1, 1), (0, 0, 0, 0), (1, 1), 1, (3, 3)),
    "1x1-padded-rows": (20, 12, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, (7, 9)),  # rows of 63 floats, padded to 64
    # enough input channels for several channel blocks (a block's slice of x fits in L1)
    "3x3-channel-blocks": (100, 9, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, (19, 21)),
    "grouped-channel-blocks": (200, 6, (3, 3), (2, 1), (1, 0, 1, 1), (1, 1), 2, (15, 17)),
    # 1x1 convs with enough nonzeros a row for channel blocks (at 30% density and dense; over 256 outputs)
    "1x1-channel-blocks": (256, 6, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, (17, 17)),
    "1x1-strided-grouped-channel-blocks": (256, 4, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 2, (36, 35)),
    "1x1-channel-blocks-small-map": (256, 6, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, (12, 12)),  # 144 outputs
    "1x1-no-channel-blocks": (40, 6, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, (17, 17)),  # one block's worth
}


def conv_reference(x, weight, bias, stride, sides, dilation, groups):
    pt, pb, pl, pr = sides
    return F.conv2d(F.pad(x, (pl, pr, pt, pb)), weight, bias, stride, 0, dilation, groups)


@pytest.mark.parametrize("name", list(CONVS))
@pytest.mark.parametrize("batch", [0, 1, 3])
def test_native_conv_equals_conv2d(name, batch, isa):
    cin, cout, kernel, stride, sides, dilation, groups, (h, w) = CONVS[name]
    # 0% and 100% sparse layers too, and pruned output channels (empty rows, stored apart from the tiles)
    for density, bias, pruned in [(0.3, True, False), (0.3, True, True), (0.0, True, False), (1.0, False, False)]:
        weight = sparse_weight((cout, cin // groups, *kernel), density)
        if pruned:
            weight[::2] = 0
        b = torch.randn(cout) if bias else None
        x = torch.randn(batch, cin, h, w)
        ref = conv_reference(x, weight, b, stride, sides, dilation, groups)
        args = (*csr32(weight), b, None, cout, groups, list(kernel), list(stride), list(sides), list(dilation))
        out = torch.ops.fxsparse.native_conv2d(x, *args, False)
        assert rel_error(out, ref) <= 1e-5, (name, density)
        assert rel_error(ops.native_conv2d_reference(x, *args, False), ref) <= 1e-5
        residual = torch.randn_like(ref)
        fused = torch.ops.fxsparse.native_conv2d(x, *args[:4], residual, *args[5:], True)
        assert rel_error(fused, (ref + residual).relu()) <= 1e-5
        if batch:
            channels_last = x.contiguous(memory_format=torch.channels_last)
            assert rel_error(torch.ops.fxsparse.native_conv2d(channels_last, *args, False), ref) <= 1e-5


def test_native_conv_every_column_tile_width(isa):
    """Rows of 1 to 2 tiles and a bit of columns: every tile width the vector code instantiates (1 to 8 AVX-512
    registers, 1 to 10 AVX2 registers, with and without a tail mask), alone and after full tiles."""
    weight = sparse_weight((7, 5, 1, 1), 0.6)
    bias = torch.randn(7)
    args = (*csr32(weight), bias, None, 7, 1, [1, 1], [1, 1], [0, 0, 0, 0], [1, 1], False)
    for width in range(1, 2 * 128 + 18):
        x = torch.randn(1, 5, 1, width)
        out = torch.ops.fxsparse.native_conv2d(x, *args)
        assert rel_error(out, F.conv2d(x, weight, bias)) <= 1e-5, width


@pytest.mark.parametrize("kernel", [1, 3])
def test_native_conv_offsets_kept_between_calls_follow_input_size_and_weight(kernel):
    """The offsets the kernel keeps per weight (prepared()) are rebuilt for another input size, and for the same
    index tensor changed in place."""
    weight = sparse_weight((8, 5, kernel, kernel), 0.4)
    col, crow, values = csr32(weight)
    args = (crow, values, None, None, 8, 1, [kernel, kernel], [1, 1], [0, 0, 0, 0], [1, 1], False)
    for shape in [(1, 5, 9, 9), (2, 5, 7, 6), (1, 5, 9, 9), (1, 5, 12, 5), (1, 5, 9, 9)]:
        x = torch.randn(shape)
        assert rel_error(torch.ops.fxsparse.native_conv2d(x, col, *args), F.conv2d(x, weight)) <= 1e-5, shape
    flipped = weight.flip(1)  # the same nonzeros per row, at other columns
    flipped_col, flipped_crow, flipped_values = csr32(flipped)
    assert torch.equal(flipped_crow, crow) and not torch.equal(flipped_col, col)
    col.copy_(flipped_col)
    values.copy_(flipped_values)
    assert rel_error(torch.ops.fxsparse.native_conv2d(x, col, *args), F.conv2d(x, flipped)) <= 1e-5


@pytest.mark.parametrize("kernel", [1, 3])
def test_native_conv_channel_blocks_follow_the_weight_values(kernel, isa):
    """With channel blocks the kernel keeps the weight's values reordered block by block (prepared()): values
    changed in place, and another values tensor beside the same indices, are what it multiplies next."""
    weight = sparse_weight((9, 256, kernel, kernel), 0.5)
    col, crow, values = csr32(weight)
    args = (None, None, 9, 1, [kernel, kernel], [1, 1], [kernel // 2] * 4, [1, 1], False)
    x = torch.randn(2, 256, 15, 15)
    ref = F.conv2d(x, weight, padding=kernel // 2)
    assert rel_error(torch.ops.fxsparse.native_conv2d(x, col, crow, values, *args), ref) <= 1e-5
    values.mul_(-2.0)
    assert rel_error(torch.ops.fxsparse.native_conv2d(x, col, crow, values, *args), -2.0 * ref) <= 1e-5
    other = values.clone().mul_(0.25)
    assert rel_error(torch.ops.fxsparse.native_conv2d(x, col, crow, other, *args), -0.5 * ref) <= 1e-5
    assert rel_error(torch.ops.fxsparse.native_conv2d(x, col, crow, values, *args), -2.0 * ref) <= 1e-5


def test_native_conv_packs_only_the_channels_its_weight_reads(threads):
    """A direct conv packs only the input channels some nonzero reads: the others, left as the pooled buffer
    had them (here NaN from an earlier call of the same geometry), are never read."""
    x_nan = torch.full((1, 8, 64, 64), float("nan"))
    dense = sparse_weight((4, 8, 3, 3), 1.0)
    geometry = (4, 1, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], False)
    assert torch.ops.fxsparse.native_conv2d(x_nan, *csr32(dense), None, None, *geometry).isnan().all()
    few = torch.zeros(4, 8, 3, 3)
    few[0, 1, 0, 2], few[2, 5, 1, 1], few[3, 5, 2, 0] = 1.5, -2.0, 0.5  # channels 1 and 5 only
    x = torch.randn(1, 8, 64, 64)
    bias = torch.randn(4)
    out = torch.ops.fxsparse.native_conv2d(x, *csr32(few), bias, None, *geometry)
    assert rel_error(out, F.conv2d(x, few, bias, padding=1)) <= 1e-5


def test_native_conv_input_smaller_than_kernel_raises_like_conv2d():
    weight = sparse_weight((4, 3, 3, 3), 0.5)
    x = torch.randn(1, 3, 2, 2)
    with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
        F.conv2d(x, weight)
    args = (*csr32(weight), None, None, 4, 1, [3, 3], [1, 1], [0, 0, 0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
        torch.ops.fxsparse.native_conv2d(x, *args)
    with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
        kernels.conv2d(x, *args)  # the extension checks too


# (1, 130): at two threads each thread transposes the input into a table of its own; (10600,): a table over
# OWN_TABLE_BYTES (2 MiB), transposed once and shared; rows padded to 16 floats except at (2, 16): 32 tokens
@pytest.mark.parametrize("lead", [(), (0,), (3,), (2, 3), (1, 130), (2, 16), (2, 0, 4), (10600,)])
@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32])
def test_native_linear_equals_linear(lead, index_dtype, isa):
    for density, bias, pruned in [(0.2, True, False), (0.2, True, True), (0.0, False, False), (1.0, True, False)]:
        weight = sparse_weight((37, 50), density)
        if pruned:  # every other output feature empty
            weight[1::2] = 0
        b = torch.randn(37) if bias else None
        x = torch.randn(*lead, 50)
        ref = F.linear(x, weight, b)
        col, crow, values = csr32(weight)
        for first_in in (False, True):
            for first_out in (False, True):
                for activation, want in ((None, ref), ("relu", ref.relu()), ("gelu", F.gelu(ref))):
                    given = x.movedim(-1, 0).contiguous() if first_in else x
                    code = ops.ACTIVATIONS[activation]
                    args = (given, col.to(index_dtype), crow, values, b, 37, first_in, first_out, code)
                    out = torch.ops.fxsparse.native_linear(*args)
                    want = want.movedim(-1, 0).contiguous() if first_out else want
                    assert rel_error(out, want) <= 1e-5, (lead, density, first_in, first_out, activation)
                    assert rel_error(ops.native_linear_reference(*args), want) <= 1e-5


@pytest.mark.parametrize("tokens", [1, 2, 4])
@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32])
def test_gathered_rows_of_every_length_equal_linear(tokens, index_dtype, isa):
    """The decode path (up to 4 tokens): rows of 0 to 40 nonzeros, so every split into whole registers of the
    vector gathers (16 and 8 nonzeros at a time on AVX2, 32 and 16 on AVX-512) and a scalar or masked tail."""
    weight = torch.zeros(41, 300)
    generator = torch.Generator().manual_seed(tokens)
    for row in range(41):
        columns = torch.randperm(300, generator=generator)[:row]
        weight[row, columns] = torch.randn(row, generator=generator)
    b = torch.randn(41)
    x = torch.randn(tokens, 300)
    col, crow, values = csr32(weight)
    args = (x, col.to(index_dtype), crow, values, b, 41, False, False, ops.ACTIVATIONS["relu"])
    assert rel_error(torch.ops.fxsparse.native_linear(*args), F.linear(x, weight, b).relu()) <= 1e-5


# from half a column tile of tokens (64 on AVX-512) the table is read in blocks of inputs, 128 a block on AVX-512
# (700 inputs: five whole blocks and a partial one); 40 tokens: whole tables
@pytest.mark.parametrize("tokens", [40, 64, 128, 200])
def test_native_linear_over_blocks_of_inputs_equals_linear(tokens, isa):
    inputs = 700
    for density, pruned in [(0.1, False), (0.5, True), (0.02, False)]:
        weight = sparse_weight((70, inputs), density)
        if pruned:  # every third output feature empty
            weight[::3] = 0
        weight[5, :] = 0
        weight[5, inputs - 1] = 2.0  # a row whose only nonzero is in the last block
        b = torch.randn(70)
        x = torch.randn(tokens, inputs)
        ref = F.linear(x, weight, b)
        col, crow, values = csr32(weight)
        for first_in in (False, True):
            for first_out in (False, True):
                for activation, want in ((None, ref), ("gelu", F.gelu(ref))):
                    given = x.t().contiguous() if first_in else x
                    code = ops.ACTIVATIONS[activation]
                    args = (given, col.to(torch.int16), crow, values, b, 70, first_in, first_out, code)
                    want = want.t().contiguous() if first_out else want
                    for _ in range(2):  # the blocks are built on the first call and kept
                        assert rel_error(torch.ops.fxsparse.native_linear(*args), want) <= 1e-5, (density, first_in)


@pytest.mark.parametrize("tokens", [3, 40])  # the gathered path (up to 4 tokens) and the product
def test_gelu_epilogue_is_torchs_exact_gelu_over_the_whole_range(tokens, isa):
    """The vector GELU (erfc by Abramowitz & Stegun 7.1.26, e^x by its series, 0 below e^-80) against float64's
    exact x Phi(x), from far below zero (where GELU is a tiny negative number) to far above, and inf / NaN."""
    z = torch.cat([torch.linspace(-60, 60, 24001), torch.tensor([-1e30, 1e30, float("inf"), float("nan")])])
    ones = torch.ones(1, 1)
    out = torch.cat(
        [
            torch.ops.fxsparse.native_linear(chunk.view(-1, 1), *csr32(ones), None, 1, False, False, 2).view(-1)
            for chunk in z.split(tokens)
        ]
    )
    exact = F.gelu(z.double())
    finite = z.abs() < 1e30
    error = (out[finite].double() - exact[finite]).abs() / exact[finite].abs().clamp_min(1.0)
    assert error.max() <= 3e-7  # torch's own float32 GELU: 9e-7
    assert out[-4] == 0.0 and out[-3] == 1e30 and out[-2] == float("inf") and out[-1].isnan()


def test_native_ops_fake_kernels_match_real_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    weight = sparse_weight((6, 2, 3, 3), 0.5)
    x = torch.randn(2, 4, 9, 7)
    args = (*csr32(weight), None, None, 6, 2, [3, 3], [2, 1], [1, 1, 0, 2], [1, 2], True)
    real = torch.ops.fxsparse.native_conv2d(x, *args)
    linear_args = (*csr32(sparse_weight((5, 7), 0.5)), None, 5, False, True, 0)
    real_linear = torch.ops.fxsparse.native_linear(torch.randn(3, 4, 7), *linear_args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = torch.ops.fxsparse.native_conv2d(mode.from_tensor(x), *args)
        fake_linear = torch.ops.fxsparse.native_linear(mode.from_tensor(torch.randn(3, 4, 7)), *linear_args)
    assert fake.shape == real.shape and fake_linear.shape == real_linear.shape == (5, 3, 4)


# ------------------------------------------------------------------------------------------------
# accelerate on the compiled kernels: equal to the folded model
# ------------------------------------------------------------------------------------------------
def prune_(model: nn.Module, density: float = 0.3) -> nn.Module:
    return prune_at_random_(model, density, seed=0)


def native_only(candidates):
    """A timer under which the compiled kernel wins everywhere."""
    return {name: 1.0 if "native" in name else 2.0 if name == "dense" else 3.0 for name in candidates}


class Block(nn.Module):
    """A ResNet bottleneck: conv-BN-ReLU twice, conv-BN, + shortcut (a strided 1x1 conv), ReLU."""

    def __init__(self, cin=6, mid=4, cout=8, stride=2):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = nn.Conv2d(cin, cout, 1, stride)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        shortcut = x
        x = self.act(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        x += self.down(shortcut)
        return self.act(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.block = Block()
        self.head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))

    def forward(self, x):
        return self.head(self.block(torch.relu(self.stem(x))).mean((2, 3)))


def test_accelerate_native_equals_folded_with_fused_epilogues(threads):
    model = prune_(Net())
    x = torch.randn(2, 3, 10, 11)
    fast = fxsparse.accelerate(model, x, timer=native_only)
    plan = {p.name: p for p in fast.fxsparse_plan.layers}
    assert {p.path for p in plan.values()} == {"direct+native", "native"}
    fused = {name for name, p in plan.items() if "fused epilogue" in p.reason}
    assert {"stem", "block.conv1", "block.conv2", "block.conv3", "head.0"} <= fused
    assert fast.block.conv3.activation == "relu" and fast.block.down.activation is None
    assert "add" not in str(fast.code) and "relu" not in str(fast.code)  # all in the kernels' epilogues
    with torch.no_grad():
        for shape in [(2, 3, 10, 11), (1, 3, 7, 6), (3, 3, 16, 9)]:  # other sizes than planned
            x = torch.randn(shape)
            assert rel_error(fast(x), model(x)) <= 1e-5
        empty = fast(torch.randn(0, 3, 10, 11))
        assert empty.shape == model(torch.randn(0, 3, 10, 11)).shape == (0, 5)
        x = torch.randn(2, 3, 10, 11).contiguous(memory_format=torch.channels_last)
        assert rel_error(fast(x), model(x)) <= 1e-5


class ConvThroughIdentities(nn.Module):
    """conv - BN - Identity - ReLU, as timm's bottleneck (conv2, bn2, drop_block, act2): the ReLU is still fused."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.drop, self.act = (
            nn.Conv2d(4, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.Identity(),
            nn.ReLU(),
        )

    def forward(self, x):
        return self.act(self.drop(self.bn(self.conv(x))))


def test_relu_after_identities_is_fused_unless_an_identity_has_a_hook():
    model = prune_(ConvThroughIdentities())
    x = torch.randn(2, 4, 9, 8)
    fast = fxsparse.accelerate(model, x, timer=native_only)
    assert "fused epilogue" in fast.fxsparse_plan.layers[0].reason and "relu" not in str(fast.code)
    with torch.no_grad():
        assert rel_error(fast(x), model(x)) <= 1e-5
    seen = []
    model.drop.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    fast = fxsparse.accelerate(model, x, timer=native_only)
    assert "fused epilogue" not in fast.fxsparse_plan.layers[0].reason
    seen.clear()
    with torch.no_grad():
        assert rel_error(fast(x), model(x)) <= 1e-5
    assert len(seen) == 2  # the accelerated model's call and the model's


def test_accelerate_small_input_raises_like_folded_model():
    model = prune_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)))
    for path in ({"0": "direct+native", "2": "direct+native"}, {"0": "im2col+ebag", "2": "rows+ebag"}):
        fast = fxsparse.accelerate(model, torch.randn(1, 3, 8, 8), paths=path)
        with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
            model(torch.randn(1, 3, 4, 4))
        with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
            fast(torch.randn(1, 3, 4, 4))


def test_accelerate_empty_batch_on_every_path():
    model = prune_(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 36, 5)))
    x = torch.randn(1, 3, 6, 6)
    for conv, linear in [("direct+native", "native"), ("im2col+ebag", "ebag"), ("rows+mkl", "mkl")]:
        fast = fxsparse.accelerate(model, x, paths={"0": conv, "2": linear})
        with torch.no_grad():
            assert fast(torch.randn(0, 3, 6, 6)).shape == (0, 5)
            assert fast[2](torch.randn(0, 4 * 36)).shape == (0, 5)


def test_padding_modes_other_than_zeros_stay_dense():
    model = prune_(nn.Sequential(*[nn.Conv2d(3, 3, 3, padding=1, padding_mode=m) for m in ("reflect", "circular")]))
    x = torch.randn(1, 3, 7, 7)
    fast = fxsparse.accelerate(model, x, timer=native_only)
    assert all(p.path == "dense" for p in fast.fxsparse_plan.layers)
    with torch.no_grad():
        assert rel_error(fast(x), model(x)) <= 1e-6


def test_other_dtypes_run_in_float32_with_a_warning():
    model = prune_(Net())
    x = torch.randn(1, 3, 8, 8)
    fast = fxsparse.accelerate(model, x, timer=native_only)
    with torch.no_grad():
        want = model(x)
        with pytest.warns(UserWarning, match="compute in float32"):
            half = fast.half()(x.half())
        assert half.dtype == torch.float16 and rel_error(half.float(), want) <= 1e-2
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fast.float()(x)
        assert rel_error(out.float(), want) <= 3e-2


def test_rows_layout_alternating_heights_builds_bags_once_per_height(monkeypatch):
    model = prune_(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)))
    fast = fxsparse.accelerate(model, torch.randn(1, 3, 8, 8), paths={"0": "rows+ebag"})
    built = []
    real = ops.rows_bags
    monkeypatch.setattr(ops, "rows_bags", lambda *a, **k: built.append(a[-1]) or real(*a, **k))
    with torch.no_grad():
        for _ in range(3):
            for h in (8, 10, 12):
                x = torch.randn(1, 3, h, 8)
                assert rel_error(fast(x), model(x)) <= 1e-5
    assert sorted(built) == [(10, 8), (12, 8)]


# ------------------------------------------------------------------------------------------------
# transformers' Conv1D (GPT-2): converted, generate() gives the folded model's tokens
# ------------------------------------------------------------------------------------------------
def test_gpt2_conv1d_runs_sparse_and_generates_the_same_tokens():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=101, n_positions=64)
    torch.manual_seed(0)
    model = prune_(transformers.GPT2LMHeadModel(config).eval())
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "Conv1D":
                module.weight.mul_(torch.rand_like(module.weight) < 0.3)
    prompt = torch.randint(0, 101, (1, 5))
    fast = fxsparse.accelerate(model, {"input_ids": prompt}, timer=native_only)
    converted = [n for n, m in fast.named_modules() if isinstance(m, SparseLinear)]
    assert "transformer.h.0.attn.c_attn" in converted and "transformer.h.1.mlp.c_proj" in converted
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        got = fast.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(got, want)
        assert rel_error(fast(prompt).logits, model(prompt).logits) <= 1e-5


# ------------------------------------------------------------------------------------------------
# torch.compile and torch.export
# ------------------------------------------------------------------------------------------------
def test_native_export_round_trip_with_dynamic_height():
    model = prune_(Net())
    x = torch.randn(2, 3, 10, 11)
    fast = fxsparse.accelerate(model, x, timer=native_only)
    height = torch.export.Dim("height", min=4, max=64)
    program = torch.export.export(fast, (x,), dynamic_shapes=({2: height},))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"fxsparse.native_conv2d.default", "fxsparse.native_linear.default"} <= targets
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    with torch.no_grad():
        for h in (10, 17):
            x = torch.randn(2, 3, h, 11)
            assert rel_error(loaded(x), model(x)) <= 1e-5
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert rel_error(compiled(x), model(x)) <= 1e-5


@pytest.mark.skipif(
    tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 6),
    reason="torch < 2.6's export specialises the height of the rows layout's custom op",
)
def test_rows_layout_exports_with_dynamic_height():
    model = prune_(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()))
    x = torch.randn(1, 3, 8, 8)
    fast = fxsparse.accelerate(model, x, paths={"0": "rows+ebag"})
    program = torch.export.export(fast, (x,), dynamic_shapes=({2: torch.export.Dim("height", min=4, max=32)},))
    with torch.no_grad():
        for h in (8, 13):
            x = torch.randn(1, 3, h, 8)
            assert rel_error(program.module()(x), model(x)) <= 1e-5


# ------------------------------------------------------------------------------------------------
# without the compiled kernels: the torch-op kernels, with a one-line notice
# ------------------------------------------------------------------------------------------------
FALLBACK_SCRIPT = textwrap.dedent(
    """
    import warnings, torch, fxsparse
    from torch import nn
    from fxsparse.inference import native
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 36, 5)).eval()
    with torch.no_grad():
        for m in model:
            if hasattr(m, "weight"):
                m.weight.mul_(torch.rand_like(m.weight) < 0.2)
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = fxsparse.accelerate(model, x)
    notices = [str(w.message) for w in caught if "compiled sparse kernels" in str(w.message)
               or "torch-op kernels" in str(w.message)]
    assert len(notices) == 1 and "\\n" not in notices[0], notices
    assert native.kernels() is None
    assert all("native" not in p.path for p in fast.fxsparse_plan.layers)
    with torch.no_grad():
        assert (fast(x) - model(x)).abs().max() < 1e-4
    # a program using the native ops still runs, on the torch reference
    from fxsparse.export import to_csr
    w = torch.randn(4, 3, 3, 3)
    crow, col, val = to_csr(w.view(4, -1))
    out = torch.ops.fxsparse.native_conv2d(x, col.int(), crow.int(), val, None, None, 4, 1, [3, 3], [1, 1],
                                           [1, 1, 1, 1], [1, 1], False)
    assert (out - torch.nn.functional.conv2d(x, w, padding=1)).abs().max() < 1e-4
    print("fallback ok:", notices[0])
    """
)


@pytest.mark.parametrize("how", ["variable", "no-compiler"])
def test_fallback_without_compiled_kernels(how, tmp_path):
    env = dict(os.environ)
    if how == "variable":
        env[native.DISABLE_VARIABLE] = "1"
    else:  # a fresh build directory and no compiler to be found
        env["TORCH_EXTENSIONS_DIR"] = str(tmp_path)
        env["CXX"] = str(tmp_path / "no-such-compiler")
        env["CC"] = env["CXX"]
    result = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fallback ok" in result.stdout
    assert "WARNING" not in result.stderr, result.stderr[-3000:]  # the one-line notice, not torch's build banners


def test_sparse_layers_report_native_path():
    model = prune_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 16, 3)))
    fast = fxsparse.accelerate(model, torch.randn(1, 3, 6, 6), timer=native_only)
    assert isinstance(fast[0], SparseConv2d) and fast[0].kernel == "native" and fast[0].indices.dtype == torch.int32
    assert isinstance(fast[2], SparseLinear) and fast[2].indices.dtype == torch.int16  # compact decode indices


@pytest.mark.parametrize(
    "shape, kernel, stride, padding",
    [((1, 4, 12, 12), 3, 2, 1), ((2, 3, 9, 8), 3, 2, 1), ((1, 5, 7, 7), 2, 2, 0), ((0, 3, 9, 9), 3, 1, 1)]
    + [((1, 2, 10, 11), (3, 2), (1, 2), (1, 0)), ((1, 1, 3, 3), 3, 1, 0)]
    # rows of several vectors with tails, in the AVX-512 passes (strides 1 and 2) and the scalar one (stride 3)
    + [((2, 3, 8, 70), 3, 2, 1), ((1, 2, 5, 37), (2, 3), 1, (1, 1)), ((1, 2, 9, 50), 3, 3, 1)],
)
def test_native_max_pool_equals_max_pool2d(shape, kernel, stride, padding, isa):
    x = torch.randn(shape)
    if x.numel():
        x.view(-1)[3] = float("nan")  # propagates, as in torch
        x.view(-1)[-min(20, x.numel())] = float("nan")
    pair = nn.modules.utils._pair
    out = torch.ops.fxsparse.native_max_pool2d(x, list(pair(kernel)), list(pair(stride)), list(pair(padding)))
    ref = F.max_pool2d(x, kernel, stride, padding)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.nan_to_num(), ref.nan_to_num())


def test_accelerate_replaces_exact_max_pools():
    model = prune_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(2, ceil_mode=True)))
    x = torch.randn(2, 3, 11, 11)
    fast = fxsparse.accelerate(model, x, timer=native_only)
    assert type(fast[1]).__name__ == "MaxPool2d" and type(fast[1]) is not nn.MaxPool2d
    assert type(fast[2]) is nn.MaxPool2d  # ceil mode: torch's own
    with torch.no_grad():
        assert rel_error(fast(x), model(x)) <= 1e-5


def test_native_linear_without_inputs_gives_the_bias():
    empty = torch.zeros(5, 0)
    b = torch.randn(5)
    for first_out in (False, True):
        for activation, code in ops.ACTIVATIONS.items():
            out = torch.ops.fxsparse.native_linear(torch.randn(3, 0), *csr32(empty), b, 5, False, first_out, code)
            want = ops.activated(F.linear(torch.randn(3, 0), empty, b), activation)
            assert rel_error(out, want.t().contiguous() if first_out else want) <= 1e-7


@pytest.mark.parametrize("kernel, stride, size", [(1, 1, 30), (1, 2, 61), (3, 1, 30), (7, 2, 64)])
def test_pooled_buffers_never_overwrite_an_output_the_caller_holds(kernel, stride, size, threads):
    """Outputs and temporaries of 128 KiB and more come from a pool of buffers nobody references any more: an
    output still held keeps its values through later calls (1x1 rows padded to cache lines, strided 1x1, direct
    3x3 and a 7x7 stem whose packed input is split among threads)."""
    module = native.kernels()
    if module is None:
        pytest.skip("compiled kernels unavailable")
    cin, cout, pad = 40, 48, kernel // 2
    weight = sparse_weight((cout, cin, kernel, kernel), 0.2)
    args = (*csr32(weight), None, None, cout, 1, [kernel] * 2, [stride] * 2, [pad] * 4, [1, 1], False)
    inputs = [torch.randn(1, cin, size, size) for _ in range(3)]
    refs = [conv_reference(x, weight, None, [stride] * 2, [pad] * 4, (1, 1), 1) for x in inputs]
    kept = [ops.native_conv2d(inputs[0], *args), ops.native_conv2d(inputs[1], *args)]
    for _ in range(3):  # buffers of dropped outputs are handed out again
        assert rel_error(ops.native_conv2d(inputs[2], *args), refs[2]) <= 1e-5
    view = ops.native_conv2d(inputs[2], *args)[0, :1]  # a view keeps its buffer too
    for out, ref in zip(kept, refs):
        assert rel_error(out, ref) <= 1e-5
    assert rel_error(ops.native_conv2d(inputs[0], *args), refs[0]) <= 1e-5
    assert rel_error(view, refs[2][0, :1]) <= 1e-5
    assert kept[0].data_ptr() != kept[1].data_ptr() != view.data_ptr()
    assert module.release_buffers() >= 0 and module.release_buffers() == 0


def test_buffer_pool_limit_grows_with_the_largest_buffer():
    """The pool holds at most 128 MiB, or 8 times the largest buffer asked for (a large batch's activations);
    set_pool_limit fixes the limit (0: nothing pooled) and -1 restores it."""
    module = native.kernels()
    if module is None:
        pytest.skip("compiled kernels unavailable")
    weight = sparse_weight((4, 4, 1, 1), 0.5)
    args = (*csr32(weight), None, None, 4, 1, [1, 1], [1, 1], [0, 0, 0, 0], [1, 1], False)
    x = torch.randn(1, 4, 2400, 2400)  # 88 MiB outputs: two of them are more than 128 MiB
    module.release_buffers()
    try:
        assert module.set_pool_limit(0) == 128 * 2**20
        out = ops.native_conv2d(x, *args)
        del out
        assert module.release_buffers() == 0
        module.set_pool_limit(-1)
        kept = [ops.native_conv2d(x, *args) for _ in range(2)]
        assert rel_error(kept[0], F.conv2d(x, weight)) <= 1e-5
        assert module.release_buffers() == 2 * kept[0].numel() * 4
    finally:
        module.set_pool_limit(-1)
        module.release_buffers()
    with pytest.raises(RuntimeError, match="set_pool_limit"):
        module.set_pool_limit(-2)


def test_eager_calls_skip_the_op_only_outside_tracing_and_autograd():
    """A plain eager float32 call goes straight to the compiled kernel (no dispatch); a tensor that needs
    gradients, or a call under torch.compile / torch.export / torch.fx, goes through the torch.library op."""
    if native.kernels() is None:
        pytest.skip("compiled kernels unavailable")
    weight = sparse_weight((8, 6, 3, 3), 0.3)
    args = (*csr32(weight), None, None, 8, 1, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], True)
    x = torch.randn(2, 6, 9, 9)
    ref = conv_reference(x, weight, None, (1, 1), (1, 1, 1, 1), (1, 1), 1).relu()
    assert ops._eager_kernels(x) is native.kernels()
    assert ops._eager_kernels(x.requires_grad_()) is None
    assert ops._eager_kernels(x.detach().double()) is None
    traced = torch.fx.symbolic_trace(lambda x: ops.native_conv2d(x, *args))
    assert "fxsparse.native_conv2d" in traced.code
    assert rel_error(traced(x.detach()), ref) <= 1e-5
    jit = torch.jit.trace(lambda x: ops.native_conv2d(x, *args), x.detach(), check_trace=False)
    assert "fxsparse::native_conv2d" in str(jit.graph)
    with torch.no_grad():
        assert rel_error(ops.native_conv2d(x.detach(), *args), ref) <= 1e-5
    assert rel_error(ops.native_conv2d(x, *args).detach(), ref) <= 1e-5  # through the op


class UntraceableMlps(nn.Module):
    """fc1 -> GELU -> fc2 and a SwiGLU (silu(gate) * up -> down), then proj, whose output escapes to a
    LayerNorm, and head; data-dependent control flow keeps torch.fx out, as with transformers' models."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
        self.gate, self.up, self.down = nn.Linear(8, 24, bias=False), nn.Linear(8, 24), nn.Linear(24, 8)
        self.proj, self.norm, self.head = nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4)

    def forward(self, x):
        if x.sum() > float("-inf"):  # data-dependent: torch.fx cannot trace it
            x = x + self.fc2(F.gelu(self.fc1(x)))
        x = x + self.down(F.silu(self.gate(x)) * self.up(x))
        return self.head(self.norm(self.proj(x)))


def test_untraceable_linears_chain_through_elementwise_ops_as_views(threads):
    model = prune_at_random_(UntraceableMlps(), density=0.3, seed=0)
    x = torch.randn(2, 9, 8)
    fast = fxsparse.accelerate(model, x, timer=prefer("native"))
    assert fast.fxsparse_plan.chained_linears == [("fc1", "fc2"), ("gate", "down"), ("up", "down")]
    assert [n for n in ("fc1", "gate", "up", "proj") if fast.get_submodule(n).features_first_view_out] == [
        "fc1",
        "gate",
        "up",
    ]
    given = {}
    hooks = [
        fast.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: given.setdefault(n, a[0]))
        for n in ("fc2", "down", "head")
    ]
    for shape in [(2, 9, 8), (3, 1, 8), (1, 8), (0, 8)]:  # many tokens, the gathered path, 2-D, empty
        x = torch.randn(*shape)
        given.clear()
        with torch.no_grad():
            assert rel_error(fast(x), model(x)) <= 1e-5, shape
        if shape[0] * shape[-2] > 1:  # the producers' (out, ...) products arrive as they are, as views
            assert features_first_table(given["fc2"]) is not None and features_first_table(given["down"]) is not None
        assert given["head"].is_contiguous()
    for hook in hooks:
        hook.remove()


def test_untraceable_chains_are_dropped_when_the_outputs_differ(monkeypatch):
    from fxsparse.inference import chain

    monkeypatch.setattr(chain, "_close_outputs", lambda a, b: False)
    model = prune_at_random_(UntraceableMlps(), density=0.3, seed=0)
    fast = fxsparse.accelerate(model, torch.randn(2, 9, 8), timer=prefer("native"))
    assert fast.fxsparse_plan.chained_linears == []
    assert not any(getattr(m, "features_first_view_out", False) for m in fast.modules())


class GeluMlps(nn.Module):
    """Three linears each followed by a GELU module: exact (fused), tanh-approximated (not: the kernels compute
    the exact form), and one whose pre-activation is read again (not: it must be stored as it is). Untraceable
    when ``branch`` (data-dependent control flow, as in transformers' models)."""

    def __init__(self, branch: bool):
        super().__init__()
        self.branch = branch
        self.fc1, self.act1, self.fc2 = nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)
        self.fc3, self.act3 = nn.Linear(8, 16), nn.GELU(approximate="tanh")
        self.fc4, self.act4, self.head = nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4)

    def forward(self, x):
        if self.branch and x.sum() > float("-inf"):
            x = x + 1.0
        x = self.fc2(self.act1(self.fc1(x)))
        y = self.fc4(self.act3(self.fc3(x)))
        return self.head(self.act4(y) + y)


@pytest.mark.parametrize("traceable", [True, False], ids=["graph", "probe"])
def test_exact_gelu_after_a_linear_is_fused_into_its_epilogue(traceable, threads):
    model = prune_at_random_(GeluMlps(branch=not traceable), density=0.4, seed=0)
    x = torch.randn(2, 9, 8)
    fast = fxsparse.accelerate(model, x, timer=prefer("native"))
    assert {n: m.activation for n, m in fast.named_modules() if isinstance(m, SparseLinear)} == {
        "fc1": "gelu",
        "fc2": None,
        "fc3": None,
        "fc4": None,
        "head": None,
    }
    fused = [p.name for p in fast.fxsparse_plan.layers if "fused epilogue" in p.reason]
    assert fused == ["fc1"]
    if traceable:
        called = {node.target for node in fast.graph.nodes if node.op == "call_module"}
        assert "act1" not in called and {"act3", "act4"} <= called
    else:
        assert type(fast.act1) is nn.Identity and type(fast.act3) is nn.GELU and type(fast.act4) is nn.GELU
    for shape in [(2, 9, 8), (3, 1, 8), (0, 8)]:  # many tokens, the gathered path, empty
        x = torch.randn(*shape)
        with torch.no_grad():
            assert rel_error(fast(x), model(x)) <= 1e-5, shape


def test_gelu_module_with_a_hook_or_outputs_that_differ_is_not_fused(monkeypatch):
    from fxsparse.inference import fuse

    model = prune_at_random_(GeluMlps(branch=True), density=0.4, seed=0)
    seen = []
    handle = model.act1.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    fast = fxsparse.accelerate(model, torch.randn(2, 9, 8), timer=prefer("native"))
    assert fast.fc1.activation is None and type(fast.act1) is nn.GELU
    handle.remove()
    monkeypatch.setattr(fuse, "_close_outputs", lambda a, b: False)
    fast = fxsparse.accelerate(model, torch.randn(2, 9, 8), timer=prefer("native"))
    assert fast.fc1.activation is None and type(fast.act1) is nn.GELU


def test_bert_intermediate_gelu_is_fused_through_the_module_walk():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100
    )
    torch.manual_seed(0)
    model = prune_at_random_(transformers.BertModel(config).eval(), density=0.3)
    example = {"input_ids": torch.randint(0, 100, (1, 12))}
    fast = fxsparse.accelerate(model, example, timer=prefer("native"))
    for layer in fast.encoder.layer:
        assert (
            layer.intermediate.dense.activation == "gelu"
            and type(layer.intermediate.intermediate_act_fn) is nn.Identity
        )
    with torch.no_grad():
        for ids in (example["input_ids"], torch.randint(0, 100, (2, 7))):
            out, ref = fast(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state
            assert rel_error(out, ref) <= 1e-5


def test_features_first_table_reads_only_a_feature_first_layout():
    x = torch.randn(3, 4, 5)
    assert features_first_table(x) is None  # contiguous: read as it is
    view = x.movedim(-1, 0).contiguous().movedim(0, -1)
    assert torch.equal(features_first_table(view), x.movedim(-1, 0))
    assert features_first_table(x.transpose(0, 1)) is None  # strided otherwise: transposed by the kernel
    assert features_first_table(torch.randn(5)) is None


def test_ab_kernels_times_builds_side_by_side_and_restores_the_kernels(load_tool):
    ab = load_tool("ab_kernels")
    csrc = str(native.CSRC)
    before = native.kernels()
    rows = ab.main(
        [
            f"base={csrc}",
            f"same={csrc}",
            "--model",
            "resnet18",
            "--input",
            "1",
            "3",
            "32",
            "32",
            "--rounds",
            "2",
            "--calls",
            "1",
            "--sparsity",
            "0.8",
        ]
    )
    assert [r["build"] for r in rows] == ["base", "same"]
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] > 0
    assert rows[0]["paired"] == 1.0 and rows[1]["paired"] > 0
    assert native.kernels() is before
    with pytest.raises(SystemExit, match="lacks"):
        ab.main([f"base={csrc}", "empty=" + os.path.dirname(csrc) + "/no-such-folder"])


def test_kept_bytes_count_a_linears_blocks_while_its_weight_lives():
    """The reordered copy of a blocked linear's weight (6 bytes a nonzero with int16 indices) is counted by
    native.kept_bytes() while the weight lives, and not after."""
    import gc

    gc.collect()  # what earlier tests left behind
    before = native.kept_bytes()
    weight = sparse_weight((64, 1024), 0.25)
    col, crow, values = csr32(weight)
    indices = col.to(torch.int16)
    x = torch.randn(128, 1024)  # a 512 KiB table: blocks of 128 inputs
    out = torch.ops.fxsparse.native_linear(x, indices, crow, values, None, 64, False, False, 0)
    assert rel_error(out, F.linear(x, weight)) <= 1e-5
    kept = native.kept_bytes() - before
    nnz = values.numel()
    assert 6 * nnz <= kept <= 6 * nnz + 4 * 64 * 9 + 64  # the weight, then the row pointers of 8 blocks
    del indices, values, col
    gc.collect()
    assert native.kept_bytes() <= before + kept - 6 * nnz  # this weight's copy no longer counted


def test_a_linears_blocks_serve_every_token_count():
    """The blocks of inputs do not depend on the token count: inputs of other lengths reuse them (nothing rebuilt,
    nothing more kept), and each result is exact."""
    import gc

    gc.collect()
    weight = sparse_weight((64, 1024), 0.25)
    col, crow, values = csr32(weight)
    indices = col.to(torch.int16)
    kept = []
    for tokens in (128, 200, 77, 128, 3, 40):
        x = torch.randn(tokens, 1024)
        out = torch.ops.fxsparse.native_linear(x, indices, crow, values, None, 64, False, False, 0)
        assert rel_error(out, F.linear(x, weight)) <= 1e-5
        kept.append(native.kept_bytes())
    assert len(set(kept)) == 1
