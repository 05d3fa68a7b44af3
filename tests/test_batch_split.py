"""A batch run a sample per thread (issue 16, fxsparse/inference/batch_split.py): taken only for a
batch-independent traced model, only when it wins (timers injected: deterministic), and only on a plain call;
outputs are the folded model's, and anything that watches the call sees the whole batch."""

import copy
import threading

import pytest
import torch
from test_end_to_end import Net, assert_same, layer_timer, prune_, run
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fxsparse
from fxsparse.inference import batch_split, native
from fxsparse.inference.batch_split import SPLIT, WHOLE

pytestmark = pytest.mark.skipif(not native.available(), reason="needs the compiled kernels")


def split_timer(fastest: str):
    """The whole model: sparse beats dense; the batch: ``fastest`` (SPLIT or WHOLE) wins. Records its calls."""

    def timer(candidates):
        timer.calls.append(sorted(candidates))
        order = {"sparse": 1.0, "dense": 2.0, fastest: 1.0}
        return {name: order.get(name, 3.0) for name in candidates}

    timer.calls = []
    return timer


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def accelerated(model, x, fastest=SPLIT):
    timer = split_timer(fastest)
    return fxsparse.accelerate(model, x, timer=layer_timer(), model_timer=timer), timer


def test_a_batch_independent_model_is_split_when_it_wins_and_computes_the_same(two_threads):
    model, x = prune_(Net()), torch.randn(5, 3, 8, 8)
    fast, timer = accelerated(model, x)
    record = fast.fxsparse_plan.batch_split
    assert timer.calls[-1] == sorted([WHOLE, SPLIT]) and record["chosen"] and record["workers"] == 2
    assert batch_split.is_split(fast) and "a sample per thread" in fast.fxsparse_plan.table()
    assert_same(run(fast, x), run(model, x))
    assert_same(run(fast, x[:1]), run(model, x[:1]))  # a single sample: run whole
    assert run(fast, x[:0]).shape == (0, 5)
    with torch.inference_mode():  # the caller's modes reach the workers
        assert fast(x).is_inference()
    assert fxsparse.inference.AccelerationPlan.from_dict(fast.fxsparse_plan.to_dict()).batch_split == record


def test_the_samples_run_on_workers_with_one_thread_each(two_threads, monkeypatch):
    model, x = prune_(Net()), torch.randn(4, 3, 8, 8)
    fast, _ = accelerated(model, x)
    seen = []
    kernel = fast.conv2.forward

    def watched(*args, **kwargs):  # not a hook: a hook turns the split off
        seen.append((threading.current_thread().name, args[0].shape[0], torch.get_num_threads()))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(fast.conv2, "forward", watched)
    run(fast, x)
    assert len(seen) == 4 and all(n == 1 and threads == 1 for _, n, threads in seen)
    assert all(name.startswith("fxsparse-sample") for name, _, _ in seen)
    assert torch.get_num_threads() == 2  # the caller's thread count is untouched


def test_not_split_when_it_does_not_win_or_at_one_sample(two_threads):
    model = prune_(Net())
    fast, _ = accelerated(model, torch.randn(4, 3, 8, 8), fastest=WHOLE)
    assert not fast.fxsparse_plan.batch_split["chosen"] and not batch_split.is_split(fast)
    fast, timer = accelerated(model, torch.randn(1, 3, 8, 8))
    assert sorted([WHOLE, SPLIT]) not in timer.calls
    assert "batch of 2 or more" in fast.fxsparse_plan.batch_split["reason"]


class BatchMixing(nn.Module):
    """Each sample minus the batch's mean: its output depends on the other samples."""

    def __init__(self):
        super().__init__()
        self.net = Net()

    def forward(self, x):
        return self.net(x - x.mean(0, keepdim=True))


def test_a_model_whose_samples_interact_is_never_split(two_threads):
    model, x = prune_(BatchMixing()), torch.randn(4, 3, 8, 8)
    fast, timer = accelerated(model, x)
    assert "samples interact" in fast.fxsparse_plan.batch_split["reason"]
    assert sorted([WHOLE, SPLIT]) not in timer.calls and not batch_split.is_split(fast)
    assert_same(run(fast, x), run(model, x))


class OpsSeen(TorchDispatchMode):
    """The aten ops called under it (on this thread), with their first argument's shape."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = args[0] if args else None
        self.ops.append((str(func), tuple(first.shape) if isinstance(first, torch.Tensor) else None))
        return func(*args, **(kwargs or {}))


def test_what_watches_the_call_sees_the_whole_batch(two_threads):
    model, x = prune_(Net()), torch.randn(4, 3, 8, 8)
    fast, _ = accelerated(model, x)
    assert batch_split.is_split(fast)
    fast_copy = copy.deepcopy(fast)  # a copy has a new class: it runs whole, and computes the same
    assert_same(run(fast_copy, x), run(model, x))

    shapes = []
    handle = fast.conv2.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    run(fast, x)
    handle.remove()
    assert [s[0] for s in shapes] == [4]  # a hook on a layer: one call, on the whole batch

    with OpsSeen() as split:  # a dispatch mode (a FLOP counter, say) would miss the workers' calls
        run(fast, x)
    with OpsSeen() as whole:
        run(fast_copy, x)
    assert split.ops == whole.ops and len(split.ops) > 0

    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the whole batch, as the model runs it
        assert fast(x).shape == (4, 5)


def test_a_worker_thread_gets_one_intra_op_thread(two_threads):
    assert batch_split.worker_threads() == 1
    assert torch.get_num_threads() == 2
    assert native.kernels().set_thread_count(2) == 2  # the calling thread only: set back to what it was


def test_a_split_model_compiles_and_exports_as_the_whole_batch(two_threads):
    model, x = prune_(Net()), torch.randn(4, 3, 8, 8)
    fast, _ = accelerated(model, x)
    assert batch_split.is_split(fast)
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)
    assert_same(run(compiled, x), run(model, x))
    program = torch.export.export(fast, (x,))
    assert_same(program.module()(x), run(model, x))


def test_a_plan_given_as_paths_rebuilds_the_split_without_timing(two_threads):
    model, x = prune_(Net()), torch.randn(4, 3, 8, 8)
    fast, _ = accelerated(model, x)
    plan = fxsparse.inference.AccelerationPlan.from_dict(fast.fxsparse_plan.to_dict())
    again = fxsparse.accelerate(model, x, paths=plan)
    assert batch_split.is_split(again) and "not timed" in again.fxsparse_plan.batch_split["reason"]
    assert_same(run(again, x), run(model, x))
    mixing = prune_(BatchMixing())  # the checks still run: a plan cannot make a model split that must not
    assert not batch_split.is_split(fxsparse.accelerate(mixing, x, paths=plan))
    unsplit, _ = accelerated(model, x, fastest=WHOLE)
    assert not batch_split.is_split(fxsparse.accelerate(model, x, paths=unsplit.fxsparse_plan))
