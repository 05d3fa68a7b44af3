"""Each method's forward and gradient against a hand-written reference of docs/METHODS.md, plus a contract
test that runs over every registered method."""

import math

import numpy as np
import pytest
import torch

import fxsparse
from fxsparse.methods import METHODS


def st3_reference(w: np.ndarray, tau: float) -> np.ndarray:
    """ST-3 forward, entry by entry and channel by channel (docs/METHODS.md sec. 1), float64."""
    if tau <= 0:
        return w.copy()
    out = np.zeros_like(w, dtype=np.float64)
    for c in range(w.shape[0]):
        row = w[c].astype(np.float64).ravel()
        kept = np.abs(row) > tau
        soft = np.sign(row) * np.maximum(np.abs(row) - tau, 0.0)
        ratio = (np.mean(np.abs(row) * kept) + 1e-6) / (np.mean(np.abs(row)) + 1e-6)
        out[c] = ((1.01 / (ratio + 0.01)) * soft).reshape(w[c].shape)
    return out


def feather_reference(w: np.ndarray, threshold: float, p: float = 3.0) -> np.ndarray:
    out = np.zeros_like(w, dtype=np.float64)
    for index, value in np.ndenumerate(w.astype(np.float64)):
        if abs(value) > threshold:
            out[index] = math.copysign((abs(value) ** p - threshold**p) ** (1 / p), value)
    return out if threshold > 0 else w.astype(np.float64)


def run(method, weight: torch.Tensor, tau: float, upstream: torch.Tensor):
    w = weight.clone().requires_grad_(True)
    out = method.apply(w, torch.tensor(tau))
    out.backward(upstream)
    return out.detach(), w.grad


SHAPES = [(8, 3, 3, 3), (5, 7), (4, 2, 1, 1), (6, 1, 5)]


@pytest.mark.parametrize("shape", SHAPES)
def test_st3_forward_is_soft_threshold_with_channel_rescale_and_gradient_is_identity(shape):
    weight = torch.randn(shape)
    tau = float(weight.abs().flatten().quantile(0.6))
    upstream = torch.randn(shape)
    out, grad = run(fxsparse.St3(), weight, tau, upstream)
    torch.testing.assert_close(out.double(), torch.from_numpy(st3_reference(weight.numpy(), tau)), rtol=1e-5, atol=1e-6)
    assert torch.equal(grad, upstream)


@pytest.mark.parametrize("shape", SHAPES)
def test_st3sigma_thresholds_each_layer_at_tau_over_sqrt_of_shape_sum(shape):
    weight = torch.randn(shape)
    sqrt_s = math.sqrt(sum(shape))  # the SUM of the dims, not the fan-in
    tau_star = float((weight.abs() * sqrt_s).flatten().quantile(0.7))
    method = fxsparse.St3Sigma()
    torch.testing.assert_close(method.score(weight), weight.abs() * sqrt_s)
    upstream = torch.randn(shape)
    out, grad = run(method, weight, tau_star, upstream)
    expected = st3_reference(weight.numpy(), tau_star / sqrt_s)
    torch.testing.assert_close(out.double(), torch.from_numpy(expected), rtol=1e-5, atol=1e-6)
    assert torch.equal(grad, upstream)


@pytest.mark.parametrize("final, theta", [(0.9, 1.0), (0.95, 1.0), (0.98, 0.5)])
def test_feather_forward_is_p3_threshold_and_gradient_is_theta_scaled_below_threshold(final, theta):
    method = fxsparse.Feather().resolve(final)
    assert method.theta == theta  # strict: 0.95 keeps theta = 1
    weight = torch.randn(6, 4, 3, 3)
    threshold = float(weight.abs().flatten().quantile(0.8))
    upstream = torch.randn_like(weight)
    out, grad = run(method, weight, threshold, upstream)
    torch.testing.assert_close(
        out.double(), torch.from_numpy(feather_reference(weight.numpy(), threshold)), rtol=1e-5, atol=1e-6
    )
    expected_grad = torch.where(weight.abs() > threshold, upstream, upstream * theta)
    torch.testing.assert_close(grad, expected_grad)
    assert not torch.isnan(out).any() and not torch.isnan(grad).any()


def test_gmp_masks_the_gradient_and_ste_passes_it_through():
    weight = torch.randn(10, 8)
    tau = float(weight.abs().flatten().quantile(0.5))
    keep = weight.abs() > tau
    upstream = torch.randn_like(weight)
    out, grad = run(fxsparse.Gmp(), weight, tau, upstream)
    assert torch.equal(out, weight * keep) and torch.equal(grad, upstream * keep)
    out, grad = run(fxsparse.Ste(), weight, tau, upstream)
    assert torch.equal(out, weight * keep) and torch.equal(grad, upstream)


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_method_contract(name, dtype):
    """Zeros exactly where score <= tau, gradient to every entry, shape/dtype kept (identity before the
    ramp is the parametrization's job: tests/test_sparsify.py checks it bitwise for every method)."""
    method = fxsparse.get_method(name).resolve(0.98 if name == "feather" else 0.9)
    weight = torch.randn(16, 8, 3, 3).to(dtype)
    score = method.score(weight)
    assert score.dtype == torch.float32
    tau = score.flatten().kthvalue(int(0.9 * score.numel())).values
    w = weight.clone().requires_grad_(True)
    out = method.apply(w, tau)
    assert out.shape == weight.shape and out.dtype == dtype
    pruned = score <= tau
    assert torch.all(out[pruned] == 0)
    # every kept entry is non-zero except where rounding to a low-precision dtype flushed it
    if dtype == torch.float32:
        assert torch.all(out[~pruned] != 0)
    out.float().sum().backward()
    reaches = w.grad != 0
    if name == "gmp":
        assert torch.equal(reaches, ~pruned)
    else:
        assert reaches.all(), f"{name} promises a gradient to every entry"


def test_registry_rejects_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        fxsparse.register_method("st3")(type("Again", (fxsparse.Method,), {}))
    with pytest.raises(ValueError, match="available methods: feather, gmp, st3, st3sigma, ste"):
        fxsparse.get_method("st4")
    assert fxsparse.get_method("FEATHER") == fxsparse.Feather()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_gives_the_same_values_for_any_memory_format(name):
    """channels_last weights (and a channels_last model) give the contiguous values and gradients, bit for bit."""
    method = fxsparse.get_method(name).resolve(0.98)  # Feather with theta 0.5: a scaled gradient too
    # 217,750 weights: Feather's pow took the scalar loop for other elements in either layout (one ulp apart)
    weight = torch.randn(130, 67, 5, 5)
    tau = method.score(weight).flatten().kthvalue(int(0.7 * weight.numel())).values
    upstream = torch.randn_like(weight)
    results = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        w = weight.to(memory_format=layout, copy=True).requires_grad_(True)
        out = method.apply(w, tau)
        out.backward(upstream.to(memory_format=layout))
        assert out.is_contiguous(memory_format=layout)  # the conv keeps its layout
        results[layout] = (out.detach().contiguous(), w.grad.contiguous())
    for a, b in zip(results[torch.contiguous_format], results[torch.channels_last]):
        assert torch.equal(a, b)
    # and through a whole sparsified conv model converted to channels_last
    dense = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    x = torch.randn(2, 3, 9, 9)
    outputs, grads = [], []
    for layout in (torch.contiguous_format, torch.channels_last):
        model = fxsparse.sparsify(dense, name, 0.7).to(memory_format=layout)
        out = model(x.to(memory_format=layout))
        out.square().sum().backward()
        outputs.append(out.detach().contiguous())
        grads.append([p.grad.contiguous() for p in model.parameters()])
    torch.testing.assert_close(outputs[0], outputs[1])  # the conv kernels differ by layout, not the weights
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
