"""fxsparse.flops: per-layer dense/sparse MACs, checked against hand formulas and FlopCounterMode."""

import copy
import json
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fxsparse.flops import META_KEY, FlopReport, flops
from fxsparse.trace import trace

from models import Opaque, TiedLinear, TinyCNN, Untraceable, WithLeaf

RESNET50_MACS = 4_089_184_256  # docs/METHODS.md sec. 4, the papers' "4089"


def sdpa_flops_by_hand(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of q @ k^T and attn @ v (docs/METHODS.md sec. 4): 2 x batch dims x t_q x t_k x (d_qk + d_v)."""
    *batch, t_q, d_qk = query_shape
    return 2 * math.prod(batch) * t_q * key_shape[-2] * (d_qk + value_shape[-1])


def counter_misses_cpu_sdpa() -> dict:
    """FlopCounterMode's formulas this torch lacks, filled in by hand: some releases (2.7 and 2.14.1 among them)
    count no CPU scaled_dot_product_attention (aten._scaled_dot_product_flash_attention_for_cpu)."""
    q = torch.randn(1, 2, 3, 4)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        F.scaled_dot_product_attention(q, q, q)
    if counter.get_total_flops() == sdpa_flops_by_hand(q.shape, q.shape, q.shape):
        return {}
    return {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flops_by_hand}


def counter_macs(model: nn.Module, *inputs) -> int:
    """torch.utils.flop_counter's count of the same ops (conv, mm, bmm, attention) / 2, with
    nn.MultiheadAttention's fused fast path off (as in flops(): one fused op it does not count), and
    CPU attention counted by hand where this torch's counter does not count it."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False, custom_mapping=counter_misses_cpu_sdpa()) as counter, torch.no_grad():
            model(*inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops() // 2


def hand_conv_linear_macs(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, int]]:
    """Independent reference, weight fqn -> dense MACs, from docs/METHODS.md's formulas and output shapes
    captured by forward hooks: conv = C_in * C_out * kh * kw * H_out * W_out / groups, linear = rows * in * out.
    """
    found, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):

            def hook(m, args, out, name=name):
                kh, kw = m.kernel_size
                macs = m.in_channels * m.out_channels * kh * kw * out.shape[2] * out.shape[3] // m.groups
                found[f"{name}.weight"] = macs * out.shape[0]

            handles.append(module.register_forward_hook(hook))
        elif isinstance(module, nn.Linear):

            def hook(m, args, out, name=name):
                found[f"{name}.weight"] = args[0].numel() // m.in_features * m.in_features * m.out_features

            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return found


# ------------------------------------------------------------------------------------------------
# tiny models for the edge cases of the audit
# ------------------------------------------------------------------------------------------------
class RootFunctional(nn.Module):
    """F.conv1d / F.linear on parameters of the root module: get_attr weights in the graph."""

    def __init__(self):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(6, 3, 5))
        self.proj = nn.Parameter(torch.randn(4, 6))

    def forward(self, x):
        return F.linear(F.conv1d(x, self.kernel, padding=2).mean(-1), self.proj)


class HandAttention(nn.Module):
    """Attention written out: q @ k^T and attn @ v are activation-by-activation matmuls (own rows)."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))


class SdpaBlock(nn.Module):
    """F.scaled_dot_product_attention as one graph node (a fused aten op on CPU) plus an MLP."""

    def __init__(self, dim: int = 16, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.fc = nn.Linear(dim, 2 * dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        return self.fc(y)


class TorchMha(nn.Module):
    """nn.MultiheadAttention is an opaque leaf using its weights functionally (in_proj_weight)."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


class EinsumMix(nn.Module):
    """torch.einsum and torch.bmm between activations; a transposed conv (MACs over input positions)."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)

    def forward(self, x):
        y = self.up(x).flatten(2)  # (b, 2, 4*h*w)
        gram = torch.einsum("bcn,bdn->bcd", y, y)
        return torch.bmm(gram, y)


# ------------------------------------------------------------------------------------------------
# golden figures
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet50():
    timm = pytest.importorskip("timm")
    return timm.create_model("resnet50").eval()


def test_resnet50_dense_is_the_papers_4089(resnet50):
    report = flops(resnet50, torch.randn(1, 3, 224, 224))
    assert report.weight_dense_macs == RESNET50_MACS
    assert report.dense_macs == RESNET50_MACS and report.dense_flops == 2 * RESNET50_MACS
    assert report.activation_macs == 0
    assert report.traced
    assert len(report.weight_rows) == 54  # 53 convs + fc
    assert report.row("layer1.0.conv1.weight").dense_macs == 64 * 64 * 56 * 56
    assert report.row("fc.weight").op == "linear"


def test_resnet50_sparse_macs_are_density_times_dense_per_layer(resnet50):
    """A folded resnet50 at chosen per-layer densities; the reference sum is computed here, exactly."""
    model = copy.deepcopy(resnet50)
    x = torch.randn(1, 3, 224, 224)
    dense_per_layer = hand_conv_linear_macs(model, x)
    assert sum(dense_per_layer.values()) == RESNET50_MACS
    generator = torch.Generator().manual_seed(1)
    expected = Fraction(0)
    with torch.no_grad():
        for index, (name, module) in enumerate(
            (n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
        ):
            density = (0.5, 0.2, 0.05, 0.01, 1.0)[index % 5]
            keep = round(density * module.weight.numel())
            order = torch.randperm(module.weight.numel(), generator=generator)
            mask = torch.zeros(module.weight.numel(), dtype=torch.bool)
            mask[order[:keep]] = True
            module.weight.mul_(mask.view_as(module.weight))
            nonzeros = int(torch.count_nonzero(module.weight))
            expected += Fraction(nonzeros, module.weight.numel()) * dense_per_layer[f"{name}.weight"]
    report = flops(model, x)
    assert report.dense_macs == RESNET50_MACS
    assert expected.denominator == 1
    assert report.sparse_macs == expected.numerator
    for row in report.weight_rows:
        weight = model.get_parameter(row.name)
        assert row.density == pytest.approx(int(torch.count_nonzero(weight)) / weight.numel())


def test_sparsified_folded_and_dense_models():
    """One report for each of the three states; the sparsified one reads the effective weights."""
    import fxsparse

    model = TinyCNN()
    x = torch.randn(2, 1, 12, 12)
    sparse = fxsparse.sparsify(model, method="st3", sparsity=0.7)
    sparse_report = flops(sparse, x)
    assert fxsparse.is_sparsified(sparse)  # the audit left it as it was
    densities = fxsparse.layer_densities(sparse)
    for row in sparse_report.weight_rows:
        nonzeros, numel = densities[row.name]
        assert row.density == nonzeros / numel
        assert row.sparse_macs == nonzeros * (row.dense_macs // numel)
    folded_report = flops(fxsparse.fold(sparse), x)
    dense_report = flops(model, x)
    assert [r.to_dict() for r in sparse_report.rows] == [r.to_dict() for r in folded_report.rows]
    assert dense_report.dense_macs == sparse_report.dense_macs == counter_macs(model, x)
    assert sparse_report.sparse_macs < 0.5 * sparse_report.dense_macs


class HeldElsewhere(nn.Module):
    """F.conv2d / F.linear on parameters held by a submodule: the sparsified graph reads them through
    getattr(module, name) nodes, and the rows must still be keyed by the parameter's fqn."""

    def __init__(self):
        super().__init__()
        self.holder = nn.Module()
        self.holder.kernel = nn.Parameter(torch.randn(8, 2, 3, 3))
        self.holder.proj = nn.Parameter(torch.randn(3, 8))

    def forward(self, x):
        y = F.conv2d(x, self.holder.kernel, padding=1).mean((2, 3))
        return F.linear(y, self.holder.proj)


def test_sparsified_functional_weights_are_named_and_measured():
    import fxsparse

    model = HeldElsewhere()
    x = torch.randn(2, 2, 5, 5)
    sparse = fxsparse.sparsify(model, method="gmp", sparsity=0.5)
    report = flops(sparse, x)
    densities = fxsparse.layer_densities(sparse)
    assert {r.name for r in report.rows} == {"holder.kernel", "holder.proj"} == set(densities)
    for row in report.rows:
        nonzeros, numel = densities[row.name]
        assert (row.kind, row.density) == ("weight", nonzeros / numel)
    assert report.row("holder.kernel").dense_macs == 2 * 8 * 2 * 9 * 25
    assert report.dense_macs == flops(model, x).dense_macs == counter_macs(model, x)


def test_sparsified_resnet18_matches_its_folded_copy():
    timm = pytest.importorskip("timm")
    import fxsparse

    sparse = fxsparse.sparsify(timm.create_model("resnet18"), method="st3sigma", sparsity=0.9)
    x = torch.randn(1, 3, 224, 224)
    sparse_report = flops(sparse, x)
    folded_report = flops(fxsparse.fold(sparse), x)
    assert sparse_report.dense_macs == 1_814_073_344
    assert sparse_report.sparse_macs == folded_report.sparse_macs
    assert sparse_report.sparse_macs < 0.2 * sparse_report.dense_macs


# ------------------------------------------------------------------------------------------------
# edge cases on tiny models
# ------------------------------------------------------------------------------------------------
def test_grouped_and_depthwise_convs():
    model = TinyCNN()
    x = torch.randn(3, 1, 12, 12)
    report = flops(model, x)
    assert report.row("conv1.weight").dense_macs == 3 * 1 * 8 * 9 * 12 * 12
    assert report.row("conv2.weight").dense_macs == 3 * 8 * 16 * 9 * 6 * 6 // 2
    assert report.row("depthwise.weight").dense_macs == 3 * 16 * 9 * 6 * 6
    assert report.row("fc.weight").dense_macs == 3 * 16 * 10
    assert report.dense_macs == counter_macs(model, x)
    assert report.input_shapes == [(3, 1, 12, 12)]


def test_batch_scales_every_row():
    model = TinyCNN()
    one = flops(model, torch.randn(1, 1, 12, 12))
    four = flops(model, torch.randn(4, 1, 12, 12))
    assert [4 * r.dense_macs for r in one.rows] == [r.dense_macs for r in four.rows]


def test_functional_weights_are_named_by_their_parameter():
    model = RootFunctional()
    with torch.no_grad():
        model.kernel[:, :, :2] = 0
    x = torch.randn(2, 3, 7)
    report = flops(model, x)
    kernel, proj = report.row("kernel"), report.row("proj")
    assert (kernel.op, kernel.kind, kernel.weight_shape) == ("conv1d", "weight", (6, 3, 5))
    assert kernel.dense_macs == 2 * 6 * 3 * 5 * 7
    assert kernel.density == pytest.approx(3 / 5)
    assert kernel.sparse_macs == 2 * 6 * 3 * 3 * 7
    assert (proj.op, proj.dense_macs) == ("linear", 2 * 6 * 4)
    assert report.dense_macs == counter_macs(model, x)


class GainConv(nn.Module):
    """A traced-through conv whose kernel is computed from two parameters (weight * gain, as timm's
    ScaledStdConv2d): the row is keyed by the parameter of the kernel's shape."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 2, 3, 3))
        self.gain = nn.Parameter(torch.ones(4, 1, 1, 1))

    def forward(self, x):
        return F.conv2d(x, self.weight * self.gain)


def test_computed_kernel_is_named_by_the_parameter_of_its_shape():
    model = nn.Sequential(GainConv())
    with torch.no_grad():
        model[0].weight[0] = 0
    report = flops(model, torch.randn(1, 2, 6, 6))
    (row,) = report.rows
    assert (row.name, row.kind, row.op, row.density) == ("0.weight", "weight", "conv2d", 0.75)
    assert row.dense_macs == 4 * 2 * 9 * 4 * 4


def test_tied_weight_rows_per_use():
    model = TiedLinear()
    x = torch.randn(5, 12)
    report = flops(model, x)
    assert [r.name for r in report.rows] == ["a.weight", "b.weight", "c.weight"]
    assert report.row("a.weight").dense_macs == report.row("b.weight").dense_macs == 5 * 144
    assert report.dense_macs == counter_macs(model, x)


def test_module_called_twice_adds_up():
    class Twice(nn.Module):
        """One Linear applied twice: one row (keyed by its weight), two calls."""

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))

    report = flops(Twice(), torch.randn(3, 8))
    row = report.row("fc.weight")
    assert (row.calls, row.dense_macs) == (2, 2 * 3 * 64)


def test_conv_linear_inside_an_opaque_leaf():
    model = WithLeaf()
    graph_module = trace(model, extra_leaf_types=(Opaque,)).graph_module
    assert "leaf" in [n.target for n in graph_module.graph.nodes if n.op == "call_module"]
    x = torch.randn(4, 8)
    report = flops(graph_module, x)
    assert [r.name for r in report.rows] == ["leaf.inner.weight", "out.weight"]
    assert report.dense_macs == 4 * 64 + 4 * 16
    leaf_node = next(n for n in graph_module.graph.nodes if n.target == "leaf")
    assert leaf_node.meta[META_KEY]["rows"] == ["leaf.inner.weight"]


def test_untraceable_model_runs_eagerly_with_a_note():
    model = Untraceable()
    x = torch.ones(2, 6)
    report = flops(model, x)
    assert not report.traced
    assert "could not trace" in report.notes[0]
    assert report.dense_macs == 2 * 36 + 2 * 12 == counter_macs(model, x)


def test_hand_written_attention_gets_its_own_rows():
    model = HandAttention(dim=16, heads=2)
    b, t = 2, 5
    x = torch.randn(b, t, 16)
    report = flops(model, x)
    # at the root there is no module to name them by: each matmul node is its own row
    assert [(r.name, r.op) for r in report.activation_rows] == [("matmul:bmm", "bmm"), ("matmul_1:bmm", "bmm")]
    assert [r.dense_macs for r in report.activation_rows] == [b * 2 * t * t * 8] * 2  # q@k^T, attn@v
    assert report.weight_dense_macs == b * t * 16 * 48 + b * t * 16 * 16
    assert report.dense_macs == counter_macs(model, x)


def test_scaled_dot_product_attention_row():
    model = SdpaBlock(dim=16, heads=4)
    b, t = 2, 7
    x = torch.randn(b, t, 16)
    report = flops(model, x)
    (sdpa,) = report.activation_rows
    assert sdpa.dense_macs == b * 4 * t * t * (4 + 4)
    assert report.dense_macs == b * t * 16 * 48 + b * 4 * t * t * (4 + 4) + b * t * 16 * 32  # qkv, attention, fc
    assert report.dense_macs == counter_macs(model, x)
    assert report.sparse_macs == report.weight_sparse_macs + sdpa.dense_macs


def test_multihead_attention_functional_weights_named():
    model = TorchMha(16).eval()
    x = torch.randn(2, 6, 16)
    report = flops(model, x)
    names = {r.name for r in report.weight_rows}
    assert names == {"attn.in_proj_weight", "attn.out_proj.weight"}
    assert report.row("attn.in_proj_weight").dense_macs == 2 * 6 * 16 * 48
    (attention,) = report.activation_rows
    assert attention.dense_macs == 2 * 2 * 6 * 6 * (8 + 8)  # 2 heads of 8 dims
    assert report.dense_macs == 2 * 6 * 16 * 48 + attention.dense_macs + 2 * 6 * 16 * 16  # in_proj, attention, out_proj
    assert report.dense_macs == counter_macs(model, x)


def test_einsum_bmm_and_transposed_conv():
    model = EinsumMix()
    x = torch.randn(2, 4, 3, 3)
    report = flops(model, x)
    up = report.row("up.weight")
    assert (up.op, up.dense_macs) == ("conv_transpose2d", 2 * 4 * 2 * 2 * 2 * 3 * 3)
    n = 36
    assert report.activation_macs == 2 * 2 * 2 * n + 2 * 2 * 2 * n
    assert report.dense_macs == counter_macs(model, x)


def test_node_meta_adds_up_to_the_totals():
    model = HandAttention()
    graph_module = trace(model).graph_module
    report = flops(graph_module, torch.randn(1, 4, 16))
    metas = [n.meta[META_KEY] for n in graph_module.graph.nodes if META_KEY in n.meta]
    assert sum(m["dense_macs"] for m in metas) == report.dense_macs
    assert sum(m["sparse_macs"] for m in metas) == report.sparse_macs
    qkv = next(n for n in graph_module.graph.nodes if n.target == "qkv")
    assert qkv.meta[META_KEY]["rows"] == ["qkv.weight"]


def test_model_is_left_as_it_was():
    model = TinyCNN().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flops(model, torch.randn(2, 1, 12, 12))
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats untouched
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_bad_input_says_what_to_pass():
    with pytest.raises(RuntimeError, match="example input"):
        flops(TinyCNN(), torch.randn(1, 3, 12, 12))
    with pytest.raises(TypeError, match="nn.Module"):
        flops(lambda x: x, torch.randn(1))


# ------------------------------------------------------------------------------------------------
# output: table, JSON, plot, CLI
# ------------------------------------------------------------------------------------------------
def test_table_json_and_plot(tmp_path):
    model = SdpaBlock()
    with torch.no_grad():
        model.fc.weight[:, ::2] = 0
    report = flops(model, torch.randn(1, 3, 16))
    table = report.table()
    for text in ("fc.weight", "activation-by-activation", "total MACs", "FLOPs = 2 x MACs", "0.5000"):
        assert text in table
    data = json.loads(report.to_json())
    assert data["totals"]["dense_macs"] == report.dense_macs
    assert data["totals"]["sparse_flops"] == 2 * report.sparse_macs
    assert {r["name"] for r in data["rows"]} == {r.name for r in report.rows}
    assert "FLOPs = 2 x MACs" in data["convention"]
    pytest.importorskip("matplotlib")
    report.plot(str(tmp_path / "chart.png"))
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failed_plot_leaves_the_existing_file_whole(tmp_path, monkeypatch):
    matplotlib_figure = pytest.importorskip("matplotlib.figure")
    report = flops(SdpaBlock(), torch.randn(1, 3, 16))
    chart = tmp_path / "chart.png"
    chart.write_bytes(b"the previous chart")

    def half_then_fail(self, target, **kwargs):
        with open(target, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib_figure.Figure, "savefig", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        report.plot(str(chart))
    assert chart.read_bytes() == b"the previous chart"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chart.png"]


def test_plot_without_matplotlib_says_what_to_install(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    report = FlopReport([], [(1, 4)], True)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        report.plot(str(tmp_path / "x.png"))


def test_cli_table_json_and_plot(tmp_path, capsys, load_tool):
    tool = load_tool("flops")
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    code = tool.main(
        ["models:TinyCNN", "--input-size", "1", "12", "12", "--json", str(out_json), "--plot", str(out_png)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "conv1.weight" in printed and "total MACs" in printed
    data = json.loads(out_json.read_text())
    assert data["totals"]["dense_macs"] == flops(TinyCNN(), torch.randn(1, 1, 12, 12)).dense_macs
    assert out_png.exists()
    assert tool.main(["models:TinyCNN", "--input-size", "1", "12", "12", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["input_shapes"] == [[1, 1, 12, 12]]


def test_cli_unknown_model(capsys, load_tool):
    assert load_tool("flops").main(["not_a_model_name_xyz"]) == 2
    assert "unknown model" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# keyword inputs, as Hugging Face models are called
# ------------------------------------------------------------------------------------------------
class Scaled(nn.Module):
    """forward(x, scale=1.0): a keyword argument with a default, as HF models take attention_mask."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x, scale=1.0):
        return self.fc(x) * scale


class ScaledUntraceable(Scaled):
    def forward(self, x, scale=1.0):
        return self.fc(x) * scale if x.sum() > -1e9 else x  # data-dependent: torch.fx cannot trace it


@pytest.mark.parametrize("cls", [Scaled, ScaledUntraceable])
def test_keyword_inputs_as_a_dict(cls):
    model, x = cls(), torch.randn(3, 6)
    by_keyword = flops(model, {"x": x, "scale": torch.full((3, 4), 2.0)})
    assert by_keyword.traced == (cls is Scaled)
    assert by_keyword.row("fc.weight").dense_macs == 3 * 6 * 4
    assert by_keyword.input_shapes == [(3, 6), (3, 4)]
    assert flops(model, {"x": x}).rows == flops(model, x).rows
    with pytest.raises(TypeError if cls is Scaled else RuntimeError, match="mask"):
        flops(model, {"x": x, "mask": x})


# ------------------------------------------------------------------------------------------------
# the zoo cross-check against torch.utils.flop_counter (slow)
# ------------------------------------------------------------------------------------------------
ZOO = [
    "resnet18",
    "resnet50",
    "resnext26ts",
    "mobilenetv2_100",
    "mobilenetv3_small_100",
    "efficientnet_b0",
    "densenet121",
    "regnetx_002",
    "regnety_002",
    "ghostnet_100",
    "convnext_atto",
    "dla34",
    "repvgg_a0",
    "cspresnet50",
    "mnasnet_100",
    "rexnet_100",
    "vgg11",
    "inception_v3",
    "res2net50_14w_8s",
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224",
    "mobilevit_xxs",
    "levit_128s",
    "twins_pcpvt_small",
    "poolformer_s12",
    "efficientformer_l1",
    "coat_lite_tiny",
    "resmlp_12_224",
    "mixer_s32_224",
    "nf_resnet26",
    "tiny_vit_5m_224",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_zoo_dense_total_matches_flop_counter(name):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name).eval()
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    x = torch.randn(1, *size)
    report = flops(model, x)
    expected = counter_macs(model, x)
    print(
        f"{name}: {report.dense_macs:,} MACs (activation {report.activation_macs:,}), "
        f"FlopCounterMode / 2 = {expected:,}, traced={report.traced}"
    )
    assert report.dense_macs == expected
