"""An accelerated model is audited, folded and built as truthfully as the folded model it comes from
(issue 17): flops / realized_sparsity / layer_densities count its sparse layers, save_csr refuses it, BN
folding never scales a shared weight twice, and the accelerate API's options and inputs are checked."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse.inference import SparseConv2d, SparseLinear, dense_baseline
from fxsparse.kernel_layer import WeightStandIn, kernel_layers

from test_inference import ConvBnNet, Mlp, assert_close, prefer, prune_, run

SPARSE = prefer("im2col+ebag", "ebag")  # every layer that can runs a sparse kernel


# ------------------------------------------------------------------------------------------------
# the audit of an accelerated model
# ------------------------------------------------------------------------------------------------
def _rows(report):
    """Per row: op, weight shape, output size (a chained linear's output is feature-first), dense and sparse MACs."""
    return {r.name: (r.op, r.weight_shape, math.prod(r.output_shape), r.dense_macs, r.sparse_macs) for r in report.rows}


@pytest.mark.parametrize("net, shape", [(ConvBnNet, (2, 3, 12, 12)), (Mlp, (2, 5, 8))], ids=["conv-bn", "mlp"])
def test_flops_and_sparsity_of_an_accelerated_model_equal_the_folded_ones(net, shape):
    torch.manual_seed(0)
    model = prune_(net())
    x = torch.randn(*shape)
    fast = fxsparse.accelerate(model, x, timer=SPARSE)
    assert any(isinstance(m, (SparseConv2d, SparseLinear)) for m in fast.modules())
    reference = dense_baseline(model)  # BNs folded as in the accelerated model: the same weights, dense
    expected, report = fxsparse.flops(reference, x), fxsparse.flops(fast, x)
    assert _rows(report) == _rows(expected)
    assert report.sparse_macs == expected.sparse_macs < report.dense_macs == expected.dense_macs
    assert fxsparse.layer_densities(fast) == fxsparse.layer_densities(reference)
    assert fxsparse.realized_sparsity(fast) == fxsparse.realized_sparsity(reference) > 0.5


def test_save_csr_refuses_an_accelerated_model(tmp_path):
    model = prune_(Mlp())
    fast = fxsparse.accelerate(model, torch.randn(2, 8), timer=SPARSE)
    with pytest.raises(ValueError, match="save the folded model"):
        fxsparse.save_csr(fast, tmp_path / "fast.safetensors")
    assert not (tmp_path / "fast.safetensors").exists()
    state = fast.state_dict()  # its state_dict holds the kernels' tables, not the weights: refused as well
    assert not any(key.endswith(".weight") for key in state if key.rpartition(".")[0] in kernel_layers(fast))
    with pytest.raises(ValueError, match="state_dict is an accelerated model's"):
        fxsparse.save_csr(state, tmp_path / "fast.safetensors")
    assert not (tmp_path / "fast.safetensors").exists()
    fxsparse.save_csr(model.state_dict(), tmp_path / "folded.safetensors")  # a folded state_dict still saves


def test_the_weight_of_a_sparse_layer_gives_its_metadata_and_refuses_arithmetic():
    model = prune_(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Conv2d(1, 1, 1)))[:1]
    fast = fxsparse.accelerate(model, torch.randn(2, 8), timer=SPARSE)
    weight = fast[0].weight
    assert isinstance(weight, WeightStandIn) and isinstance(weight, torch.Tensor)
    assert (weight.dtype, weight.shape, weight.device.type, weight.dim()) == (torch.float32, (6, 8), "cpu", 2)
    for compute in (lambda: F.linear(torch.randn(2, 8), weight), lambda: weight.sum(), lambda: weight + 1):
        with pytest.raises(RuntimeError, match="exclude"):
            compute()


class ReadsItsLayersWeight(nn.Module):
    """Computes with a child linear's .weight instead of calling it (as BEiT's and EVA's attention do)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(8, 8, bias=False), nn.Linear(8, 3)

    def forward(self, x):
        return self.out(F.linear(x, weight=self.qkv.weight).relu())


def test_a_layer_whose_weight_its_parent_computes_with_stays_dense_and_is_named(recwarn):
    model = prune_(ReadsItsLayersWeight())
    x = torch.randn(4, 8)
    fast = fxsparse.accelerate(model, x, timer=SPARSE)
    assert type(fast.qkv) is nn.Linear and not isinstance(fast.out, nn.Linear)  # out still runs sparse
    assert any("qkv stays dense" in str(w.message) for w in recwarn)
    plan = {p.name: p for p in fast.fxsparse_plan.layers}
    assert plan["qkv"].path == "dense" and "outside its forward" in plan["qkv"].reason
    assert_close(run(fast, x), run(model, x))
    with pytest.raises(RuntimeError, match="layer 'out' runs a sparse kernel"):  # named, passed by keyword too
        F.linear(x, weight=fast.out.weight)


# ------------------------------------------------------------------------------------------------
# BatchNorm folding
# ------------------------------------------------------------------------------------------------
class SharedWeightConvs(nn.Module):
    """Two convs sharing one weight Parameter, each followed by its own BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv_b, self.bn_b = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv_b.weight = self.conv_a.weight

    def forward(self, x):
        return self.bn_b(self.conv_b(F.relu(self.bn_a(self.conv_a(x)))))


@pytest.mark.parametrize("path", ["im2col+ebag", "dense"])
def test_batchnorms_after_convs_sharing_a_weight_are_folded_into_new_tensors(path):
    torch.manual_seed(0)
    model = prune_(SharedWeightConvs(), density=0.3)
    x = torch.randn(2, 4, 9, 9)
    expected = run(model, x)
    assert_close(run(fxsparse.accelerate(model, x, timer=prefer(path)), x), expected)
    assert_close(run(dense_baseline(model), x), expected)  # measure_speedup's baseline
    assert model.conv_a.weight is model.conv_b.weight  # the input model is untouched
    assert_close(run(model, x), expected, tol=0)


class TimmStyleNet(nn.Module):
    """conv-BN, then conv into timm's BatchNormAct2d, and a forward_features method that calls the modules."""

    def __init__(self):
        super().__init__()
        from timm.layers import BatchNormAct2d

        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), BatchNormAct2d(8, act_layer=nn.SiLU)
        self.head = nn.Linear(8, 4)

    def forward_features(self, x):
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))

    def forward(self, x):
        return self.head(self.forward_features(x).mean((2, 3)))


@pytest.mark.parametrize("path", ["im2col+ebag", "dense"])
def test_timm_batchnorm_act_is_folded_and_forward_features_runs(path):
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    model = prune_(TimmStyleNet())
    with torch.no_grad():
        model.bn2.running_mean.normal_(), model.bn2.running_var.uniform_(0.5, 2), model.bn2.weight.normal_()
    x = torch.randn(2, 3, 10, 10)
    fast = fxsparse.accelerate(model, x, timer=prefer(path))
    assert fast.fxsparse_plan.folded_batchnorms == ["conv1", "conv2"]
    assert not any(isinstance(m, (nn.BatchNorm2d, BatchNormAct2d)) for m in fast.modules())
    assert_close(run(fast, x), run(model, x))
    with torch.no_grad():
        assert_close(fast.forward_features(x), model.forward_features(x))


# ------------------------------------------------------------------------------------------------
# forward hooks
# ------------------------------------------------------------------------------------------------
def test_forward_hooks_are_carried_to_the_accelerated_model():
    torch.manual_seed(0)
    model = prune_(ConvBnNet())
    x = torch.randn(2, 3, 12, 12)
    seen = {}
    for name in ("conv2", "conv3", "fc", ""):
        model.get_submodule(name).register_forward_hook(
            lambda module, args, out, name=name: seen.setdefault(name, []).append(out.detach().clone())
        )
    model.conv2.register_forward_pre_hook(lambda module, args: seen.setdefault("pre", []).append(args[0].clone()))
    run(model, x)
    expected, seen = seen, {}
    with pytest.warns(UserWarning, match="hooks of conv3 see now include their folded BatchNorm"):
        fast = fxsparse.accelerate(model, x, timer=SPARSE)
    assert isinstance(fast.conv2, SparseConv2d) and seen == {}  # not fired while the layers were timed
    run(fast, x)
    assert set(seen) == set(expected)
    for name in ("conv2", "fc", "", "pre"):
        assert_close(seen[name][0], expected[name][0])
    assert_close(seen["conv3"][0], run(model.bn3, expected["conv3"][0]))  # conv3 absorbed bn3


def test_hooks_that_cannot_fire_are_named_in_a_warning():
    model = prune_(ConvBnNet())
    model.bn1.register_forward_hook(lambda *args: None)
    with pytest.warns(UserWarning, match="forward hooks of bn1 do not fire"):
        fxsparse.accelerate(model, torch.randn(1, 3, 8, 8), timer=SPARSE)


# ------------------------------------------------------------------------------------------------
# options and inputs accelerate cannot use
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, needle",
    [
        (dict(kernels=["ebg"]), r"kernels=\['ebg'\]: unknown \['ebg'\]; choose among \['ebag', 'mkl'\]"),
        (dict(kernels="mlk"), r"kernels='mlk': unknown"),
        (dict(kernels=[]), r"kernels=\[\]: empty"),
        (dict(layouts=["im2cl"]), r"layouts=\['im2cl'\]: unknown \['im2cl'\]; choose among \['im2col', 'rows'\]"),
        (dict(exclude=["conv1", "fcc"]), r"exclude pattern 'fcc' matches no module of the model"),
        (dict(exclude="layer*"), r"exclude pattern 'layer\*' matches no module"),
    ],
)
def test_misspelt_options_are_one_line_errors(options, needle):
    with pytest.raises(ValueError, match=needle):
        fxsparse.accelerate(prune_(ConvBnNet()), torch.randn(1, 3, 8, 8), **options)


def test_a_string_kernel_and_layout_select_that_one():
    model, x = prune_(ConvBnNet()), torch.randn(1, 3, 8, 8)
    fast = fxsparse.accelerate(
        model, x, kernels="ebag", layouts="im2col", timer=prefer("im2col+mkl", "im2col+ebag", "mkl", "ebag")
    )
    assert {p.path for p in fast.fxsparse_plan.layers} == {"im2col+ebag", "ebag"}


def test_a_skeleton_model_is_pointed_to_accelerate_checkpoint():
    with fxsparse.inference.skeleton():
        model = ConvBnNet()
    with pytest.raises(ValueError, match=r"meta device.*fxsparse\.accelerate_checkpoint\(path, model, example_input\)"):
        fxsparse.accelerate(model.eval(), torch.randn(1, 3, 8, 8))


def test_a_checkpoint_in_another_float_dtype_is_refused_at_load(tmp_path):
    model = prune_(ConvBnNet())
    path = tmp_path / "bf16.safetensors"
    fxsparse.save_csr(model.to(torch.bfloat16), path)
    with fxsparse.inference.skeleton():
        skeleton = ConvBnNet()
    with pytest.raises(ValueError, match=r"'conv1.weight' is torch.bfloat16 in .* but torch.float32 in the model"):
        fxsparse.accelerate_checkpoint(path, skeleton, torch.randn(1, 3, 8, 8))


# ------------------------------------------------------------------------------------------------
# transformers models that read a layer's .weight.dtype
# ------------------------------------------------------------------------------------------------
def _vit():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=4
    )
    return transformers.ViTModel(config, add_pooling_layer=False), torch.randn(2, 3, 16, 16)


def _t5():
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(vocab_size=50, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2)
    return transformers.T5EncoderModel(config), {"input_ids": torch.randint(0, 50, (2, 7))}


@pytest.mark.filterwarnings("ignore::UserWarning")  # transformers >= 5 cannot be traced by torch.fx
@pytest.mark.parametrize("build", [_vit, _t5], ids=["vit", "t5"])
def test_transformers_models_that_read_weight_dtype_accelerate(build):
    torch.manual_seed(0)
    model, x = build()
    model = prune_(model.eval())
    fast = fxsparse.accelerate(model, x, timer=SPARSE)
    assert any(isinstance(m, (SparseConv2d, SparseLinear)) for m in fast.modules())
    call = (lambda m: m(**x)) if isinstance(x, dict) else (lambda m: m(x))
    with torch.no_grad():
        assert_close(call(fast).last_hidden_state, call(model).last_hidden_state)
