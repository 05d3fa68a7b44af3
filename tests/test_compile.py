"""torch.compile of a sparsified model: same outputs and gradients as eager, no recompile as the schedule advances.

The threshold node runs eagerly (torch.compiler.disable on GlobalThreshold.forward: one graph break
at the top of forward), so neither the Python step counter nor the quantile's data-dependent code
enters a compiled graph; tau reaches the graph as a buffer, whose value dynamo does not guard on.
The one host flag the layers read (``GlobalThreshold.prunes``: dense before the ramp) gives exactly
one more graph when the ramp starts, never one per step.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import fxsparse
from fxsparse.methods import METHODS

from models import TinyCNN, Untraceable

torch._dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _train_side_by_side(eager, compiled_model, compiled, steps, x, y):
    """Train two copies in lockstep; yield (eager out, compiled out, grads) before each optimizer step."""
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.02)
    opt_c = torch.optim.SGD(compiled_model.parameters(), lr=0.02)
    for _ in range(steps):
        out_e, out_c = eager(x), compiled(x)
        F.cross_entropy(out_e, y).backward()
        F.cross_entropy(out_c, y).backward()
        grads = [(a.grad, b.grad) for a, b in zip(eager.parameters(), compiled_model.parameters())]
        yield out_e, out_c, grads
        for opt in (opt_e, opt_c):
            opt.step()
            opt.zero_grad()
        fxsparse.step_(eager)
        fxsparse.step_(compiled_model)


FAST = ("st3", "feather")  # identity gradient / scaled gradient with saved tensors; the rest under -m slow


@pytest.mark.parametrize(
    "method", [m if m in FAST else pytest.param(m, marks=pytest.mark.slow) for m in sorted(METHODS)]
)
def test_compiled_outputs_and_gradients_equal_eager_and_one_graph_serves_every_pruning_step(method):
    """aot_eager: dynamo + AOTAutograd (the autograd.Function with its Method argument), no codegen."""
    eager = fxsparse.sparsify(TinyCNN(), method, 0.8, fxsparse.Cubic(0, 4))
    model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    frames = []
    for out_e, out_c, grads in _train_side_by_side(eager, model, compiled, 6, x, y):
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
        for g_e, g_c in grads:
            torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fxsparse.get_threshold(model).tau, fxsparse.get_threshold(eager).tau)
        frames.append(counter.frame_count)
    assert fxsparse.get_threshold(model).current_step == 6  # the ramp ran (0 -> 0.8 over steps 0..4, then held) ...
    # ... on two graphs: the dense one before the ramp (step 0) and the pruning one that serves every later step
    assert frames == [1, 2, 2, 2, 2, 2], frames


@pytest.mark.parametrize("method", ["feather", pytest.param("st3sigma", marks=pytest.mark.slow)])
def test_inductor_matches_eager_and_does_not_recompile_along_the_schedule(method):
    eager = fxsparse.sparsify(TinyCNN(), method, 0.8, fxsparse.Cubic(0, 2))
    model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    for out_e, out_c, grads in _train_side_by_side(eager, model, compiled, 4, x, y):
        torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
        for g_e, g_c in grads:
            torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 2  # dense before the ramp (step 0), then one graph for every pruning step
    compiled.eval()(x)  # eval mode (BatchNorm) is one more graph
    assert counter.frame_count == 3
    assert fxsparse.realized_sparsity(model) == pytest.approx(0.8, abs=1 / fxsparse.get_threshold(model).pool_size)


def test_compiled_untraceable_model_with_the_pre_hook_threshold():
    """The module-walking fallback (threshold as a forward pre-hook) compiles too."""
    with pytest.warns(UserWarning):
        eager = fxsparse.sparsify(Untraceable(), "st3", 0.5, fxsparse.Cubic(0, 3))
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager")
    x, y = torch.randn(5, 6), torch.randint(0, 2, (5,))
    for out_e, out_c, grads in _train_side_by_side(eager, model, compiled, 4, x, y):
        torch.testing.assert_close(out_c, out_e)
        for g_e, g_c in grads:
            torch.testing.assert_close(g_c, g_e)


def test_step_helpers_see_through_the_compiled_wrapper():
    model = fxsparse.sparsify(TinyCNN(), "feather", 0.5, fxsparse.Cubic(0, 10))
    compiled = torch.compile(model, backend="eager")
    fxsparse.step_(compiled)
    assert fxsparse.get_threshold(model).current_step == 1
