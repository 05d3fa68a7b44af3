"""Coverage over the timm zoo (slow): every conv/linear weight is pooled and sparsity 0 is the identity."""

import pytest
import torch
from torch import nn

import fxsparse

from truth import layer_operands, zero_fraction

timm = pytest.importorskip("timm")

ZOO = [
    # CNNs
    "resnet18",
    "resnet50",
    "resnext26ts",
    "seresnext26d_32x4d",
    "densenet121",
    "mobilenetv2_050",
    "mobilenetv3_small_050",
    "efficientnet_b0",
    "ghostnet_050",
    "regnetx_002",
    "dla34",
    "vgg11",
    "convnext_atto",
    "repvgg_a0",
    "dpn48b",
    "hrnet_w18_small",
    "cspresnet50",
    "inception_v3",
    "res2net50_14w_8s",
    "ese_vovnet19b_dw",
    "rexnet_100",
    "mnasnet_050",
    "fastvit_t8",
    "hgnetv2_b0",
    # ViTs and hybrids
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224",
    "pit_ti_224",
    "levit_128s",
    "mobilevit_xxs",
    "efficientformer_l1",
    "poolformer_s12",
    "caformer_s18",
    "xcit_nano_12_p16_224",
    "tiny_vit_5m_224",
    "edgenext_xx_small",
    "coat_lite_tiny",
    "crossvit_tiny_240",
    "efficientvit_b0",
    # MLP-mixers
    "mixer_s16_224",
    "resmlp_12_224",
    "gmlp_ti16_224",
]


def conv_linear_weights(model: nn.Module) -> set[str]:
    """Counted independently of fxsparse: walk modules for Conv1d/2d/3d/Linear/MHA weights, unique params."""
    seen, names = set(), set()
    for module_name, module in model.named_modules():
        for attr in ("weight", "in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
            param = getattr(module, attr, None)
            is_weight = isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and attr == "weight"
            is_mha = isinstance(module, nn.MultiheadAttention) and attr != "weight"
            if isinstance(param, nn.Parameter) and (is_weight or is_mha) and id(param) not in seen:
                seen.add(id(param))
                names.add(f"{module_name}.{attr}" if module_name else attr)
    return names


def pooled_names(model: nn.Module) -> set[str]:
    return {
        p.replace("parametrizations.", "").replace(".original", "") for p in fxsparse.get_threshold(model).pool_paths
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_timm_model_is_fully_pooled_and_identity_at_sparsity_zero(name):
    torch.manual_seed(0)
    original = timm.create_model(name, pretrained=False).eval()
    size = original.pretrained_cfg.get("input_size", (3, 224, 224))
    x = torch.randn(1, *size)
    model = fxsparse.sparsify(original, "st3sigma", sparsity=0.0).eval()
    assert "fxsparse_threshold" in model.code
    assert pooled_names(model) == conv_linear_weights(original)
    with torch.no_grad():
        expected, actual = original(x), model(x)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(fxsparse.METHODS))
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
def test_resnet50_folded_sparsity_is_exact(method, sparsity):
    model = fxsparse.sparsify(timm.create_model("resnet50"), method, sparsity)
    fqns = pooled_names(model)
    folded = fxsparse.fold(model)
    tensors = [folded.get_parameter(f) for f in fqns]
    zeros, total = sum(int((t == 0).sum()) for t in tensors), sum(t.numel() for t in tensors)
    assert total == 25_502_912
    assert abs(zeros - sparsity * total) <= 1


def test_resnet50_graph_shows_the_threshold_and_the_fold_loads_into_timm():
    """The user's exact line, the graph lints, and the folded state_dict loads into a fresh timm model."""
    model = fxsparse.sparsify(timm.create_model("resnet50"), method="st3sigma")
    assert "fxsparse_threshold = self.fxsparse_threshold(conv1_parametrizations_weight_original" in model.code
    model.graph.lint()
    assert fxsparse.get_threshold(model).pool_size == 25_502_912
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.eval()(x)
        assert abs(fxsparse.realized_sparsity(model) - 0.9) < 1e-7
        folded = fxsparse.fold(model)
        torch.testing.assert_close(folded(x), expected)
        fresh = timm.create_model("resnet50").eval()
        fresh.load_state_dict(folded.state_dict())
        assert torch.equal(fresh(x), folded(x))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, extra", [("resnet18", {}), ("efficientnet_b0", {}), ("vit_tiny_patch16_224", {"attn_drop_rate": 0.1})]
)
def test_train_and_eval_modes_of_timm_models_with_drop_rates(name, extra):
    """Sparsified (before the ramp: the identity) and folded, in eval: deterministic and equal to the
    original's eval output; in train: dropout and drop path active, whichever mode it was traced in."""
    torch.manual_seed(0)
    original = timm.create_model(name, drop_rate=0.3, drop_path_rate=0.2, **extra)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = original.eval()(x)
        for traced_in in ("train", "eval"):
            before_the_ramp = fxsparse.Cubic(10, 20)
            model = fxsparse.sparsify(original.train(traced_in == "train"), "st3sigma", 0.9, before_the_ramp)
            for candidate in (model, fxsparse.fold(model)):
                candidate.eval()
                assert torch.equal(candidate(x), expected) and torch.equal(candidate(x), expected)
                candidate.train()
                assert not torch.equal(candidate(x), candidate(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnetv2_50x1_bit", "nf_resnet26", "vit_small_r26_s32_224"])
def test_weight_standardized_timm_models_are_sparse_where_the_op_multiplies(name):
    """BiT ResNetV2 (StdConv2d), an NFNet (ScaledStdConv2d inside NormFreeBlock leaves) and a hybrid ViT
    (StdConv2dSame): the weights the convolutions multiply, read at the aten level, are 90% zeros, and
    realized_sparsity, layer_densities, flops and the folded model agree with them."""
    torch.manual_seed(0)
    original = timm.create_model(name).eval()
    x = torch.randn(1, 3, 224, 224)
    model = fxsparse.sparsify(original, "st3sigma", 0.9).eval()
    operands = layer_operands(model, x)
    assert abs(fxsparse.realized_sparsity(model) - zero_fraction(operands)) < 1e-9
    assert abs(zero_fraction(operands) - 0.9) < 1e-6
    assert pooled_names(model) == conv_linear_weights(original)
    result = fxsparse.get_threshold(model).pass_result
    assert result.lifted and not result.dense
    densities = fxsparse.layer_densities(model)
    assert sorted(densities.values()) == sorted((int(torch.count_nonzero(w)), w.numel()) for w in operands)
    report = fxsparse.flops(model, x)
    assert {r.name: r.density for r in report.weight_rows} == {k: nz / n for k, (nz, n) in densities.items()}
    with torch.no_grad():
        expected = model(x)
        folded = fxsparse.fold(model)
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-5)
    assert zero_fraction(layer_operands(folded, x)) == zero_fraction(operands)
    timm.create_model(name).load_state_dict(folded.state_dict())  # strict: the original keys
    rebuilt = fxsparse.fold(fxsparse.sparsify(timm.create_model(name), "st3sigma", 0.9)).eval()
    rebuilt.load_state_dict(folded.state_dict())  # docs/GRAPH_PASS.md: where such weights run as trained
    with torch.no_grad():
        assert torch.equal(rebuilt(x), folded(x))
