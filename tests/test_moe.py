"""Mixture-of-experts models (issue 17, item 3): transformers' 3-D expert stacks are pooled expert by expert.

A tiny Mixtral (2 layers, 4 experts, top-2; built from a config, nothing downloaded): every expert's matrix
is pooled and sparsified as a linear layer of its own; flops() counts each expert on the tokens routed to it
in the actual forward (checked against a hand count from the routing the experts module received);
realized_sparsity() includes the experts; fold and the CSR round trip are exact. The aten-level truth for
MoE models is in tests/test_truth.py (the "moe" tiny case, and the hf/*moe* zoo entries).
"""

from __future__ import annotations

import json
import math
import warnings
import zlib
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse.export import CsrFormatError, CsrParts, from_csr, load_csr, load_csr_into_, save_csr, to_csr
from fxsparse.layers import MatrixLayout, expert_stacks
from fxsparse.methods.st3 import soft_threshold_rescaled

transformers = pytest.importorskip("transformers")

STACKS = ("gate_up_proj", "down_proj")
HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 16, 24, 4, 2


def tiny_mixtral(implementation: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        max_position_embeddings=64,
        use_cache=False,
    )
    model = transformers.MixtralForCausalLM(config).eval()
    if implementation is not None:
        model.config._experts_implementation = implementation
    return model


def tokens() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))}


def sparsified(model: nn.Module, method: str = "st3sigma") -> tuple[nn.Module, str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparse = fxsparse.sparsify(model, method, 0.9, fxsparse.Constant())
    return sparse.eval(), "\n".join(str(w.message) for w in caught)


def experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if expert_stacks(m)}


def routed_tokens(model: nn.Module, inputs) -> dict[str, Counter]:
    """Tokens routed to each expert, counted by hand from the indices each experts module received."""
    routing, handles = {}, []
    for name, module in experts_modules(model).items():

        def hook(module, args, name=name):
            routing[name] = Counter(int(e) for e in args[1].reshape(-1))

        handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    return routing


def test_experts_are_pooled_and_sparsified_expert_by_expert():
    sparse, warned = sparsified(tiny_mixtral())
    pooled = fxsparse.get_threshold(sparse).pass_result.pooled
    for layer in range(2):
        for stack in STACKS:
            assert f"model.layers.{layer}.mlp.experts.{stack}" in pooled
        assert f"model.layers.{layer}.mlp.gate.weight" in warned  # the router: named, left dense
    densities = fxsparse.layer_densities(sparse)
    gate_up = [densities[f"model.layers.0.mlp.experts.gate_up_proj[{e}]"] for e in range(EXPERTS)]
    assert all(numel == 2 * INTERMEDIATE * HIDDEN for _, numel in gate_up)
    assert all(0 < nonzeros < numel / 2 for nonzeros, numel in gate_up)  # sparse, every expert
    # realized_sparsity includes the experts (most of the weights) and the dense routers
    weights = []  # every Linear (attention, lm_head), every expert stack, every router: as the forward reads them
    for module in sparse.modules():
        if isinstance(module, (nn.Linear, transformers.models.mixtral.modeling_mixtral.MixtralTopKRouter)):
            weights.append(module.weight)
        if isinstance(module, transformers.models.mixtral.modeling_mixtral.MixtralExperts):
            weights += [getattr(module, stack) for stack in STACKS]
    assert len(weights) == 2 * (4 + 2 + 1) + 1
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert fxsparse.realized_sparsity(sparse) == pytest.approx(zeros / sum(w.numel() for w in weights), abs=1e-12)
    assert fxsparse.realized_sparsity(sparse) == pytest.approx(0.9, abs=0.02)


def test_each_expert_is_a_linear_layer_for_the_method():
    """ST-3-sigma: S_l = out + in of each expert's matrix, and ST-3's rescale per expert output channel."""
    sparse, _ = sparsified(tiny_mixtral())
    threshold = fxsparse.get_threshold(sparse)
    experts = sparse.model.layers[0].mlp.experts
    raw = experts.parametrizations.gate_up_proj.original
    out_features, in_features = 2 * INTERMEDIATE, HIDDEN
    for e in range(EXPERTS):
        scale = math.sqrt(out_features + in_features)
        layer_tau = threshold.method.layer_threshold(raw[e], threshold.tau)
        assert float(layer_tau) == pytest.approx(float(threshold.tau) / scale, rel=1e-6)
        expected = soft_threshold_rescaled(raw[e].detach(), layer_tau)
        assert torch.equal(experts.gate_up_proj[e], expected)


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager", "batched_mm", "fallback"])
def test_flops_per_expert_equal_the_hand_count_on_the_routed_tokens(implementation, monkeypatch):
    if implementation == "fallback":  # transformers' own op where torch._grouped_mm cannot run (torch < 2.9)
        moe = pytest.importorskip("transformers.integrations.moe")
        if not hasattr(moe, "_can_use_grouped_mm"):
            pytest.skip("this transformers has no grouped_mm fallback")
        monkeypatch.setattr(moe, "_can_use_grouped_mm", lambda *args: False)
        implementation = "grouped_mm"
    elif implementation == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm needs a newer torch (transformers asks for 2.9)")
    model = tiny_mixtral(implementation)
    sparse, _ = sparsified(model)
    inputs = tokens()
    report = fxsparse.flops(sparse, inputs)
    routing = routed_tokens(sparse, inputs)
    rows = {row.name: row for row in report.rows}
    hand_dense = hand_sparse = 0
    for name, module in experts_modules(sparse).items():
        assert sum(routing[name].values()) == 2 * 8 * TOP_K
        for stack in STACKS:
            weight = getattr(module, stack)  # (E, out, in)
            for e in range(EXPERTS):
                row = rows.get(f"{name}.{stack}[{e}]")
                n = routing[name][e]
                if n == 0:
                    assert row is None
                    continue
                dense, sparse_macs = n * weight[e].numel(), n * int(torch.count_nonzero(weight[e]))
                assert (row.dense_macs, row.sparse_macs, row.weight_shape) == (dense, sparse_macs, weight[e].shape)
                hand_dense, hand_sparse = hand_dense + dense, hand_sparse + sparse_macs
    experts_rows = [r for r in report.rows if "experts" in r.name]
    assert sum(r.dense_macs for r in experts_rows) == hand_dense == 2 * 2 * 8 * TOP_K * 3 * INTERMEDIATE * HIDDEN
    assert sum(r.sparse_macs for r in experts_rows) == hand_sparse
    assert all("experts" not in r.name for r in report.activation_rows)  # no expert product counted twice
    assert report.sparse_macs / report.dense_macs > 0.1  # the experts' sparse MACs are in


def test_flops_of_the_dense_model_count_every_routed_token():
    """Before sparsify: the experts are most of the MACs (main left them out: 84,992 of 281,600 in the issue)."""
    model, inputs = tiny_mixtral(), tokens()
    report = fxsparse.flops(model, inputs)
    experts = sum(r.dense_macs for r in report.rows if "experts" in r.name)
    assert experts == 2 * 2 * 8 * TOP_K * 3 * INTERMEDIATE * HIDDEN
    assert experts > report.dense_macs / 2


def test_fold_and_csr_round_trip(tmp_path):
    sparse, _ = sparsified(tiny_mixtral(), "st3")
    inputs = tokens()
    folded = fxsparse.fold(sparse).eval()
    with torch.no_grad():
        assert torch.equal(sparse(**inputs).logits, folded(**inputs).logits)
    assert fxsparse.realized_sparsity(folded) == pytest.approx(0.9, abs=1e-3)
    path = tmp_path / "moe.safetensors"
    report = save_csr(sparse, path)
    entry = report.metadata["tensors"]["model.layers.0.mlp.experts.gate_up_proj"]
    assert (entry["layout"], entry["experts"], entry["output_axis"]) == ("csr", True, 1)
    state = load_csr(path)
    assert state.keys() == folded.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in folded.state_dict().items())
    fresh = tiny_mixtral()
    load_csr_into_(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, folded(**inputs).logits)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_each_experts_csr_is_a_row_block_of_the_stacks_matrix():
    """docs/FORMAT.md: expert e's (out, in) matrix is rows e*out .. (e+1)*out - 1, for both stored layouts."""
    torch.manual_seed(0)
    views = ((MatrixLayout(1, experts=True), lambda w: w), (MatrixLayout(2, experts=True), lambda w: w.transpose(1, 2)))
    for layout, experts_view in views:
        stack = torch.randn(3, 5, 4) * (torch.rand(3, 5, 4) < 0.4)
        crow, col, values = to_csr(stack, layout)
        matrices = experts_view(stack)  # (E, out, in)
        out_features = matrices.shape[1]
        for e, matrix in enumerate(matrices):
            block = crow[e * out_features : (e + 1) * out_features + 1].long()
            start, end = int(block[0]), int(block[-1])
            expected = matrix.to_sparse_csr()
            assert torch.equal(block - start, expected.crow_indices())
            assert torch.equal(col[start:end].long(), expected.col_indices())
            assert torch.equal(values[start:end], expected.values())
        assert torch.equal(from_csr(crow, col, values, tuple(stack.shape), layout), stack)
        assert torch.equal(CsrParts(crow, col, values, tuple(stack.shape), layout).dense(), stack)


def _rewrite_entry(path, name, **fields):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as handle:
        meta = json.loads(handle.metadata()["fxsparse"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    meta["tensors"][name].update(fields)
    meta["crc32"] = {k: zlib.crc32(t.contiguous().view(torch.uint8).numpy()) for k, t in tensors.items()}
    save_file(tensors, str(path), metadata={"fxsparse": json.dumps(meta)})


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"experts": "yes"}, "experts must be true or false"),
        ({"experts": None}, "experts must be true or false"),
        ({"output_axis": 0}, "output_axis of an experts stack must be 1 or 2"),
        ({"groups": 2}, "groups of an experts stack must be 1"),
        ({"shape": [4, 48, 16, 1]}, "an experts stack has 3 dims"),
    ],
)
def test_the_reader_validates_an_experts_entry(tmp_path, fields, message):
    stack = torch.randn(4, 48, 16) * (torch.rand(4, 48, 16) < 0.1)

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_experts, self.is_transposed = 4, False
            self.gate_up_proj = nn.Parameter(stack.clone())

    path = tmp_path / "e.safetensors"
    save_csr(Experts(), path)
    assert torch.equal(load_csr(path)["gate_up_proj"], stack)
    _rewrite_entry(path, "gate_up_proj", **fields)
    with pytest.raises(CsrFormatError, match=message):
        load_csr(path)


class UnknownExperts(nn.Module):
    """A stack of expert matrices whose layout fxsparse does not know (no transformers decorator)."""

    def __init__(self):
        super().__init__()
        self.num_experts = 2
        self.w = nn.Parameter(torch.randn(2, 6, 5))

    def forward(self, x):
        return F.linear(x[:3], self.w[0]).sum() + F.linear(x[3:], self.w[1]).sum()


class WithUnknownExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(5, 5)
        self.experts = UnknownExperts()

    def forward(self, x):
        return self.experts(self.proj(x))


def test_an_unknown_expert_stack_is_named_and_counted_dense():
    model, x = WithUnknownExperts(), torch.randn(4, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparse = fxsparse.sparsify(model, "st3", 0.9, trace_model=False)
    warned = "\n".join(str(w.message) for w in caught)
    assert "experts.w: a stack of 2 expert matrices in UnknownExperts" in warned
    densities = fxsparse.layer_densities(sparse)
    assert densities["experts.w"] == (60, 60)
    assert fxsparse.realized_sparsity(sparse) == pytest.approx(1 - (densities["proj.weight"][0] + 60) / 85)
    row = fxsparse.flops(sparse, x).row("experts.w")
    assert (row.dense_macs, row.sparse_macs) == (4 * 30, 4 * 30)  # counted where multiplied, as it is


def test_experts_train_and_fix_mask():
    """Gradients reach every expert's raw weights (straight-through); ST-3's fixed-mask phase keeps the zeros."""
    sparse, _ = sparsified(tiny_mixtral(), "st3")
    inputs = tokens()
    sparse.train()
    sparse(**inputs, labels=inputs["input_ids"]).loss.backward()
    raw = sparse.model.layers[0].mlp.experts.parametrizations.down_proj.original
    routed = routed_tokens(sparse, inputs)["model.layers.0.mlp.experts"]
    assert all(bool(raw.grad[e].abs().sum() > 0) == (routed[e] > 0) for e in range(EXPERTS))
    sparse.eval()
    with torch.no_grad():
        before = sparse(**inputs).logits
    zeros = fxsparse.layer_densities(sparse)
    fxsparse.fix_mask_(sparse)
    with torch.no_grad():
        torch.testing.assert_close(sparse(**inputs).logits, before, rtol=1e-5, atol=1e-6)
    assert fxsparse.layer_densities(sparse) == zeros


def test_the_eager_loop_computes_each_stack_once_per_forward(monkeypatch):
    """transformers' eager loop reads a stack once per routed expert: each read recomputed the whole stack
    (O(experts^2) per forward); the experts module now computes each stack once, with the same loss and
    gradients as recomputing, and fold leaves no hook behind."""
    from fxsparse.attach import uncache_expert_stacks_
    from fxsparse.parametrization import SparseWeight

    inputs = tokens()
    computed = Counter()
    forward = SparseWeight.forward

    def counting(self, *args):
        computed[self.experts] += 1
        return forward(self, *args)

    monkeypatch.setattr(SparseWeight, "forward", counting)

    def loss_and_grads(model):
        model.zero_grad()
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    sparse, _ = sparsified(tiny_mixtral("eager"), "st3")
    sparse.train()
    loss, grads = loss_and_grads(sparse)
    assert (
        computed[True] == 2 * len(experts_modules(sparse)) < sum(len(r) for r in routed_tokens(sparse, inputs).values())
    )
    recomputing = sparsified(tiny_mixtral("eager"), "st3")[0].train()
    for module in experts_modules(recomputing).values():
        uncache_expert_stacks_(module)
    computed.clear()
    reference_loss, reference_grads = loss_and_grads(recomputing)
    assert computed[True] > 2 * len(experts_modules(sparse))  # without the hooks: once per routed expert
    assert torch.equal(loss, reference_loss)
    assert grads.keys() == reference_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], reference_grads[name], rtol=1e-6, atol=1e-7)
    folded = fxsparse.fold(sparse)
    for module in experts_modules(folded).values():
        assert not module._forward_pre_hooks and not module._forward_hooks

    def failing(self, *args):
        raise RuntimeError("inside the experts")

    monkeypatch.setattr(SparseWeight, "forward", failing)
    with pytest.raises(RuntimeError, match="inside the experts"):
        sparse.model.layers[0].mlp(torch.randn(1, 3, HIDDEN))
    assert getattr(torch.nn.utils.parametrize, "_cache_enabled", 0) == 0  # the cache closed with the forward
