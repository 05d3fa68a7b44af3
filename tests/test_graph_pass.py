"""The graph pass on what models do around their weights: train/eval behaviour, weights transformed before
the op (weight standardization, torch parametrizations), state the forward never reads, and what the pass
reports and tags. Truth is read at the aten level (`layer_operands`, tests/truth.py), independently of
fxsparse."""

import copy
import io
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

import fxsparse

from truth import layer_operands, zero_fraction

timm = pytest.importorskip("timm")
from timm.layers import ScaledStdConv2d, StdConv2d, StdConv2dSame  # noqa: E402

ROLE = "fxsparse.role"  # node.meta key of the nodes the pass inserts


# ------------------------------------------------------------------------------------------------
# train / eval
# ------------------------------------------------------------------------------------------------
def drop_path(x, p, training):
    """timm's drop_path: Python control flow on the flag."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], 1).bernoulli_(1 - p)
    return x * keep / (1 - p)


class DropPath(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return drop_path(x, self.p, self.training)


class Block(nn.Module):
    """Passes its flag as an argument (F.dropout) and holds a module that branches on its own."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.drop_path = DropPath(0.5)

    def forward(self, x):
        return x + self.drop_path(F.dropout(self.fc(x), 0.5, training=self.training))


class Dropping(nn.Module):
    """Root-level F.dropout(training=self.training), as in timm's forward_head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.blocks = nn.Sequential(Block(), Block())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(F.dropout(x, 0.5, training=self.training))


@pytest.mark.parametrize("traced_in", ["train", "eval"])
def test_train_and_eval_act_on_the_sparsified_and_folded_model_as_on_the_original(traced_in):
    original = Dropping().train(traced_in == "train")
    x = torch.randn(32, 8)
    model = fxsparse.sparsify(original, "st3sigma", 0.0)
    folded = fxsparse.fold(model)
    expected = original.eval()(x)
    for candidate in (model, folded):
        candidate.eval()
        assert torch.equal(candidate(x), expected) and torch.equal(candidate(x), expected)
        candidate.train()
        assert not torch.equal(candidate(x), candidate(x))  # dropout and drop path are active
    assert "training = True" not in model.code and "training = False" not in model.code
    assert fxsparse.get_threshold(model).pass_result.training_leaves == ("DropPath",)
    assert isinstance(model.blocks[0].drop_path, DropPath)  # a leaf: the module itself runs


def test_a_module_flag_set_on_its_own_is_read_at_run_time():
    model = fxsparse.sparsify(Dropping(), "st3", 0.0).eval()
    x = torch.randn(32, 8)
    before = model(x)
    model.get_submodule("blocks.1").train()  # only this block drops out, as it would in the original
    assert not torch.equal(model(x), model(x))
    model.get_submodule("blocks.1").eval()
    assert torch.equal(model(x), before)


class AuxRoot(nn.Module):
    """The root branches on its own flag (torchvision's GoogLeNet/Inception3 aux heads)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.aux = nn.Linear(8, 2)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.body(x)
        if self.training:
            return self.head(x), self.aux(x)
        return self.head(x)


def test_a_root_that_branches_on_training_is_sparsified_by_walking_modules():
    with pytest.warns(UserWarning, match="branches on self.training"):
        model = fxsparse.sparsify(AuxRoot(), "st3", 0.5)
    assert not isinstance(model, fx.GraphModule)
    x = torch.randn(4, 8)
    assert isinstance(model.train()(x), tuple) and isinstance(model.eval()(x), torch.Tensor)
    assert len(fxsparse.get_threshold(model).pass_result.pooled) == 3


class SwallowsErrors(nn.Module):
    """Catches every exception around a branch on the flag: the tracer must still notice the branch."""

    def __init__(self):
        super().__init__()
        self.inner = DropPath(0.5)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        try:
            x = self.inner(x)
        except Exception:
            pass
        return self.fc(x)


def test_training_flags_are_restored_and_a_swallowed_branch_is_seen():
    original = SwallowsErrors()
    model = fxsparse.sparsify(original, "st3", 0.0)
    assert all(type(m.training) is bool for m in original.modules())
    assert all(type(m.training) is bool for m in model.modules())
    x = torch.ones(64, 4)
    assert not torch.equal(model.train()(x), model(x))
    assert torch.equal(model.eval()(x), original.eval()(x))
    fxsparse.flops(original, x)  # traces the user's model itself
    assert all(type(m.training) is bool for m in original.modules())


# ------------------------------------------------------------------------------------------------
# weights transformed before the op
# ------------------------------------------------------------------------------------------------
class Standardized(nn.Module):
    """timm's weight-standardized convs: traced through (StdConv2d, ScaledStdConv2d with its gain), and a
    registry leaf with dynamic SAME padding (StdConv2dSame), whose helper fails on symbolic shapes."""

    def __init__(self):
        super().__init__()
        self.std = StdConv2d(3, 8, 3, padding=1)
        self.scaled = ScaledStdConv2d(8, 8, 3, padding=1, gain_init=1.5)
        self.same = StdConv2dSame(8, 16, 3, stride=2)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.scaled(F.relu(self.std(x))))
        return self.fc(F.relu(self.same(x)).mean((2, 3)))


def _standardized():
    torch.manual_seed(0)
    model = Standardized()
    with torch.no_grad():
        model.scaled.gain.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("method", ["st3sigma", "feather"])
def test_standardized_convs_are_sparse_where_the_op_multiplies(method):
    x = torch.randn(2, 3, 9, 9)
    model = fxsparse.sparsify(_standardized(), method, 0.8).eval()
    result = fxsparse.get_threshold(model).pass_result
    assert result.lifted == ("std.weight", "scaled.weight", "same.weight") and not result.dense
    assert result.traced_through == ("StdConv2dSame",)
    operands = layer_operands(model, x)
    assert len(operands) == 4 and abs(zero_fraction(operands) - 0.8) < 1e-3  # the truth
    assert abs(fxsparse.realized_sparsity(model) - zero_fraction(operands)) < 1e-12
    report = fxsparse.flops(model, x)
    truth = {r.name: r.density for r in report.weight_rows}
    for (name, (nonzeros, numel)), operand in zip(fxsparse.layer_densities(model).items(), operands):
        assert nonzeros == int(torch.count_nonzero(operand)) and truth[name] == nonzeros / numel
    expected = model(x)
    folded = fxsparse.fold(model)
    torch.testing.assert_close(folded(x), expected)
    assert "batch_norm" not in folded.code  # the folded graph multiplies the stored weights as they are
    assert zero_fraction(layer_operands(folded, x)) == zero_fraction(operands)
    assert set(folded.state_dict()) == set(Standardized().state_dict())


def test_tau_keys_on_the_source_parameters_not_on_the_computed_weights(monkeypatch):
    model = fxsparse.sparsify(_standardized(), "st3", 0.5).eval()
    threshold = fxsparse.get_threshold(model)
    calls = []
    compute = threshold.compute_tau
    monkeypatch.setattr(threshold, "compute_tau", lambda w: calls.append(1) or compute(w))
    x = torch.randn(1, 3, 9, 9)
    for _ in range(3):
        model(x)
    assert len(calls) == 1
    with torch.no_grad():
        model.scaled.gain.mul_(2)  # another input of the standardization: tau must follow
    model(x)
    assert len(calls) == 2


def test_sparsified_standardized_model_trains_and_resumes():
    x, y = torch.randn(8, 3, 9, 9), torch.randint(0, 4, (8,))
    model = fxsparse.sparsify(_standardized(), "st3", 0.7, fxsparse.Cubic(0, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fxsparse.hook_optimizer(model, optimizer)
    for _ in range(4):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert model.scaled.parametrizations.weight.original.grad is not None
    assert model.scaled.gain.grad is not None  # gradients reach the standardization's other parameter
    other = fxsparse.sparsify(_standardized(), "st3", 0.7, fxsparse.Cubic(0, 3))
    other.load_state_dict(model.state_dict())
    assert torch.equal(other.eval()(x), model.eval()(x))
    assert abs(fxsparse.realized_sparsity(model) - 0.7) < 1e-3


def test_methods_of_a_model_with_lifted_transforms_refuse_rather_than_apply_them_twice():
    class WithMethod(Standardized):
        def features(self, x):
            return self.std(x)

    model = fxsparse.sparsify(WithMethod(), "st3", 0.5)
    with pytest.raises(RuntimeError, match="apply them twice"):
        model.features(torch.randn(1, 3, 9, 9))
    with pytest.raises(RuntimeError, match="apply them twice"):
        fxsparse.fold(model).features(torch.randn(1, 3, 9, 9))


def test_fix_mask_refuses_weights_computed_from_their_raw_weights():
    model = fxsparse.sparsify(_standardized(), "st3", 0.5)
    with pytest.raises(ValueError, match="fix_mask_ bakes"):
        fxsparse.fix_mask_(model)


class Normed(nn.Module):
    """Layers that already carry torch parametrizations."""

    def __init__(self):
        super().__init__()
        self.a = weight_norm(nn.Conv2d(3, 8, 3, padding=1))
        self.b = spectral_norm(nn.Conv2d(8, 8, 3, padding=1))
        self.c = nn.Linear(8, 4)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x)))).mean((2, 3)))


def test_weight_norm_and_spectral_norm_get_sparse_weight_at_the_end_of_their_chain(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    model = fxsparse.sparsify(Normed(), "st3sigma", 0.7).eval()
    threshold = fxsparse.get_threshold(model)
    assert threshold.pass_result.chained == ("a.weight", "b.weight")
    assert threshold.pool_paths[0] == "a.parametrizations.weight.original1"  # weight_norm's v, not g
    assert threshold.pool_size == 8 * 3 * 9 + 8 * 8 * 9 + 4 * 8
    expected = model(x)
    operands = layer_operands(model, x)
    assert abs(zero_fraction(operands) - 0.7) < 1e-3
    assert fxsparse.realized_sparsity(model) == pytest.approx(zero_fraction(operands), abs=1e-12)
    calls = []
    compute = threshold.compute_tau
    monkeypatch.setattr(threshold, "compute_tau", lambda w: calls.append(1) or compute(w))
    model(x)
    assert not calls  # eval forwards leave the sources (and spectral_norm's u, v) unchanged
    model.train()(x)  # a power iteration moves u and v: the next forward recomputes tau
    model.eval()(x)
    assert len(calls) == 1
    expected = model(x)
    folded = fxsparse.fold(model)
    torch.testing.assert_close(folded(x), expected)
    assert not any(hasattr(m, "parametrizations") for m in folded.modules())
    assert all(isinstance(folded.get_parameter(f"{n}.weight"), nn.Parameter) for n in "abc")


class Masked(nn.Conv2d):
    """A conv whose forward multiplies another tensor than its stored weight."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("keep", torch.rand_like(self.weight) > 0.75)

    def forward(self, x):
        return self._conv_forward(x, self.weight * self.keep, self.bias)


class Opaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = Masked(3, 8, 3)

    def forward(self, x):
        return self.conv(x)


class WithOpaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.opaque = Opaque()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.opaque(x).mean((2, 3)))


def test_a_layer_that_cannot_be_sparsified_is_named_and_counted_dense_everywhere(tmp_path):
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"(?s)leaves 1 weight\(s\).*opaque\.conv\.weight: .*transforms the weight"):
        model = fxsparse.sparsify(WithOpaque(), "st3", 0.5, leaf_modules=(Opaque,))
    assert fxsparse.get_threshold(model).pass_result.pooled == ("fc.weight",)
    x = torch.randn(2, 3, 5, 5)
    model.eval()(x)
    conv_numel = 8 * 3 * 9
    assert fxsparse.layer_densities(model)["opaque.conv.weight"] == (conv_numel, conv_numel)
    assert fxsparse.realized_sparsity(model) == pytest.approx(16 / (conv_numel + 32))
    report = fxsparse.flops(model, x)
    keep = model.opaque.conv.keep
    assert report.row("opaque.conv.weight").density == int(keep.sum()) / keep.numel()  # what the op multiplies
    written = fxsparse.save_csr(model, tmp_path / "model.safetensors")
    conv = next(e for e in written.entries if e.name == "opaque.conv.weight")
    assert conv.nnz == conv_numel


class UntraceableMasked(WithOpaque):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent: flops runs it eagerly, under module hooks
            x = -x
        return super().forward(x)


def test_flops_counts_the_weight_a_custom_layer_multiplies():
    torch.manual_seed(0)
    model = UntraceableMasked()
    report = fxsparse.flops(model, torch.randn(1, 3, 5, 5))
    keep = model.opaque.conv.keep
    assert not report.traced and report.row("opaque.conv.weight").density == int(keep.sum()) / keep.numel()


def test_in_place_and_untraceable_paths_keep_transformed_weights_dense_with_a_warning():
    model = _standardized()
    with pytest.warns(UserWarning, match=r"leaves 3 weight\(s\)"):
        fxsparse.sparsify_(model, "st3", 0.5)
    assert [e.fqn for e in fxsparse.pool.sparse_entries(model)] == ["fc.weight"]


def test_old_style_weight_norm_hook_is_named_dense():
    """(torch cannot deepcopy such a model, so only the in-place path can take it.)"""
    if not hasattr(torch.nn.utils, "weight_norm"):
        pytest.skip("torch.nn.utils.weight_norm was removed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = nn.Sequential(torch.nn.utils.weight_norm(nn.Linear(4, 4)), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"0\.weight: its weight is not a parameter"):
        fxsparse.sparsify_(model, "st3", 0.5)
    assert fxsparse.get_threshold(model).pass_result.pooled == ("1.weight",)


def test_save_csr_of_a_plain_weight_norm_model_is_not_called_sparsified(tmp_path):
    model = nn.Sequential(weight_norm(nn.Linear(6, 6)), nn.Linear(6, 2))
    written = fxsparse.save_csr(model, tmp_path / "plain.safetensors")
    assert any("parametrizations.weight.original1" in e.name for e in written.entries)


# ------------------------------------------------------------------------------------------------
# state the forward never reads, the pass's record, and the original class's methods
# ------------------------------------------------------------------------------------------------
class UnusedParts(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
        self.spare_head = nn.Linear(8, 5)  # e.g. a second head used only in another mode
        self.register_buffer("counts", torch.arange(3.0))
        self.fc = nn.Linear(8, 4)
        self.fc.register_buffer("calibration", torch.ones(4))

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


def test_the_folded_state_dict_loads_strictly_into_the_original_architecture():
    model = fxsparse.sparsify(UnusedParts(), "st3", 0.5)
    assert isinstance(model.body, nn.Sequential) and isinstance(model.spare_head, nn.Linear)
    for folded in (fxsparse.fold(model), fxsparse.fold(copy.deepcopy(model))):
        fresh = UnusedParts()
        fresh.load_state_dict(folded.state_dict())  # strict
        x = torch.randn(2, 3, 6, 6)
        torch.testing.assert_close(fresh(x), model.eval()(x))


def test_the_pass_records_what_it_changed_and_tags_its_nodes():
    model = fxsparse.sparsify(Dropping(), "st3", 0.5, exclude="head.*")
    result = fxsparse.get_threshold(model).pass_result
    assert result.pooled == ("stem.weight", "blocks.0.fc.weight", "blocks.1.fc.weight")
    assert result.excluded == ("head.weight",) and result.threshold_in_graph and not result.dense
    roles = {}
    for node in model.graph.nodes:
        roles.setdefault(node.meta.get(ROLE), []).append(node)
    assert [n.target for n in roles["threshold"]] == ["fxsparse_threshold"]
    assert len(roles["threshold-input"]) == 3 and len(roles["training-flag"]) >= 3
    folded = fxsparse.fold(model)
    left = {node.meta.get(ROLE) for node in folded.graph.nodes}
    assert "threshold" not in left and "threshold-input" not in left and "training-flag" in left


def test_timm_methods_stay_reachable():
    model = timm.create_model("resnet18", num_classes=10)
    sparse = fxsparse.sparsify(model, "st3", 0.5)
    x = torch.randn(1, 3, 64, 64)
    assert sparse.forward_features(x).shape == (1, 512, 2, 2)
    assert sparse.get_classifier() is sparse.fc and sparse.num_classes == 10
    assert sparse.pretrained_cfg["architecture"] == "resnet18"
    folded = fxsparse.fold(sparse)
    timm.create_model("resnet18", num_classes=10).load_state_dict(folded.state_dict())
    folded.reset_classifier(3)
    assert folded(x).shape == (1, 3)


def test_pickled_whole_model_keeps_its_eval_output():
    """torch.save(model) retraces on load: eval stays deterministic (use state_dict to keep everything)."""
    folded = fxsparse.fold(fxsparse.sparsify(Dropping(), "st3", 0.5)).eval()
    buffer = io.BytesIO()
    torch.save(folded, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(4, 8)
    assert torch.equal(loaded(x), folded(x))
