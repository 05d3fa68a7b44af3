"""Never slower end to end (issue 16): accelerate() times the whole model against its dense twin and keeps
only what wins. The timers are injected, so these tests decide deterministically (no timing assertions);
outputs are compared with the folded model's."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse.inference import AccelerationPlan, SparseConv2d, SparseLinear, interleaved_medians, skeleton

from test_inference import prune_ as prune_at_random_


def prune_(model: nn.Module, density: float = 0.2) -> nn.Module:
    return prune_at_random_(model, density, seed=0)


class Net(nn.Module):
    """conv-BN-ReLU, max pooling, conv, a head: three convertible layers and one foldable BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.relu(self.conv2(x)).mean((2, 3)))


def layer_timer(dense_seconds=(4.0, 3.0, 2.0)):
    """A per-layer timer: the layers, in call order, take ``dense_seconds`` dense and 1.0 on any sparse path
    (every layer wins alone; by default the first saves most)."""
    order = iter(dense_seconds)

    def timer(candidates):
        dense = next(order)
        return {name: dense if name == "dense" else 1.0 for name in candidates}

    return timer


def model_timer(fastest: str):
    """A whole-model timer under which ``fastest`` wins, then dense, then the rest; it records its calls."""

    def timer(candidates):
        timer.calls.append(sorted(candidates))
        return {name: 1.0 if name == fastest else 2.0 if name == "dense" else 3.0 for name in candidates}

    timer.calls = []
    return timer


def run(model, x):
    with torch.no_grad():
        return model(x)


def assert_same(out, ref, tol=1e-5):
    assert out.shape == ref.shape
    assert float((out - ref).abs().max()) <= tol * float(ref.abs().max())


def test_sparse_model_that_wins_end_to_end_is_kept_and_the_plan_says_so():
    model, x = prune_(Net()), torch.randn(2, 3, 8, 8)
    fast = fxsparse.accelerate(model, x, timer=layer_timer(), model_timer=model_timer("sparse"))
    assert isinstance(fast.conv1, SparseConv2d) and isinstance(fast.fc, SparseLinear)
    whole = fast.fxsparse_plan.end_to_end
    assert whole["chosen"] == "sparse" and whole["sparse_layers"] == 3
    assert whole["ms"] == {"dense": 2000.0, "sparse": 1000.0}
    assert "2.00x faster than dense end to end" in whole["reason"]
    assert "whole model, end to end" in fast.fxsparse_plan.table()
    again = AccelerationPlan.from_dict(json.loads(json.dumps(fast.fxsparse_plan.to_dict())))
    assert again.end_to_end == whole and again.table() == fast.fxsparse_plan.table()
    assert_same(run(fast, x), run(model, x))


def test_model_where_sparse_cannot_win_comes_back_dense():
    model, x = prune_(Net()), torch.randn(2, 3, 8, 8)
    timer = model_timer("dense")
    fast = fxsparse.accelerate(model, x, timer=layer_timer(), model_timer=timer)
    # every layer won alone; the whole model lost, so did every subset: all plain modules, BN folded
    assert timer.calls == [["dense", "sparse"], ["dense", "top 1"]]
    assert [type(m) for m in (fast.conv1, fast.conv2, fast.fc)] == [nn.Conv2d, nn.Conv2d, nn.Linear]
    assert not any(isinstance(m, (SparseConv2d, SparseLinear, nn.BatchNorm2d)) for m in fast.modules())
    assert all(type(m).__module__.startswith("torch.") for m in fast.modules())  # the dense model, nothing else
    plan = fast.fxsparse_plan
    assert plan.end_to_end["chosen"] == "dense" and plan.end_to_end["sparse_layers"] == 0
    assert set(plan.end_to_end["ms"]) == {"dense", "sparse", "top 1"}
    assert all(p.path == "dense" and "dense end to end" in p.reason for p in plan.layers)
    assert plan.layers[0].dense_ms == 4000.0 and plan.layers[0].sparse_ms == 1000.0  # the per-layer figures stay
    assert_same(run(fast, x), run(model, x))
    result = fxsparse.measure_speedup(model, x, repeats=2, accelerated=fast)
    assert result["speedup"] == 1.0 and result["sparse_layers"] == 0 and result["end_to_end"]["chosen"] == "dense"


def test_only_the_layers_that_saved_most_are_kept_when_they_win():
    model, x = (
        prune_(nn.Sequential(Net(), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 3))),
        torch.randn(1, 3, 8, 8),
    )
    timer = layer_timer((4.0, 3.0, 2.0, 1.5, 1.25))  # savings alone: 0.conv1 3, 0.conv2 2, 0.fc 1, 2 0.5, 4 0.25
    fast = fxsparse.accelerate(model, x, timer=timer, model_timer=model_timer("top 1"))
    assert fast.fxsparse_plan.end_to_end["chosen"] == "top 1"
    assert set(fast.fxsparse_plan.end_to_end["ms"]) == {"dense", "sparse", "top 2", "top 1"}
    assert {p.name: p.path for p in fast.fxsparse_plan.layers} == {
        "0.conv1": fast.fxsparse_plan.layers[0].best_sparse,
        "0.conv2": "dense",
        "0.fc": "dense",
        "2": "dense",
        "4": "dense",
    }
    sparse = [n for n, m in fast.named_modules() if isinstance(m, (SparseConv2d, SparseLinear))]
    assert sparse == ["0.conv1"]
    assert_same(run(fast, x), run(model, x))


def test_checkpoint_build_falls_back_to_dense_from_its_csr(tmp_path):
    model, x = prune_(Net()), torch.randn(1, 3, 8, 8)
    file = tmp_path / "net.safetensors"
    fxsparse.save_csr(model, file)
    with skeleton():
        skeleton_model = Net()
    fast = fxsparse.accelerate_checkpoint(
        file, skeleton_model, x, timer=layer_timer(), model_timer=model_timer("dense")
    )
    assert fast.fxsparse_plan.end_to_end["chosen"] == "dense"
    assert [type(m) for m in (fast.conv1, fast.conv2, fast.fc)] == [nn.Conv2d, nn.Conv2d, nn.Linear]
    assert_same(run(fast, x), run(model, x))


def test_when_the_whole_model_is_timed():
    model, x = prune_(Net()), torch.randn(1, 3, 8, 8)
    timer = model_timer("sparse")
    given = fxsparse.accelerate(model, x, timer=layer_timer(), end_to_end=False).fxsparse_plan.paths()
    fast = fxsparse.accelerate(model, x, paths=given, model_timer=timer)  # a model_timer asks for it
    assert timer.calls == [["dense", "sparse"]] and fast.fxsparse_plan.end_to_end["chosen"] == "sparse"
    fast = fxsparse.accelerate(model, x, paths=given)  # a given plan: nothing timed
    assert fast.fxsparse_plan.end_to_end is None and isinstance(fast.conv1, SparseConv2d)
    fast = fxsparse.accelerate(model, x, timer=layer_timer())  # a deterministic policy
    assert fast.fxsparse_plan.end_to_end is None and isinstance(fast.conv1, SparseConv2d)
    fast = fxsparse.accelerate(model, x, timer=layer_timer(), end_to_end=False, model_timer=model_timer("dense"))
    assert fast.fxsparse_plan.end_to_end is None


@pytest.mark.parametrize("threads", [1, 2])
def test_default_timers_keep_outputs_and_record_the_whole_model(threads):
    """Real timing, both levels: whatever wins, outputs are the folded model's and the plan holds both figures."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, x = prune_(Net(), density=0.05), torch.randn(1, 3, 16, 16)
        fast = fxsparse.accelerate(model, x, timer=layer_timer(), end_to_end=True)  # every layer sparse alone
        whole = fast.fxsparse_plan.end_to_end
        assert whole["ms"]["dense"] > 0 and whole["ms"]["sparse"] > 0 and whole["chosen"] in whole["ms"]
        assert len(fast.fxsparse_plan.sparse_layers) == whole["sparse_layers"]
        assert_same(run(fast, x), run(model, x))
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("settle_s", [0.0, 1e-9])
def test_interleaved_rounds_rotate_and_settle_each_sample_on_its_own_candidate(settle_s):
    """Each round times every candidate once, the order rotating; with settle_s, an untimed call of the same
    candidate comes just before each sample's clock starts (one call: settle_s is shorter than any call)."""
    events = []

    def clock():
        events.append("clock")
        return float(len(events))

    candidates = {name: (lambda name=name: events.append(name)) for name in ("a", "b", "c")}
    times = interleaved_medians(candidates, repeats=3, warmup=1, min_sample_s=0.0, settle_s=settle_s, clock=clock)
    assert set(times) == {"a", "b", "c"} and all(t > 0 for t in times.values())
    assert events[:9] == ["clock", "a", "clock", "clock", "b", "clock", "clock", "c", "clock"]  # the warm-up
    rounds = events[9:]
    rotated = ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    if settle_s:
        assert rounds[0::4] == rotated and rounds[1::4] == ["clock"] * 9 and rounds[2::4] == rotated
    else:
        assert rounds[0::3] == ["clock"] * 9 and rounds[1::3] == rotated


def test_paired_figures_keep_the_first_candidates_median_and_pair_the_ratios():
    """paired=True: the first candidate keeps its median; another's figure is that median times the median over
    the rounds of its ratio to the first in the same round (1.1, 1.1, 0.95 here), not its own median."""
    rounds = {"a": [1.0, 2.0, 2.0], "b": [1.1, 2.2, 1.9]}

    def run(paired):
        now, left = [0.0], {name: [9.0, *times] for name, times in rounds.items()}  # a warm-up call first

        def candidate(name):
            def call():
                now[0] += left[name].pop(0)

            return call

        candidates = {name: candidate(name) for name in rounds}
        return interleaved_medians(
            candidates, repeats=3, warmup=1, min_sample_s=0.0, paired=paired, clock=lambda: now[0]
        )

    assert run(paired=False) == pytest.approx({"a": 2.0, "b": 1.9})
    assert run(paired=True) == pytest.approx({"a": 2.0, "b": 2.2})
