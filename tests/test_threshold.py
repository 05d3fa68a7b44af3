"""global_quantile is bit-exact: against sort-and-interpolate (reference_quantile) and numpy.quantile
(method="linear"), on both selection strategies, cold and warm, and sharded over two gloo ranks.

numpy >= 2 computes the quantile of an fp32 array at a Python-float q in fp32, with the weight
gamma = (n-1)q - floor((n-1)q) rounded to fp32 and the same upper-end form for gamma >= 0.5 as
lerp_like_numpy, so no ulp of difference is expected (and none is allowed here).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxsparse import threshold as th
from fxsparse.threshold import global_quantile, layer_scaled_abs, reference_quantile

from conftest import pass_layers

STRATEGIES = ("window", "radix")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
NUMPY2 = int(np.__version__.split(".")[0]) >= 2


def _abs(i, t):
    """|w| through a plain function: not marked elementwise, so scored a whole layer at a time."""
    return th._abs_score(i, t)


def _numpy_quantile(tensors, q, score_fn=th._abs_score):
    scores = [score_fn(i, t).detach().reshape(-1).cpu().numpy() for i, t in enumerate(tensors)]
    scores = np.concatenate(scores)
    return np.quantile(scores, q, method="linear")


def _sigma_scale(t):
    return math.sqrt(sum(t.shape)) if t.dim() else 1.0


def _sigma_score(i, t):
    """ST-3-sigma's score as a method would write it: shape-dependent, so not elementwise."""
    return t.detach().abs().float() * _sigma_scale(t)


def _identity_score(i, t):
    """Signed scores: exercises negative values, -0.0 and the sign handling of the radix keys."""
    return t.detach().float()


def assert_exact(tensors, q, score_fn=th._abs_score, hints=(None,), strategies=STRATEGIES):
    """global_quantile == reference_quantile == numpy.quantile, bitwise, on every strategy and hint;
    the default |w| both chunked (elementwise) and a whole layer at a time."""
    ref = reference_quantile(tensors, q, score_fn)
    assert ref.dtype == torch.float32
    if NUMPY2:
        expected = _numpy_quantile(tensors, q, score_fn)
        assert expected.dtype == np.float32 and float(expected) == float(ref), (q, expected, ref)
    for fn in (score_fn, _abs) if score_fn is th._abs_score else (score_fn,):
        for strategy in strategies:
            for hint in hints:
                got = th._global_quantile(tensors, q, fn, None, hint, strategy)
                assert got.dtype == torch.float32 and got.shape == ()
                assert torch.equal(got, ref), (fn.__name__, strategy, hint, q, got.item(), ref.item())
    assert torch.equal(global_quantile(tensors, q, score_fn, hint=hints[-1]), ref)
    return ref


def _layers(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 3, 3, 3), (32, 16, 1, 1), (32, 1, 3, 3), (10, 32), (7,), ()]
    return [(torch.randn(s, generator=g) * (0.1 + i)).to(dtype) for i, s in enumerate(shapes)]


QS = (0.0, 1e-7, 0.1, 0.25, 0.5, 0.9, 0.95, 0.999999, 1.0, 1.0 / 3.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_and_numpy_across_dtypes_and_q(dtype):
    tensors = _layers(dtype)
    for q in QS:
        tau = assert_exact(tensors, q, hints=(None, 0.5))
    assert tau.dtype == torch.float32


def test_ties_and_zeros():
    g = torch.Generator().manual_seed(1)
    ints = torch.randint(-3, 4, (40, 25), generator=g).float()  # seven values, many ties
    zeros = torch.zeros(300)
    mostly_zero = torch.randn(500, generator=g) * (torch.rand(500, generator=g) > 0.8)
    tensors = [ints, zeros, mostly_zero]
    n = sum(t.numel() for t in tensors)
    # q on exact positions, inside tie runs, and on the boundary between two runs
    qs = list(QS) + [k / (n - 1) for k in (0, 1, 299, 300, 301, 799, 800, n - 2, n - 1)] + [0.7, 0.71]
    for q in qs:
        assert_exact(tensors, q, hints=(None, 0.0, 1.0, 2.0))
    assert torch.equal(global_quantile([torch.zeros(10)], 0.5), torch.tensor(0.0))


def test_single_element_and_tiny_pools():
    for q in (0.0, 0.3, 0.5, 1.0):
        assert_exact([torch.tensor([-2.5])], q, hints=(None, 2.5, 100.0))
        assert_exact([torch.tensor(3.0)], q)
        assert_exact([torch.empty(0), torch.tensor([1.0, -4.0]), torch.empty(3, 0)], q)
        assert_exact([torch.full((5,), 0.125)], q, hints=(None, 0.125))


def test_many_tiny_tensors():
    g = torch.Generator().manual_seed(2)
    tensors = [torch.randn(int(torch.randint(1, 4, (), generator=g)), generator=g) for _ in range(400)]
    for q in (0.0, 0.37, 0.9, 1.0):
        assert_exact(tensors, q, hints=(None, 1.0))


def test_layer_scaled_scores_st3_sigma():
    tensors = _layers(torch.float16, seed=3)
    scaled = layer_scaled_abs([_sigma_scale(t) for t in tensors])
    for q in (0.0, 0.5, 0.9, 0.99, 1.0):
        ref = assert_exact(tensors, q, _sigma_score, hints=(None, 1.0))  # whole-layer score_fn
        assert torch.equal(assert_exact(tensors, q, scaled, hints=(None, 1.0)), ref)  # elementwise


def test_signed_scores_and_negative_zero():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(3000, generator=g) * torch.logspace(-30, 30, 3000)
    w[::7] = 0.0
    w[3::7] = -0.0
    w[5::11] = -1e-38  # subnormal-adjacent negatives
    for q in (0.0, 0.2, 0.5, 0.61, 0.9, 1.0):
        assert_exact([w[:1000], w[1000:].reshape(50, 40)], q, _identity_score, hints=(None, -1.0, 0.0))


def test_huge_finite_scores_are_not_taken_for_inf():
    """An fp32 sum of 3e38s overflows; the finiteness check must not call that divergence."""
    w = torch.full((64,), 3e38)
    w[::2] = 1.0
    for q in (0.2, 0.5, 0.9):
        assert_exact([w], q, hints=(None, 1.0))


def test_non_contiguous_layouts():
    g = torch.Generator().manual_seed(5)
    conv = torch.randn(8, 4, 3, 3, generator=g).to(memory_format=torch.channels_last)
    lin = torch.randn(20, 30, generator=g).t()
    strided = torch.randn(10, 12, generator=g)[:, ::3]
    expanded = torch.randn(1, 6, generator=g).expand(4, 6)
    for q in (0.0, 0.3, 0.9, 1.0):
        assert_exact([conv, lin, strided, expanded], q, hints=(None, 0.5))


@pytest.fixture
def radix_calls(spy):
    """The radix-selection fallbacks' calls."""
    return spy(th, "_radix_select")


def test_chunked_passes_window_overflow_and_radix_fallback(monkeypatch, radix_calls):
    """Tiny chunks and a tiny window cap: many chunks per layer, windows that overflow, the fallback."""
    g = torch.Generator().manual_seed(6)
    tensors = [torch.randn(300, 70, generator=g), torch.randn(5000, generator=g).half(), torch.zeros(4000)]
    for chunk, cap in ((1000, 1 << 20), (777, 40)):
        monkeypatch.setattr(th, "_budget", lambda nbytes, device, strategy, c=chunk, k=cap: (c, k))
        for q in (0.0, 0.1, 0.5, 0.9, 1.0):
            assert_exact(tensors, q, hints=(None, 1.5), strategies=("window",))
            assert_exact(tensors, q, _sigma_score, hints=(None, 1.5), strategies=("window", "radix"))
    assert len(radix_calls) > 0  # cap 40 overflowed


def test_sample_window_miss_falls_back_exactly(radix_calls):
    """Adversarial layout: every sampled position holds 0, so the sample says tau = 0."""
    w = torch.rand(128 * 200) + 0.5
    w[:: th._sample_stride(w.numel(), 4 * w.numel())] = 0.0
    assert_exact([w], 0.5, strategies=("window",))
    # the sample window [0, 0] missed rank n/2 in each of the three window calls of assert_exact
    assert len(radix_calls) == 3


def test_passes_over_the_pool_cold_warm_and_missed(spy):
    """Elementwise scores are sampled off the raw weights: cold is one pass. A whole-layer score_fn
    needs a sampling pass cold; a right hint is one pass either way, a wrong one costs one more."""
    g = torch.Generator().manual_seed(7)
    tensors = [torch.randn(200, 300, generator=g), torch.randn(5000, generator=g)]
    tau = float(global_quantile(tensors, 0.9))
    stepped = [t + 1e-4 * torch.randn(t.shape, generator=g) for t in tensors]  # one "training step"
    passes = spy(th._Pool, "chunks")
    ref = reference_quantile(stepped, 0.9)
    absolute = th._abs_score  # elementwise
    cases = (
        (absolute, None, 1),
        (absolute, tau, 1),
        (absolute, 2 * tau, 2),
        (_abs, None, 2),
        (_abs, tau, 1),
        (_abs, -1.0, 2),
    )  # the same |w|, whole-layer
    for score_fn, hint, expected in cases:
        passes.clear()
        got = global_quantile(stepped, 0.9, score_fn, hint=hint)
        assert torch.equal(got, ref)
        assert len(passes) == expected, (score_fn.__name__, hint, len(passes))


def test_any_hint_is_exact():
    g = torch.Generator().manual_seed(7)
    tensors = [torch.randn(200, 300, generator=g), torch.randn(5000, generator=g)]
    tau = global_quantile(tensors, 0.9)
    stepped = [t + 1e-4 * torch.randn(t.shape, generator=g) for t in tensors]
    for hint in (0.0, -0.5, 1e-30, 1e9, float(tau) * 1.5, float(tau) * 0.9, math.nan, math.inf, tau):
        assert torch.equal(global_quantile(stepped, 0.9, hint=hint), reference_quantile(stepped, 0.9))


def test_radix_with_the_cuda_counting_kernel(monkeypatch):
    """The CUDA path histograms with a scatter-add instead of bincount: same counts, same tau."""
    monkeypatch.setattr(th, "_count", th._scatter_count)
    tensors = _layers(torch.bfloat16, seed=8) + [torch.zeros(50)]
    for q in (0.0, 0.5, 0.9, 1.0):
        assert_exact(tensors, q, strategies=("radix",))
        assert_exact(tensors, q, _identity_score, strategies=("radix",))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_scores_raise(strategy, bad):
    tensors = _layers()
    tensors[2] = tensors[2].clone()
    tensors[2][1, 0, 1, 1] = bad
    for hint in (None, 0.5):
        with pytest.raises(ValueError, match=r"non-finite weight in the sparsity pool \(layer index 2"):
            th._global_quantile(tensors, 0.5, _abs, None, hint, strategy)
        with pytest.raises(ValueError, match="lower the learning rate"):
            th._global_quantile(tensors, 0.5, _sigma_score, None, hint, strategy)
        with pytest.raises(ValueError, match="layer index 2"):
            th._global_quantile(tensors, 0.5, _identity_score, None, hint, strategy)
    half = [t.half() for t in tensors]
    with pytest.raises(ValueError, match="layer index 2"):
        global_quantile(half, 0.9)


def test_bad_arguments():
    w = [torch.randn(10)]
    for q in (-0.1, 1.0001, math.nan, "x", None):
        with pytest.raises(ValueError, match="q must be"):
            global_quantile(w, q)
    for pool in ([], [torch.empty(0)], [torch.empty(3, 0), torch.empty(0)]):
        with pytest.raises(ValueError, match="empty"):
            global_quantile(pool, 0.5)
    with pytest.raises(ValueError, match="one score per weight"):
        global_quantile(w, 0.5, lambda i, t: t.abs().float()[:5])
    with pytest.raises(TypeError, match="float32"):
        global_quantile(w, 0.5, lambda i, t: t.abs().double())


def test_thread_count_restored_and_inputs_untouched():
    before = torch.get_num_threads()
    w = torch.randn(1000, requires_grad=True)
    copy = w.detach().clone()
    tau = global_quantile([w], 0.5)
    assert torch.get_num_threads() == before
    assert not tau.requires_grad and torch.equal(w.detach(), copy)


# -- property test -------------------------------------------------------------------------------

_shape = st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple)


@st.composite
def _pools(draw):
    dtype = draw(st.sampled_from(DTYPES))
    n_tensors = draw(st.integers(1, 5))
    tensors = []
    for _ in range(n_tensors):
        shape = draw(_shape)
        seed = draw(st.integers(0, 2**31 - 1))
        g = torch.Generator().manual_seed(seed)
        kind = draw(st.sampled_from(["normal", "ties", "wide"]))
        if kind == "normal":
            t = torch.randn(shape, generator=g)
        elif kind == "ties":
            t = torch.randint(-2, 3, shape, generator=g).float() * 0.5
        else:  # magnitudes over 40 decades, kept finite in the weight dtype
            t = torch.randn(shape, generator=g) * torch.pow(10.0, torch.rand(shape, generator=g) * 40 - 20)
            big = min(torch.finfo(dtype).max, torch.finfo(torch.float32).max) / 4
            t = t.clamp(-big, big)
        sparsity = draw(st.sampled_from([0.0, 0.0, 0.5, 0.9, 1.0]))
        t = t * (torch.rand(shape, generator=g) >= sparsity)
        tensors.append(t.to(dtype))
    if sum(t.numel() for t in tensors) == 0:
        tensors.append(torch.ones(1, dtype=dtype))
    return tensors


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tensors=_pools(),
    q=st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 0.5, 0.9, 1.0])),
    hint=st.one_of(st.none(), st.floats(-2.0, 10.0)),
    score=st.sampled_from(["abs", "sigma", "identity"]),
)
def test_property_equals_numpy_quantile(tensors, q, hint, score):
    score_fn = {"abs": th._abs_score, "sigma": _sigma_score, "identity": _identity_score}[score]
    assert_exact(tensors, q, score_fn, hints=(None, hint))


# -- two gloo ranks --------------------------------------------------------------------------------
# Each rank is a fresh interpreter that loads fxsparse/threshold.py on its own (it imports only torch),
# so start-up costs one torch import rather than the whole package and this test module.

_WORKER = r"""
import importlib.util, math, os, sys
import torch
import torch.distributed as dist

rank, world, init_file, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
spec = importlib.util.spec_from_file_location("threshold_under_test", path)
th = importlib.util.module_from_spec(spec)
spec.loader.exec_module(th)
dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world)
WORLD = dist.group.WORLD
absolute = th._abs_score
signed = lambda i, t: t.detach().float()  # whole-layer (not elementwise) and signed

g = torch.Generator().manual_seed(11)
shapes = [(32, 3, 7, 7), (64, 32, 3, 3), (64, 32, 1, 1), (300, 64), (17,)]
layers = [torch.randn(s, generator=g) * (0.05 * (1 + i)) for i, s in enumerate(shapes)]
layers.append(torch.zeros(900))  # ties at zero
layers.append(torch.randint(0, 3, (700,), generator=g).float() * 0.01)

def check(tag, local, union, q, score_fn=absolute, strategies=("window", "radix"), hints=(None,)):
    ref = th.reference_quantile(union, q, score_fn)
    for strategy in strategies:
        for hint in hints:
            hint = float(ref) if hint == "ref" else hint
            got = th._global_quantile(local, q, score_fn, WORLD, hint, strategy)
            assert torch.equal(got, ref), (tag, rank, strategy, q, hint, got.item(), ref.item())

# (a) each rank holds every other layer
for q in (0.0, 0.5, 0.9, 1.0):
    check("a", layers[rank::world], layers, q, hints=(None, "ref", 5.0))
# (b) a layer split unevenly across ranks; signed whole-layer scores (sample pass, sign handling)
big = layers[3].reshape(-1)
cut = big.numel() * 2 // 5
shards = [[layers[0], big[:cut], layers[5]], [layers[1], layers[2], big[cut:], layers[4], layers[6]]]
for q in (0.42, 0.9):
    for score_fn in (absolute, signed):
        check("b", shards[rank], shards[0] + shards[1], q, score_fn, hints=(None, "ref"))
# (f) one quantile per layer (layer_quantiles), layers split across ranks: uneven, empty on a rank, on both
def check_layers(tag):
    local = [layers[0] if rank == 0 else torch.empty(0), shards[rank][1] if rank == 0 else shards[rank][2],
             layers[5] if rank == 1 else torch.empty(0), layers[6], layers[4]]
    union = [layers[0], big, layers[5], torch.cat([layers[6], layers[6]]), torch.cat([layers[4], layers[4]])]
    qs = [0.9, 0.42, 0.5, 0.7, 0.0]
    for score_fn in (absolute, signed):
        ref = [th.reference_quantile([u], q, score_fn) if q > 0 else torch.tensor(0.0) for u, q in zip(union, qs)]
        ref = torch.stack(ref)
        for hints in (None, ref.tolist(), [5.0, 0.0, None, -1.0, 1.0]):
            got = th.layer_quantiles(local, qs, score_fn, WORLD, hints)
            assert torch.equal(got, ref), (tag, rank, hints, got.tolist(), ref.tolist())
check_layers("f")
# (g) the shared threshold with per-layer bounds (capped_threshold), the same layout
def check_capped(tag):
    local = [layers[0] if rank == 0 else torch.empty(0), shards[rank][1] if rank == 0 else shards[rank][2],
             layers[5] if rank == 1 else torch.empty(0), layers[6], layers[4]]
    union = [layers[0], big, layers[5], torch.cat([layers[6], layers[6]]), torch.cat([layers[4], layers[4]])]
    numels = [u.numel() for u in union]
    lows, highs = [0, 100, 0, 300, 5], [int(0.95 * n) for n in numels]
    for score_fn in (absolute, signed):
        ordered = [score_fn(i, u).reshape(-1).sort().values for i, u in enumerate(union)]
        candidates = torch.cat(ordered).unique()
        at = torch.stack([torch.searchsorted(o, candidates, right=True) for o in ordered])
        g = torch.minimum(torch.maximum(at, torch.tensor(lows)[:, None]), torch.tensor(highs)[:, None]).sum(0)
        for count in (sum(lows) + 1, int(0.9 * sum(numels)), sum(highs)):
            first = int(torch.nonzero(g >= count)[0])
            ref, ref_counts = candidates[first], at[:, first].tolist()
            for hint in (None, float(ref), 5.0):
                got, counts, _ = th.capped_threshold(local, lows, highs, count, score_fn, WORLD, hint)
                assert torch.equal(got, ref) and counts == ref_counts, (tag, rank, count, hint, got, ref)
check_capped("g")
# (c) an empty shard on rank 1; tiny chunks and window cap: many chunks, overflow, fallback
th._budget = lambda nbytes, device, strategy: (5000, 3000)
for q in (0.1, 0.9):
    check("c", layers if rank == 0 else [], layers, q, hints=(None, "ref"))
check_layers("f, tiny chunks and windows")
check_capped("g, tiny chunks and windows")
# (e) a tiny pool: three scores on rank 0, two on rank 1
tiny = [torch.tensor([0.5, -2.0, 0.0])] if rank == 0 else [torch.tensor([1.0, 0.25])]
for q in (0.0, 0.3, 0.5, 1.0):
    check("e", tiny, [torch.tensor([0.5, -2.0, 0.0]), torch.tensor([1.0, 0.25])], q, hints=(None, "ref"))
# (d) a NaN on rank 1 only: both ranks raise, rank 1 names its layer
poisoned = [t.clone() for t in layers[rank::world]]
if rank == 1:
    poisoned[1].view(-1)[5] = math.nan
for strategy in ("window", "radix"):
    for hint in (None, 0.1):
        try:
            th._global_quantile(poisoned, 0.9, absolute, WORLD, hint, strategy)
        except ValueError as err:
            expected = "layer index 1" if rank == 1 else "on another rank"
            assert "non-finite" in str(err) and expected in str(err), (rank, str(err))
        else:
            raise AssertionError("rank %d: no error for a NaN (%s, %s)" % (rank, strategy, hint))
dist.barrier()
dist.destroy_process_group()
print("rank", rank, "OK", flush=True)
os._exit(0)  # gloo can abort in static destructors at interpreter exit (after the work is checked)
"""


def test_two_gloo_ranks_match_the_union(tmp_path):
    import subprocess
    import sys

    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    init = tmp_path / "init"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), "2", str(init), th.__file__],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0 and f"rank {rank} OK" in out, (proc.returncode, out[-3000:])


# -- layer_quantiles: every layer's quantile in one pass -----------------------------------------


def _layer_reference(tensors, qs, score_fn):
    """Each layer's quantile by sort-and-interpolate on that layer alone (0 where q <= 0)."""
    out = []
    for i, (t, q) in enumerate(zip(tensors, qs)):
        one = lambda _, x, i=i: score_fn(i, x)  # noqa: E731
        out.append(reference_quantile([t], q, one) if q > 0 else torch.zeros((), dtype=torch.float32))
    return torch.stack(out)


def _layer_pool(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 3, 7, 7), (128, 64, 3, 3), (256, 64), (4000,), (7,), ()]
    tensors = [torch.randn(s, generator=g) * (0.05 * (1 + i)) for i, s in enumerate(shapes)]
    tensors[1] = tensors[1].to(torch.bfloat16)
    tensors.append(torch.zeros(500))  # all ties
    tensors.append(torch.randint(0, 3, (900,), generator=g).half() * 0.01)  # many ties
    return tensors


@pytest.mark.parametrize("score", ["abs", "scaled", "whole-layer", "signed"])
def test_layer_quantiles_equal_each_layers_sort(monkeypatch, score):
    """Bitwise the sort-based quantile of each layer alone, whatever the hints (none, right, wrong, odd), with
    chunks smaller than the layers and windows that overflow (radix fallback)."""
    tensors = _layer_pool()
    scales = [0.5 + i for i in range(len(tensors))]
    score_fn = {
        "abs": th._abs_score,
        "scaled": layer_scaled_abs(scales),
        "whole-layer": _sigma_score,
        "signed": _identity_score,
    }[score]
    qs = [0.9, 0.5, 0.0, 1.0, 0.3, 0.7, 0.95, 0.6]
    ref = _layer_reference(tensors, qs, score_fn)
    near = [float(t) * 1.001 for t in ref]
    for budget in (None, (777, 1 << 20), (1000, 40)):
        if budget is not None:
            monkeypatch.setattr(th, "_budget", lambda nbytes, device, strategy, b=budget: b)
        for hints in (None, near, [float(t) for t in ref], [5.0, -1.0, 0.0, math.nan, math.inf, 1e-30, None, 2.0]):
            got = th.layer_quantiles(tensors, qs, score_fn, hints=hints)
            assert got.dtype == torch.float32 and torch.equal(got, ref), (budget, hints, got, ref)


def test_layer_quantiles_is_one_pass(spy):
    """Every layer in the same pass over the pool: warm (right hints) one pass, cold one pass for elementwise
    scores (sampled off the weights) and two for a whole-layer score_fn; a missed hint costs one more pass, over
    the layers that missed only."""
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(200, 300, generator=g), torch.randn(5000, generator=g), torch.randn(64, 9, generator=g)]
    qs = [0.9, 0.5, 0.8]
    warm = [float(t) for t in th.layer_quantiles(tensors, qs)]
    stepped = [t + 1e-4 * torch.randn(t.shape, generator=g) for t in tensors]
    calls = spy(th._Pool, "layer_chunks")
    ref = _layer_reference(stepped, qs, th._abs_score)
    missed = [warm[0], 3.0 * warm[1], warm[2]]
    for score_fn, hints, expected in (
        (th._abs_score, None, [[0, 1, 2]]),
        (th._abs_score, warm, [[0, 1, 2]]),
        (th._abs_score, missed, [[0, 1, 2], [1]]),
        (_abs, None, [[0, 1, 2], [0, 1, 2]]),
        (_abs, warm, [[0, 1, 2]]),
        (_abs, missed, [[0, 1, 2], [1]]),
    ):
        calls.clear()
        assert torch.equal(th.layer_quantiles(stepped, qs, score_fn, hints=hints), ref)
        passes = [pass_layers(call) for call in calls]
        assert passes == expected, (score_fn.__name__, hints, passes)


def test_layer_quantiles_errors():
    with pytest.raises(ValueError, match="2 sparsities for 1 tensors"):
        th.layer_quantiles([torch.randn(4)], [0.5, 0.5])
    with pytest.raises(ValueError, match="q must be in"):
        th.layer_quantiles([torch.randn(4)], [1.5])
    with pytest.raises(ValueError, match=r"tensors\[1\] is empty"):
        th.layer_quantiles([torch.randn(4), torch.empty(0)], [0.5, 0.5])
    bad = [torch.randn(40), torch.randn(30), torch.randn(20)]
    bad[2][3] = math.nan
    for hints in (None, [0.5, 0.5, 0.5]):
        with pytest.raises(ValueError, match=r"non-finite weight in the sparsity pool \(layer index 2"):
            th.layer_quantiles(bad, [0.5, 0.5, 0.5], hints=hints)
    assert torch.equal(th.layer_quantiles(bad, [0.5, 0.5, 0.0])[2], torch.tensor(0.0))  # layer 2 is not ranked


# -- capped_threshold: one shared threshold with per-layer bounds ---------------------------------


def _capped_by_sorting(tensors, lows, highs, count, score_fn):
    """The smallest pool score t with sum_l clamp(#{layer l <= t}, lows[l], highs[l]) >= count, and each layer's
    count at t: every layer sorted, every distinct score tried."""
    ordered = [score_fn(i, t).reshape(-1).sort().values for i, t in enumerate(tensors)]
    candidates = torch.cat(ordered).unique()
    at = torch.stack([torch.searchsorted(o, candidates, right=True) for o in ordered])
    g = torch.minimum(torch.maximum(at, torch.tensor(lows)[:, None]), torch.tensor(highs)[:, None]).sum(0)
    first = int(torch.nonzero(g >= count)[0])
    return candidates[first], at[:, first].tolist()


@pytest.mark.parametrize("score", ["abs", "scaled", "whole-layer", "signed"])
def test_capped_threshold_equals_a_sort(monkeypatch, score):
    """Bitwise the brute-force t and counts, for bounds of every kind (none, tight, the whole layer), whatever the
    hint, with windows that overflow (radix) and chunks smaller than the layers; ties included."""
    g = torch.Generator().manual_seed(2)
    shapes = [(32, 3, 5, 5), (64, 16, 3, 3), (100, 64), (2000,), (7,), ()]
    tensors = [torch.randn(s, generator=g) * (0.05 * (1 + i)) for i, s in enumerate(shapes)]
    tensors[1] = tensors[1].to(torch.bfloat16)
    tensors += [torch.zeros(300), torch.randint(0, 3, (500,), generator=g).half() * 0.01]  # ties
    score_fn = {
        "abs": th._abs_score,
        "scaled": layer_scaled_abs([0.5 + i for i in range(len(tensors))]),
        "whole-layer": _sigma_score,
        "signed": _identity_score,
    }[score]
    numels = [t.numel() for t in tensors]
    cases = [
        ([0] * len(numels), [int(0.95 * n) for n in numels]),
        ([int(0.3 * n) for n in numels], numels),
        ([int(0.3 * n) for n in numels], [int(0.95 * n) for n in numels]),
        ([0, 10, 0, 2000, 0, 0, 0, 0], [2400, 20, 100, 2000, 7, 1, 300, 500]),
    ]
    for budget in (None, (777, 40)):
        if budget is not None:
            monkeypatch.setattr(th, "_budget", lambda nbytes, device, strategy, b=budget: b)
        for lows, highs in cases:
            for fraction in (0.2, 0.9, 1.0):
                count = max(sum(lows) + 1, min(sum(highs), round(fraction * sum(numels))))
                ref, ref_counts = _capped_by_sorting(tensors, lows, highs, count, score_fn)
                for hint in (None, float(ref), float(ref) * 1.001, 3.0, 0.0):
                    tau, counts, _ = th.capped_threshold(tensors, lows, highs, count, score_fn, hint=hint)
                    assert torch.equal(tau, ref) and counts == ref_counts, (budget, lows, count, hint, tau, ref)


@pytest.fixture
def layer_passes(spy):
    """The passes over the pool's weights (calls of _Pool.layer_chunks)."""
    return spy(th._Pool, "layer_chunks")


def test_capped_threshold_one_pass_when_the_hint_holds(layer_passes):
    passes = layer_passes
    g = torch.Generator().manual_seed(4)
    tensors = [torch.randn(300, 200, generator=g), torch.randn(5000, generator=g) * 3, torch.randn(90, generator=g)]
    lows, highs, count = [0, 0, 10], [50000, 4000, 80], 50000
    tau = th.capped_threshold(tensors, lows, highs, count)[0]
    passes.clear()
    assert torch.equal(th.capped_threshold(tensors, lows, highs, count, hint=float(tau))[0], tau)
    assert len(passes) == 1
    passes.clear()
    assert torch.equal(th.capped_threshold(tensors, lows, highs, count)[0], tau)
    assert len(passes) == 4  # radix: four 8-bit digits


def test_capped_threshold_errors():
    w = [torch.randn(10), torch.randn(5)]
    with pytest.raises(ValueError, match=r"count=3 is outside \(sum\(lows\), sum\(highs\)\] = \(3, 15\]"):
        th.capped_threshold(w, [3, 0], [10, 5], 3)
    with pytest.raises(ValueError, match="layer 1 has bounds"):
        th.capped_threshold(w, [0, 0], [10, 6], 4)
    w[1][2] = math.inf
    for hint in (None, 0.5):
        with pytest.raises(ValueError, match=r"non-finite weight in the sparsity pool \(layer index 1"):
            th.capped_threshold(w, [0, 0], [10, 5], 4, hint=hint)


def test_capped_threshold_with_the_previously_held_layers(layer_passes):
    """Layers expected held are compared with a window around their own threshold in the same pass: those proven
    held get count None and their own threshold (bitwise layer_quantiles'), every other result is the sort's; a
    wrong expectation (a free layer, a wrong side, a far threshold) costs at most a pass, never exactness."""
    passes = layer_passes
    g = torch.Generator().manual_seed(5)
    tensors = [torch.randn(s, generator=g) * (1 + i) for i, s in enumerate([(64, 30), (4000,), (50, 20), (300,)])]
    numels = [t.numel() for t in tensors]
    lows, highs = [0, 1000, 100, 250], [int(0.8 * numels[0]), numels[1], 900, 300]
    count = int(0.6 * sum(numels))
    ref, ref_counts = _capped_by_sorting(tensors, lows, highs, count, th._abs_score)
    held = {i: c > highs[i] for i, c in enumerate(ref_counts) if not lows[i] <= c <= highs[i]}
    assert set(held.values()) == {True, False}  # the case holds layers at both bounds
    bound = {i: highs[i] if at_max else lows[i] for i, at_max in held.items()}
    quantile = {i: (k - 1 + 1 / 16) / (numels[i] - 1) for i, k in bound.items()}  # exactly k pruned
    own_ref = {i: th.layer_quantiles([tensors[i]], [q])[0] for i, q in quantile.items()}
    expected = {i: (quantile[i], float(own_ref[i]), at_max) for i, at_max in held.items()}
    passes.clear()
    tau, counts, own = th.capped_threshold(tensors, lows, highs, count, hint=float(ref), held=expected)
    assert len(passes) == 1 and torch.equal(tau, ref)
    assert set(own) == set(held) and all(torch.equal(own[i], own_ref[i]) for i in held)
    assert [None if i in held else c for i, c in enumerate(ref_counts)] == counts
    free = next(i for i in range(len(tensors)) if i not in held)
    wrong = dict(expected)
    wrong[free] = (0.5, 1e-3, True)  # a free layer expected held
    first = next(iter(held))
    wrong[first] = (expected[first][0], 100.0, expected[first][2])  # a threshold far off
    tau, counts, own = th.capped_threshold(tensors, lows, highs, count, hint=float(ref), held=wrong)
    assert torch.equal(tau, ref) and counts[free] == ref_counts[free] and counts[first] == ref_counts[first]
    assert all(torch.equal(own[i], own_ref[i]) for i in own) and free not in own and first not in own
