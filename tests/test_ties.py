"""The exact sparsity rule, ties included (issue 10 item 9).

A weight is pruned exactly when its score is at or below tau, tau the numpy-"linear" q-quantile of the
pool's fp32 scores. With distinct scores that is floor((N-1) q) + 1 weights; every score tied with tau is
pruned too, so pools with ties at tau (bf16/fp16 weights take few distinct values) get those extra zeros.
The folded model and the CSR checkpoint hold the same zeros. Ties are not broken: ST-3 and Feather map
|w| = tau to exactly 0 whatever a mask says. One more source of zeros exists only for fp16 *parameters*
(not autocast, whose master weights are fp32): ST-3's |w| - tau of a weight within a fraction of an fp16
ulp above tau can round to 0 (test_fp16_parameters_st3_can_round_a_weight_just_above_tau_to_zero).
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

import fxsparse
from fxsparse.methods import METHODS
from fxsparse.pool import pooled_weights, unique_entries

ALL_METHODS = sorted(METHODS)


def mlp(dtype):
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 10)).to(dtype)


def scores_of(model):
    method = fxsparse.get_threshold(model).method
    return [method.score(w) for w in pooled_weights(model)]


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zeros_are_exactly_the_scores_at_or_below_the_linear_quantile(method, dtype):
    q = 0.9
    model = fxsparse.sparsify(mlp(dtype), method, q)
    model(torch.randn(4, 64, dtype=dtype))
    tau = fxsparse.get_threshold(model).tau
    scores = scores_of(model)
    pooled = torch.cat([s.flatten() for s in scores])
    assert torch.equal(tau, torch.tensor(np.quantile(pooled.numpy(), q, method="linear"), dtype=torch.float32))
    for entry, score in zip(unique_entries(model), scores):  # layer by layer, entry by entry
        effective = getattr(entry.module, entry.name)
        assert torch.equal(effective == 0, score <= tau), entry.fqn
    n, floor_rank = pooled.numel(), math.floor((pooled.numel() - 1) * q) + 1
    below, at_or_below = int((pooled < tau).sum()), int((pooled <= tau).sum())
    zeros = sum(numel - nonzero for nonzero, numel in fxsparse.layer_densities(model).values())
    assert zeros == at_or_below and below <= floor_rank <= at_or_below
    if dtype == torch.float32:
        assert zeros == floor_rank  # distinct scores: the request to within one weight
    else:
        assert zeros > floor_rank  # ties at tau: all of them pruned (this pool has some)
    assert abs(floor_rank - q * n) < 1


@pytest.mark.parametrize("method", ["st3", "feather", "gmp", "ste"])
def test_all_equal_weights_are_all_at_tau_and_all_pruned(method):
    model = mlp(torch.float32)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.weight.fill_(0.05)
    sparse = fxsparse.sparsify(model, method, 0.5)
    sparse(torch.randn(2, 64))
    assert float(fxsparse.get_threshold(sparse).tau) == pytest.approx(0.05)
    assert fxsparse.realized_sparsity(sparse) == 1.0


@pytest.mark.parametrize("method", ["st3sigma", "ste"])
def test_fold_and_the_csr_checkpoint_hold_the_same_zeros_as_the_rule(method, tmp_path):
    model = fxsparse.sparsify(mlp(torch.bfloat16), method, 0.9)
    model(torch.randn(2, 64, dtype=torch.bfloat16))
    tau = fxsparse.get_threshold(model).tau
    at_or_below = sum(int((s <= tau).sum()) for s in scores_of(model))
    folded = fxsparse.fold(model)
    weights = [f"{i}.weight" for i in (0, 2, 4)]
    assert sum(int((folded.get_parameter(w) == 0).sum()) for w in weights) == at_or_below
    fxsparse.save_csr(model, tmp_path / "model.safetensors")
    state = fxsparse.load_csr(tmp_path / "model.safetensors")
    assert sum(int((state[w] == 0).sum()) for w in weights) == at_or_below


def test_fp16_parameters_st3_can_round_a_weight_just_above_tau_to_zero():
    """The documented exception: fp16 weights a, b one ulp apart, tau 0.999 of the way from a to b."""
    a = torch.tensor(0.01, dtype=torch.float16)
    b = torch.nextafter(a, torch.tensor(1.0, dtype=torch.float16))
    weight = torch.cat(
        [torch.linspace(0.001, 0.009, 899).half(), a[None], b[None], torch.linspace(0.02, 0.5, 99).half()]
    ).reshape(10, 100)
    tau = fxsparse.global_quantile([weight], (899 + 0.999) / (weight.numel() - 1))
    assert a < tau < b.float()
    at_or_below = int((weight.float().abs() <= tau).sum())
    assert int((fxsparse.St3().effective(weight, tau) == 0).sum()) == at_or_below + 1  # b - tau < fp16's tiniest
    for method in (fxsparse.Feather(theta=1.0), fxsparse.Ste()):
        assert int((method.effective(weight, tau) == 0).sum()) == at_or_below
    assert int((fxsparse.St3().effective(weight.float(), tau) == 0).sum()) == at_or_below  # fp32: exact
