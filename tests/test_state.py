"""The state a user owns: the threshold's buffers through meta init, dtype casts and .data writes; the optimizer
and schedule calls (issue 10 item 6). Each misuse gets a clear error or a warning that says what to do."""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fxsparse
from fxsparse import GlobalThreshold
from fxsparse.pool import pooled_weights

from models import TinyCNN


def train_steps(model, optimizer, steps, step_schedule=True):
    for _ in range(steps):
        x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if step_schedule:
            fxsparse.step_(model)


# --- meta-device init + to_empty ------------------------------------------------------------------


@pytest.mark.parametrize("in_place", [False, True])
def test_meta_init_then_to_empty_keeps_step_and_frozen_and_recomputes_tau(in_place):
    reference = fxsparse.sparsify(TinyCNN(), "st3sigma", 0.8, fxsparse.Cubic(0, 4))
    with torch.device("meta"):
        model = TinyCNN()
    if in_place:
        fxsparse.sparsify_(model, "st3sigma", 0.8, fxsparse.Cubic(0, 4))
    else:
        model = fxsparse.sparsify(model, "st3sigma", 0.8, fxsparse.Cubic(0, 4))
    for m in (model, reference):
        fxsparse.step_(m, 2)
    model.to_empty(device="cpu")
    threshold = fxsparse.get_threshold(model)
    assert threshold.tau.device.type == "cpu"
    assert int(threshold.step) == 2 and not bool(threshold.frozen) and float(threshold.tau) == 0.0
    state = model.state_dict()  # what a checkpoint taken now would hold
    assert int(state[[k for k in state if k.endswith("threshold.step")][0]]) == 2
    params = dict(model.named_parameters())
    with torch.no_grad():  # the user's initialisation: here the reference's weights and statistics
        for name, value in reference.state_dict().items():
            if "threshold" not in name:
                (params[name] if name in params else model.get_buffer(name)).copy_(value)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(model.eval()(x), reference.eval()(x))
    assert torch.equal(threshold.tau, fxsparse.get_threshold(reference).tau) and float(threshold.tau) > 0


# --- dtype casts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cast", [lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.double()])
def test_casting_the_model_keeps_tau_fp32_and_exact(cast):
    model = fxsparse.sparsify(TinyCNN(), "st3", 0.6)
    model(torch.randn(2, 1, 8, 8))
    before = fxsparse.get_threshold(model).tau.clone()
    cast(model)
    threshold = fxsparse.get_threshold(model)
    assert threshold.tau.dtype == torch.float32 and torch.equal(threshold.tau, before)
    assert model.state_dict()["fxsparse_threshold.tau"].dtype == torch.float32
    dtype = next(model.parameters()).dtype
    model(torch.randn(2, 1, 8, 8, dtype=dtype))  # recomputed from the cast weights, still fp32
    assert threshold.tau.dtype == torch.float32
    assert torch.equal(threshold.tau, fxsparse.global_quantile(pooled_weights(model), 0.6))


# --- writes autograd cannot see ---------------------------------------------------------------------------


def test_writes_through_data_are_caught_by_fold_and_fixed_by_refresh():
    model = fxsparse.sparsify(TinyCNN(), "st3", 0.5).eval()
    x = torch.randn(2, 1, 8, 8)
    model(x)
    raw = model.fc.parametrizations.weight.original
    raw.data.mul_(4.0)  # invisible to version counters: tau is stale
    stale = fxsparse.get_threshold(model).tau.clone()
    with pytest.warns(UserWarning, match=r"tau was stale.*fxsparse.refresh_\(model\)"):
        folded = fxsparse.fold(model)  # folds with tau recomputed from the weights as they are
    expected = fxsparse.global_quantile(pooled_weights(model), 0.5)
    assert not torch.equal(stale, expected) and torch.equal(fxsparse.get_threshold(model).tau, stale)  # input untouched
    reference = fxsparse.sparsify(TinyCNN(), "st3", 0.5).eval()
    reference.load_state_dict(model.state_dict())  # same raw weights, a threshold that has never seen them
    torch.testing.assert_close(folded(x), reference(x), rtol=0, atol=0)
    fxsparse.refresh_(model)  # the documented call after such writes
    assert torch.equal(fxsparse.get_threshold(model).tau, expected)
    assert torch.equal(model(x), reference(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fxsparse.fold(model)  # tau current: no warning


# --- an optimizer built before sparsify ---------------------------------------------------------------


def test_hook_optimizer_refuses_an_optimizer_of_the_original_model():
    dense = TinyCNN()
    optimizer = torch.optim.SGD(dense.parameters(), lr=0.1)
    model = fxsparse.sparsify(dense, "st3", 0.5)
    with pytest.raises(ValueError, match=r"holds none of this model's parameters.*sparse_model\.parameters.*sparsify_"):
        fxsparse.hook_optimizer(model, optimizer)
    in_place = TinyCNN()
    optimizer = torch.optim.SGD(in_place.parameters(), lr=0.1)
    fxsparse.sparsify_(in_place, "st3", 0.5)
    fxsparse.hook_optimizer(in_place, optimizer)  # in place keeps the parameter objects: fine


def test_step_warns_when_the_optimizer_trains_the_original_model():
    dense = TinyCNN()
    optimizer = torch.optim.SGD(dense.parameters(), lr=0.1)
    model = fxsparse.sparsify(dense, "st3", 0.5)
    with pytest.warns(UserWarning, match=r"have not changed over the last 2 steps.*built before sparsify"):
        train_steps(model, optimizer, 3)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, fused=True),  # no version bumps
        lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    ],
)
def test_no_false_alarm_for_optimizers_that_do_train_the_model(make):
    model = fxsparse.sparsify(TinyCNN(), "st3", 0.5)
    optimizer = make(model.parameters())
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: step / 3)  # lr 0 at the first step
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(8):
            train_steps(model, optimizer, 1)
            warmup.step()


def test_no_false_alarm_for_frozen_weights_or_steps_without_gradients():
    model = fxsparse.sparsify(TinyCNN(), "st3", 0.5)
    for param in model.parameters():
        param.requires_grad_(param.dim() == 1)  # conv/linear weights frozen, biases and norms train
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_steps(model, optimizer, 4)
        fxsparse.step_(fxsparse.sparsify(TinyCNN(), "st3", 0.5), 3)  # no training at all: no gradients


# --- the schedule calls ------------------------------------------------------------------------------------


def test_hook_optimizer_twice_steps_once_and_says_so():
    model = fxsparse.sparsify(TinyCNN(), "st3", 0.5, fxsparse.Cubic(0, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = fxsparse.hook_optimizer(model, optimizer)
    with pytest.warns(UserWarning, match="already called for this model and optimizer"):
        again = fxsparse.hook_optimizer(model, optimizer)
    assert again is first
    train_steps(model, optimizer, 3, step_schedule=False)
    assert fxsparse.get_threshold(model).current_step == 3
    first.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fxsparse.hook_optimizer(model, optimizer)  # removed: hooking again is a fresh hook
    train_steps(model, optimizer, 1, step_schedule=False)
    assert fxsparse.get_threshold(model).current_step == 4
    ema = copy.deepcopy(model)  # a copy has its own threshold: hooking it is not a duplicate
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fxsparse.hook_optimizer(ema, torch.optim.SGD(ema.parameters(), lr=0.1))


@pytest.mark.parametrize(
    "bad,error",
    [
        (-1, ValueError),
        (0.5, TypeError),
        (1.0, TypeError),
        (True, TypeError),
        ("1", TypeError),
        (None, TypeError),
        (torch.tensor(True), TypeError),
    ],
)
def test_step_refuses_negative_fractional_and_bool_steps(bad, error):
    model = fxsparse.sparsify(TinyCNN(), "st3", 0.5, fxsparse.Cubic(0, 10))
    with pytest.raises(error, match="whole number of optimizer steps|must be >= 0"):
        fxsparse.step_(model, bad)
    assert fxsparse.get_threshold(model).current_step == 0


def test_step_accepts_integers_of_any_kind():
    model = fxsparse.sparsify(TinyCNN(), "st3", 0.5, fxsparse.Cubic(0, 10))
    for steps in (0, 2, np.int64(3), torch.tensor(4)):
        fxsparse.step_(model, steps)
    assert fxsparse.get_threshold(model).current_step == 9 and int(fxsparse.get_threshold(model).step) == 9


@pytest.mark.parametrize("in_place", [False, True])
def test_exclude_patterns_that_match_nothing_are_named(in_place):
    model = TinyCNN()
    with pytest.warns(
        UserWarning,
        match=r"exclude pattern\(s\) \['fc', 'head\.\*'\] match no conv/linear weight.*"
        r"'conv1\.weight'.*'head\.weight'",
    ):
        if in_place:
            fxsparse.sparsify_(model, "st3", 0.5, exclude=["fc", "conv1.*", "head.*"])
        else:
            model = fxsparse.sparsify(model, "st3", 0.5, exclude=["fc", "conv1.*", "head.*"])
    assert fxsparse.get_threshold(model).pool_paths == [
        "conv2.parametrizations.weight.original",
        "depthwise.parametrizations.weight.original",
        "fc.parametrizations.weight.original",
    ]


# --- GlobalThreshold, built complete ------------------------------------------------------------------


def test_global_threshold_is_built_complete_with_a_public_step():
    weights = {
        "a.parametrizations.weight.original": torch.randn(4, 3),
        "b.parametrizations.weight.original": torch.randn(5),
    }
    threshold = GlobalThreshold(fxsparse.St3(), 0.5, fxsparse.Cubic(0, 4), weights)
    assert threshold.pool_paths == list(weights) and threshold.pool_size == 17
    assert threshold.current_step == 0 and threshold.target_sparsity() == 0.0
    threshold.advance_(4)
    assert threshold.current_step == 4 and int(threshold.step) == 4 and threshold.target_sparsity() == 0.5
    threshold(*weights.values())
    assert torch.equal(threshold.tau, fxsparse.global_quantile(list(weights.values()), 0.5))
    with pytest.raises(ValueError, match="at least one pooled weight"):
        GlobalThreshold(fxsparse.St3(), 0.5, fxsparse.Constant(), {})
