"""Mixed and low precision: scores and tau in fp32, Feather's p=3 operator in fp32, exact sparsity under autocast;
deepcopy (EMA/SWA) and state_dict round trips of a sparsified model."""

import contextlib
import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

import fxsparse
from fxsparse.methods import METHODS, Feather

from models import TinyCNN, Untraceable

ALL_METHODS = sorted(METHODS)


@pytest.fixture
def flush_denormals():
    """CPU fp16/bf16 convolutions crawl on subnormal values (Feather makes a few); results are unaffected here."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def zeros_in_pool(model):
    counts = fxsparse.layer_densities(model).values()
    return sum(n - nz for nz, n in counts), sum(n for _, n in counts)


def expected_zeros(total, q):
    return math.floor((total - 1) * q) + 1  # entries at or below the linearly interpolated quantile


AUTOCAST_CASES = [(m, torch.bfloat16) for m in ALL_METHODS] + [
    ("feather", torch.float16),
    ("st3sigma", torch.float16),  # CPU fp16 convolutions are slow: two methods suffice
]


@pytest.mark.parametrize("method,dtype", AUTOCAST_CASES)
def test_training_under_autocast_reaches_the_exact_sparsity_with_fp32_tau(method, dtype, flush_denormals):
    model = fxsparse.sparsify(TinyCNN(), method, 0.8, fxsparse.Cubic(0, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    fxsparse.hook_optimizer(model, optimizer)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    threshold = fxsparse.get_threshold(model)
    for _ in range(5):
        with torch.autocast("cpu", dtype=dtype):
            out = model(x)
            loss = F.cross_entropy(out, y)
        assert out.dtype == dtype  # the model really ran in low precision
        assert threshold.tau.dtype == torch.float32
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    with torch.autocast("cpu", dtype=dtype):
        model.eval()(x)
    assert threshold.tau.dtype == torch.float32 and torch.isfinite(threshold.tau) and threshold.tau > 0
    zeros, total = zeros_in_pool(model)
    assert zeros == expected_zeros(total, 0.8)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_scores_are_fp32_for_half_weights(method):
    weight = (torch.randn(4, 3, 3, 3) * 0.1).to(torch.float16)
    scores = METHODS[method]().score(weight)
    assert scores.dtype == torch.float32
    threshold_model = fxsparse.sparsify(TinyCNN().to(torch.bfloat16), method, 0.5)
    threshold_model(torch.randn(2, 1, 8, 8, dtype=torch.bfloat16))
    assert fxsparse.get_threshold(threshold_model).tau.dtype == torch.float32


def test_feather_p3_operator_is_computed_in_fp32_for_fp16_weights():
    """|w|^3 of a small fp16 weight underflows in fp16 (1e-3^3 = 1e-9 < 6e-8); the operator must not."""
    weight = torch.tensor([1e-3, -2e-3, 4e-4, 5e-2], dtype=torch.float16)
    tau = torch.tensor(5e-4)
    method = Feather(theta=1.0)
    got = method.effective(weight, tau)
    assert got.dtype == torch.float16
    w32 = weight.float()
    want = torch.sign(w32) * (w32.abs().pow(3) - tau.pow(3)).clamp_min(0).pow(1 / 3) * (w32.abs() > tau)
    torch.testing.assert_close(got, want.to(torch.float16), rtol=0, atol=0)
    assert got[0] != 0 and got[2] == 0  # fp16 maths would have returned 0 for the kept 1e-3 entry
    # and under autocast the parametrized weight comes out of the operator in fp32 (the conv then casts it)
    model = fxsparse.sparsify(TinyCNN(), "feather", 0.5)
    with torch.autocast("cpu", dtype=torch.float16):
        model(torch.randn(2, 1, 8, 8))
        assert model.conv2.weight.dtype == torch.float32


@pytest.mark.parametrize("method", ["st3sigma", "feather"])
def test_deepcopy_is_an_independent_working_model(method):
    model = fxsparse.sparsify(TinyCNN(), method, 0.7, fxsparse.Cubic(0, 4))
    fxsparse.step_(model, 2)
    x = torch.randn(3, 1, 8, 8)
    reference = model.eval()(x)
    ema = copy.deepcopy(model)
    threshold = fxsparse.get_threshold(ema)
    assert threshold is not fxsparse.get_threshold(model) and threshold.current_step == 2
    for entry in fxsparse.pool.sparse_entries(ema):  # every layer reads the copy's tau, not the original's
        assert entry.parametrization.threshold is threshold
    torch.testing.assert_close(ema.eval()(x), reference, rtol=0, atol=0)
    with torch.no_grad():  # an EMA update moves the copy only
        for p in ema.parameters():
            p.mul_(0.5)
    ema(x)
    assert not torch.equal(threshold.tau, fxsparse.get_threshold(model).tau)
    torch.testing.assert_close(model(x), reference, rtol=0, atol=0)


def test_deepcopy_of_the_pre_hook_fallback_model():
    with pytest.warns(UserWarning):
        model = fxsparse.sparsify(Untraceable(), "st3", 0.5)
    twin = copy.deepcopy(model)
    x = torch.randn(4, 6)
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    with torch.no_grad():
        twin.a.parametrizations.weight.original.mul_(3)
    twin(x)
    assert not torch.equal(fxsparse.get_threshold(twin).tau, fxsparse.get_threshold(model).tau)
    fxsparse.fold_(twin)  # the copied hook handle removes the copy's hook
    assert not twin._forward_pre_hooks and model._forward_pre_hooks


@pytest.mark.parametrize("method", ["st3", "feather"])
def test_state_dict_round_trips_through_torch_save(method):
    model = fxsparse.sparsify(TinyCNN(), method, 0.6, fxsparse.Cubic(0, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 1, 8, 8)
    for _ in range(3):
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
        fxsparse.step_(model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert {"fxsparse_threshold.step", "fxsparse_threshold.tau"} <= set(state)
    fresh = fxsparse.sparsify(TinyCNN(), method, 0.6, fxsparse.Cubic(0, 5))
    fresh.load_state_dict(state)
    assert fxsparse.get_threshold(fresh).current_step == 3
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x), rtol=0, atol=0)
    torch.testing.assert_close(fxsparse.get_threshold(fresh).tau, fxsparse.get_threshold(model).tau, rtol=0, atol=0)


@pytest.mark.parametrize("factory", [TinyCNN, Untraceable])
def test_folding_a_copy_leaves_the_original_working_and_vice_versa(factory):
    """copy.deepcopy shares torch's parametrized module classes; folding one copy must not strip the others."""
    with pytest.warns(UserWarning) if factory is Untraceable else contextlib.nullcontext():
        model = fxsparse.sparsify(factory(), "st3", 0.5)
    x = torch.randn(3, 1, 8, 8) if factory is TinyCNN else torch.randn(3, 6)
    reference = model.eval()(x)
    folded = fxsparse.fold(model)  # fold() folds a deepcopy
    ema = copy.deepcopy(model)
    fxsparse.fold_(ema)
    torch.testing.assert_close(model(x), reference, rtol=0, atol=0)
    torch.testing.assert_close(folded(x), reference)
    torch.testing.assert_close(ema(x), reference)
    twin = copy.deepcopy(model)
    fxsparse.fold_(model)  # and the other way round: the live model folded, its copy still sparse
    torch.testing.assert_close(twin.eval()(x), reference, rtol=0, atol=0)
    assert fxsparse.is_sparsified(twin) and not fxsparse.is_sparsified(model)
    assert all("Parametrized" not in type(m).__name__ for m in model.modules())


def test_a_loaded_checkpoint_reports_its_sparsity_before_any_forward():
    model = fxsparse.sparsify(TinyCNN(), "feather", 0.7)
    model(torch.randn(2, 1, 8, 8))
    fresh = fxsparse.sparsify(TinyCNN(), "feather", 0.7)
    fresh.load_state_dict(model.state_dict())
    assert fxsparse.realized_sparsity(fresh) == fxsparse.realized_sparsity(model) == pytest.approx(0.7, abs=0.01)
