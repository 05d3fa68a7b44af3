"""The graph pass, exact sparsity, fold, resume and a short training loop, on tiny models."""

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse.methods import METHODS

from models import (
    FunctionalBlock,
    FunctionalWeights,
    NothingToSparsify,
    Opaque,
    TiedLinear,
    TinyCNN,
    Untraceable,
    WithLeaf,
)

ALL_METHODS = sorted(METHODS)


def pooled_zeros(model: nn.Module) -> tuple[int, int]:
    counts = fxsparse.layer_densities(model).values()
    return sum(n - nz for nz, n in counts), sum(n for _, n in counts)


def folded_zeros(folded: nn.Module, fqns) -> tuple[int, int]:
    tensors = [folded.get_parameter(f) for f in fqns]
    return sum(int((t == 0).sum()) for t in tensors), sum(t.numel() for t in tensors)


def test_threshold_node_is_in_the_graph_and_graph_lints():
    model = fxsparse.sparsify(TinyCNN(), method="st3")
    assert isinstance(model, fx.GraphModule)
    assert "fxsparse_threshold = self.fxsparse_threshold(" in model.code
    model.graph.lint()
    nodes = [n for n in model.graph.nodes if n.op == "call_module" and n.target == "fxsparse_threshold"]
    assert len(nodes) == 1 and len(nodes[0].args) == 4
    model.graph.eliminate_dead_code()  # the node has no users but is impure: it stays
    assert "fxsparse_threshold" in model.code


def test_input_model_is_never_mutated():
    original = TinyCNN()
    before = copy.deepcopy(original.state_dict())
    model = fxsparse.sparsify(original, sparsity=0.9)
    model(torch.randn(2, 1, 8, 8))
    fxsparse.fold(model)
    assert not hasattr(original.conv1, "parametrizations")
    for key, value in original.state_dict().items():
        assert torch.equal(value, before[key])


@pytest.mark.parametrize("method", ALL_METHODS)
def test_sparsity_zero_and_before_the_ramp_equal_the_original(method):
    original = TinyCNN().eval()
    x = torch.randn(3, 1, 8, 8)
    for model in (
        fxsparse.sparsify(original, method, sparsity=0.0),
        fxsparse.sparsify(original, method, 0.9, fxsparse.Cubic(begin=5, end=10)),
    ):
        assert torch.equal(model.eval()(x), original(x))


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
def test_folded_sparsity_is_exact_on_tiny_models(method, sparsity):
    for factory in (TinyCNN, FunctionalWeights, TiedLinear):
        model = fxsparse.sparsify(factory(), method, sparsity, fxsparse.Cubic(0, 3))
        fxsparse.step_(model, 3)  # end of the ramp
        fqns = [
            p.replace("parametrizations.", "").replace(".original", "")
            for p in fxsparse.get_threshold(model).pool_paths
        ]
        folded = fxsparse.fold(model)
        zeros, total = folded_zeros(folded, fqns)
        assert abs(zeros - sparsity * total) <= 1, (factory.__name__, zeros, total)


def test_tied_weight_enters_the_pool_once_and_folds_once():
    model = fxsparse.sparsify(TiedLinear(), "st3", 0.5)
    threshold = fxsparse.get_threshold(model)
    assert threshold.pool_size == 12 * 12 + 3 * 12
    x = torch.randn(4, 12)
    expected = model.eval()(x)
    folded = fxsparse.fold(model)
    assert folded.a.weight is folded.b.weight
    torch.testing.assert_close(folded(x), expected)


def test_functional_weights_and_opaque_leaves_are_pooled():
    model = fxsparse.sparsify(FunctionalWeights(), "st3", 0.5)
    assert sorted(fxsparse.get_threshold(model).pool_paths) == [
        "block.parametrizations.kernel.original",
        "block.parametrizations.proj.original",
    ]
    x = torch.randn(2, 3, 7)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        copied.block.parametrizations.kernel.original.mul_(3)  # the copy's parametrization stays live
    assert not torch.allclose(copied(x), model(x))
    with pytest.warns(UserWarning, match="kernel: a parameter of the model's root module.*\n  proj: a parameter"):
        with pytest.raises(ValueError, match="2 that cannot be sparsified"):
            fxsparse.sparsify(FunctionalBlock(), "st3")
    model = fxsparse.sparsify(WithLeaf(), "st3", leaf_modules=(Opaque,))
    assert "leaf" in [n.target for n in model.graph.nodes if n.op == "call_module"]
    assert sorted(fxsparse.get_threshold(model).pool_paths) == [
        "leaf.inner.parametrizations.weight.original",
        "out.parametrizations.weight.original",
    ]


def test_untraceable_model_falls_back_with_a_warning_and_still_reaches_the_sparsity():
    with pytest.warns(UserWarning, match="could not trace Untraceable.*Lost"):
        model = fxsparse.sparsify(Untraceable(), "feather", 0.5)
    model(torch.ones(2, 6))
    zeros, total = pooled_zeros(model)
    assert abs(zeros - 0.5 * total) <= 1
    folded = fxsparse.fold(model)
    assert not hasattr(folded, "fxsparse_threshold")
    assert set(folded.state_dict()) == set(Untraceable().state_dict())


def test_exclude_and_min_numel_filter_layers():
    model = fxsparse.sparsify(TinyCNN(), exclude="fc.*")
    assert all(not p.startswith("fc.") for p in fxsparse.get_threshold(model).pool_paths)
    model = fxsparse.sparsify(TinyCNN(), min_numel=100)  # depthwise (144) and conv1 (72): conv1 excluded
    assert "conv1.parametrizations.weight.original" not in fxsparse.get_threshold(model).pool_paths
    with pytest.raises(ValueError, match="nothing to sparsify.*4 excluded by exclude="):
        fxsparse.sparsify(TinyCNN(), exclude=lambda fqn, p: True)
    with pytest.raises(ValueError, match="nothing to sparsify"):
        fxsparse.sparsify(NothingToSparsify())


@pytest.mark.parametrize("method", ALL_METHODS)
def test_fold_equals_sparse_eval_output_and_loads_into_a_fresh_model(method):
    torch.manual_seed(1)
    model = fxsparse.sparsify(TinyCNN(), method, 0.8).eval()
    x = torch.randn(4, 1, 8, 8)
    expected = model(x)
    folded = fxsparse.fold(model)
    assert not any(hasattr(m, "parametrizations") for m in folded.modules())
    assert "fxsparse_threshold" not in folded.code
    torch.testing.assert_close(folded(x), expected)
    fresh = TinyCNN().eval()
    fresh.load_state_dict(folded.state_dict())
    torch.testing.assert_close(fresh(x), expected)
    # folding a copy leaves the sparsified model as it was (deepcopy shares parametrized classes)
    assert fxsparse.is_sparsified(model) and hasattr(type(model.conv1), "weight")
    assert torch.equal(model(x), expected)
    ema = copy.deepcopy(model)
    fxsparse.fold_(ema)
    assert torch.equal(model(x), expected)


def test_fold_in_place_keeps_parameter_objects():
    model = fxsparse.sparsify(TinyCNN(), "st3", 0.5)
    raw = model.conv1.parametrizations.weight.original
    fxsparse.fold_(model)
    assert model.conv1.weight is raw and isinstance(raw, nn.Parameter)


def _train(model, steps, data, optimizer):
    for x, y in data[:steps]:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        fxsparse.step_(model)
    return loss.item()


@pytest.mark.parametrize("method", ["st3sigma", "feather"])
def test_checkpoint_mid_schedule_resumes_bit_identically(method):
    original = TinyCNN()
    data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(8)]

    def fresh():
        model = fxsparse.sparsify(original, method, 0.9, fxsparse.Cubic(1, 6))
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    straight, opt = fresh()
    _train(straight, 8, data, opt)

    first, opt = fresh()
    _train(first, 4, data, opt)
    checkpoint = copy.deepcopy({"model": first.state_dict(), "optimizer": opt.state_dict()})
    resumed, opt = fresh()
    resumed.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    assert fxsparse.get_threshold(resumed).current_step == 4
    _train(resumed, 4, data[4:] + data[:0], opt)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_fix_mask_freezes_the_zero_set_and_blocks_pruned_gradients():
    model = fxsparse.sparsify(TinyCNN(), "st3", 0.7)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    sparse_out = model.eval()(x)
    fxsparse.fix_mask_(model)
    torch.testing.assert_close(model(x), sparse_out)  # baked w_eff: same function
    zeros_before = pooled_zeros(model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=1e-3)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        raw = model.conv2.parametrizations.weight.original
        assert torch.all(raw.grad[model.conv2.parametrizations.weight[0].mask == 0] == 0)
        opt.step()
        fxsparse.step_(model)
    assert pooled_zeros(model) == zeros_before
    # the mask travels in the checkpoint
    other = fxsparse.sparsify(TinyCNN(), "st3", 0.7)
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other.eval()(x), model.eval()(x))


@pytest.mark.parametrize("method", ALL_METHODS)
def test_short_training_reaches_the_scheduled_sparsity_and_loss_goes_down(method):
    torch.manual_seed(0)
    teacher = TinyCNN().eval()
    inputs = torch.randn(256, 1, 8, 8)
    with torch.no_grad():
        labels = teacher(inputs).argmax(1)
    model = fxsparse.sparsify(TinyCNN(), method, 0.8, fxsparse.Cubic(0, 40))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    fxsparse.hook_optimizer(model, optimizer)
    losses = []
    for _step in range(80):
        index = torch.randint(0, 256, (32,))
        loss = F.cross_entropy(model(inputs[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert fxsparse.get_threshold(model).current_step == 80
    model.eval()(inputs[:1])
    zeros, total = pooled_zeros(model)
    assert abs(zeros - 0.8 * total) <= 1
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10


def test_tau_is_not_recomputed_on_eval_forwards(monkeypatch):
    model = fxsparse.sparsify(TinyCNN(), "st3", 0.5).eval()
    calls = []
    threshold = fxsparse.get_threshold(model)
    original = threshold.compute_tau
    monkeypatch.setattr(threshold, "compute_tau", lambda w: calls.append(1) or original(w))
    x = torch.randn(2, 1, 8, 8)
    for _ in range(3):
        model(x)
    assert len(calls) == 1
    with torch.no_grad():
        model.fc.parametrizations.weight.original.mul_(2)  # weights changed in place
    model(x)
    fxsparse.step_(model)  # step changed
    model(x)
    assert len(calls) == 3


def test_fused_optimizer_updates_are_seen_through_the_step_counter():
    """fused=True optimizers do not bump weight versions; step_ after each step keeps tau fresh."""
    model = fxsparse.sparsify(TinyCNN(), "st3", 0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, fused=True)
    fxsparse.hook_optimizer(model, optimizer)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    threshold = fxsparse.get_threshold(model)
    model.eval()(x)
    weights = [model.get_parameter(p) for p in threshold.pool_paths]
    assert torch.equal(threshold.tau, fxsparse.global_quantile(weights, 0.5))


@fx.wrap
def _attention_like(x: torch.Tensor, qkv_weight: torch.Tensor, proj_weight: torch.Tensor) -> torch.Tensor:
    """A function the tracer keeps opaque (as torchvision's shifted_window_attention) that multiplies weights."""
    q, k, v = F.linear(x, qkv_weight).chunk(3, dim=-1)
    return F.linear(torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v, proj_weight)


class WeightsIntoAFunction(nn.Module):
    """Edge case: Linear layers never called as modules; their weights are handed to an opaque function."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj, self.head = nn.Linear(16, 48, bias=False), nn.Linear(16, 16, bias=False), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(_attention_like(x, self.qkv.weight, self.proj.weight))


def test_weights_handed_to_an_opaque_function_are_pooled_and_multiplied_sparse():
    torch.manual_seed(0)
    model = WeightsIntoAFunction()
    sparse = fxsparse.sparsify(model, "st3", 0.75)
    assert {"qkv.weight", "proj.weight", "head.weight"} == set(fxsparse.get_threshold(sparse).pass_result.pooled)
    seen = []
    real_linear = F.linear

    def spy(x, weight, bias=None):
        seen.append(int(torch.count_nonzero(weight)))
        return real_linear(x, weight, bias)

    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = sparse(x)
        F.linear = spy  # the opaque function looks F.linear up at call time
        try:
            out = sparse(x)
        finally:
            F.linear = real_linear
    assert torch.equal(out, expected)
    densities = fxsparse.layer_densities(sparse)
    assert seen[:2] == [densities["qkv.weight"][0], densities["proj.weight"][0]]  # the function multiplies the zeros
    assert sum(n - nz for nz, n in densities.values()) == round(0.75 * (48 * 16 + 16 * 16 + 4 * 16))


def test_reports_see_the_threshold_the_next_forward_uses():
    """After an optimizer step and before the next forward, layer_densities/realized_sparsity refresh tau first."""
    torch.manual_seed(0)
    model = fxsparse.sparsify(TinyCNN(), "feather", 0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    reported = fxsparse.realized_sparsity(model)
    assert reported == fxsparse.realized_sparsity(fxsparse.fold(model))
    assert abs(reported - 0.5) < 1e-3


def test_a_weight_left_dense_reports_its_own_zeros():
    """A tied embedding/head left dense is not sparsified, but its real zeros (a padding row) are counted."""
    torch.manual_seed(0)

    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8, padding_idx=0)
            self.body = nn.Linear(8, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(torch.relu(self.body(self.embed(ids))))

    with pytest.warns(UserWarning, match="include_embedding_tied=True"):
        sparse = fxsparse.sparsify(TiedLM(), "st3", 0.5)
    densities = fxsparse.layer_densities(sparse)
    assert densities["head.weight"] == (72, 80)  # the padding row's 8 zeros, nothing pruned
    assert densities["body.weight"] == (32, 64)
    assert fxsparse.realized_sparsity(sparse) == (8 + 32) / (80 + 64)
