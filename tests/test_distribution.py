"""Layer-wise sparsity distributions (issue 18): global (unchanged), uniform, ERK, a mapping, and caps, with exact
per-layer targets from one threshold node."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse.distribution import layer_targets, parse_distribution
from fxsparse.threshold import layer_quantiles, reference_quantile

from conftest import pass_layers
from models import TinyCNN

METHODS = ("st3", "st3sigma", "feather", "gmp", "ste")
GLOBAL_CAPS = {"max_layer_sparsity": 0.95, "min_layer_sparsity": 0.6}  # they hold layers of the CNNs at 0.9


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def pruned_per_layer(model) -> dict[str, int]:
    return {fqn: numel - nonzeros for fqn, (nonzeros, numel) in fxsparse.layer_densities(model).items()}


def erk_by_hand(shapes: list[tuple[int, ...]], sparsity: float) -> list[float]:
    """RigL's ERK, written out: density_l = eps * sum(shape) / prod(shape); a layer above 1 is made dense and eps is
    solved again over the rest, until no layer exceeds 1. Returns the real-valued kept counts."""
    numels = [math.prod(s) for s in shapes]
    kept_total = sum(numels) - round(sparsity * sum(numels))
    dense: set[int] = set()
    while True:
        budget = kept_total - sum(numels[i] for i in dense)
        eps = budget / sum(sum(s) for i, s in enumerate(shapes) if i not in dense)
        over = {i for i, s in enumerate(shapes) if i not in dense and eps * sum(s) / numels[i] > 1}
        if not over:
            return [numels[i] if i in dense else eps * sum(s) for i, s in enumerate(shapes)]
        dense |= over


def train_steps(model, steps: int, seed: int = 0) -> None:
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        fxsparse.step_(model)


# --- global: bitwise today's behaviour -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["st3", "st3sigma", "feather"])
def test_global_is_bitwise_the_default(method):
    base = small_cnn()
    schedule = fxsparse.Cubic(0, 4)
    default = fxsparse.sparsify(base, method, 0.8, schedule)
    explicit = fxsparse.sparsify(base, method, 0.8, schedule, distribution="global")
    train_steps(default, 6)
    train_steps(explicit, 6)
    a, b = default.state_dict(), explicit.state_dict()
    assert list(a) == list(b) and not any("layer_tau" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    threshold = fxsparse.get_threshold(default)
    fxsparse.pool.refresh_threshold_(default)  # tau for the weights after the last step
    pooled = fxsparse.pool.pooled_weights(default)
    expected = reference_quantile(pooled, 0.8, score_fn=lambda i, w: threshold.method.score(w))
    assert torch.equal(threshold.tau, expected)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(default(x), explicit(x))


# --- ERK -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
def test_erk_densities_equal_the_formula(sparsity):
    model = fxsparse.sparsify(small_cnn(), "st3", sparsity, distribution="erk")
    shapes = [tuple(w.shape) for w in fxsparse.pool.pooled_weights(model)]
    kept_real = erk_by_hand(shapes, sparsity)
    densities = fxsparse.layer_densities(model)
    assert len(densities) == len(shapes)
    for (fqn, (nonzeros, _)), real in zip(densities.items(), kept_real):
        assert abs(nonzeros - real) < 1.0, (fqn, nonzeros, real)
    total = sum(n for _, n in densities.values())
    assert sum(n - nz for nz, n in densities.values()) == round(sparsity * total)
    # density ordered by sum(dims) / prod(dims) among the layers ERK does not keep dense
    ratios = [sum(s) / math.prod(s) for s in shapes]
    kept = [nz / n for nz, n in densities.values()]
    for i in range(len(shapes)):
        for j in range(len(shapes)):
            if ratios[i] > ratios[j] and kept[j] < 1:
                assert kept[i] > kept[j]


def test_erk_dense_layers_and_rescale():
    """A tiny layer whose ERK density exceeds 1 is kept dense and the others are rescaled: total exact."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 300), nn.Linear(300, 300))
    sparse = fxsparse.sparsify(model, "st3", 0.9, distribution="erk")
    densities = fxsparse.layer_densities(sparse)
    assert densities["0.weight"] == (4, 4)
    kept_real = erk_by_hand([(2, 2), (300, 2), (300, 300)], 0.9)
    for (nonzeros, _), real in zip(densities.values(), kept_real):
        assert abs(nonzeros - real) < 1.0
    assert sum(n - nz for nz, n in densities.values()) == round(0.9 * (4 + 600 + 90000))


# --- every method, uniform and ERK, exact per-layer targets, one threshold node -------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_per_layer_targets_every_method(method, distribution):
    model = fxsparse.sparsify(TinyCNN(), method, 0.9, fxsparse.Cubic(0, 5), distribution=distribution)
    assert sum("fxsparse_threshold" in line for line in model.code.splitlines()) == 1
    train_steps_tiny(model, 7)
    threshold = fxsparse.get_threshold(model)
    targets = threshold.targets
    pruned = pruned_per_layer(model)
    for fqn, k in zip(targets.names, targets.pruned):
        assert pruned[fqn] == k, (fqn, pruned[fqn], k)
    total = sum(targets.numels)
    assert sum(pruned.values()) == round(0.9 * total)
    if distribution == "uniform":
        for k, n in zip(targets.pruned, targets.numels):
            assert abs(k - 0.9 * n) < 1.0


def train_steps_tiny(model, steps: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,))
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        fxsparse.step_(model)


@pytest.mark.parametrize("method", ["st3", "st3sigma", "feather"])
def test_layer_taus_are_exact_quantiles(method):
    """tau_l is numpy's linear quantile of layer l's own scores at its scheduled sparsity, bit for bit, and the
    tie rule holds per layer: pruned exactly where score <= tau_l."""
    model = fxsparse.sparsify(small_cnn(), method, 0.7, fxsparse.Cubic(0, 10), distribution="erk")
    train_steps(model, 4)  # mid-ramp
    fxsparse.pool.refresh_threshold_(model)
    threshold = fxsparse.get_threshold(model)
    weights = fxsparse.pool.pooled_weights(model)
    qs = threshold.layer_sparsities()
    for i, (w, q) in enumerate(zip(weights, qs)):
        scores = threshold.method.score(w).double().numpy().reshape(-1)
        expected = np.float32(np.quantile(scores.astype(np.float32), q, method="linear"))
        assert threshold.layer_tau[i].item() == expected
    for entry, w, tau in zip(fxsparse.pool.unique_entries(model), weights, threshold.layer_tau):
        effective = getattr(entry.module, entry.name)
        assert torch.equal(effective == 0, threshold.method.score(w) <= tau)


def test_schedule_ramps_every_layer_to_its_own_target():
    schedule = fxsparse.Cubic(2, 8)
    model = fxsparse.sparsify(small_cnn(), "st3", 0.9, schedule, distribution="erk")
    threshold = fxsparse.get_threshold(model)
    finals = threshold.targets.quantiles()
    for step in range(12):
        assert threshold.layer_sparsities(step) == [fxsparse.cubic(step, q, 2, 8) for q in finals]
    assert threshold.layer_sparsities(0) == [0.0] * len(finals)
    x = torch.randn(2, 3, 8, 8)
    model(x)
    assert all(n - nz == 0 for nz, n in fxsparse.layer_densities(model).values())  # before the ramp: dense
    train_steps(model, 5)  # mid-ramp: layer l prunes floor((n-1) q_l(t)) + 1
    for (fqn, pruned), q, n in zip(
        pruned_per_layer(model).items(), threshold.layer_sparsities(), threshold.targets.numels
    ):
        assert pruned == (0 if q == 0 else math.floor((n - 1) * q) + 1), fqn
    train_steps(model, 5)  # past the end: the final targets
    for (fqn, pruned), k in zip(pruned_per_layer(model).items(), threshold.targets.pruned):
        assert abs(pruned - k) <= 1 and pruned == k, fqn


# --- mapping and caps ---------------------------------------------------------------------------------


def test_mapping_fixes_matched_layers_and_shares_the_rest():
    model = fxsparse.sparsify(small_cnn(), "st3sigma", 0.8, distribution={"0.*": 0.25, "7.weight": 0.5})
    pruned = pruned_per_layer(model)
    densities = fxsparse.layer_densities(model)
    assert pruned["0.weight"] == round(0.25 * 216) and pruned["7.weight"] == round(0.5 * 160)
    rest = [f for f in pruned if f not in ("0.weight", "7.weight")]
    total = sum(n for _, n in densities.values())
    left = round(0.8 * total) - pruned["0.weight"] - pruned["7.weight"]
    share = left / sum(densities[f][1] for f in rest)
    for f in rest:
        assert abs(pruned[f] - share * densities[f][1]) < 1.0
    assert sum(pruned.values()) == round(0.8 * total)
    assert densities.distribution["name"] == "mapping"
    assert densities.distribution["patterns"] == {"0.*": 0.25, "7.weight": 0.5}


def test_caps_redistribute_and_keep_the_total():
    # uniform at 0.9 with the first conv at most 0.5: the others take the rest
    capped = fxsparse.sparsify(small_cnn(), "st3", 0.9, distribution={"0.weight": 0.5})
    erk = fxsparse.sparsify(small_cnn(), "st3", 0.95, distribution="erk", max_layer_sparsity=0.97)
    for model, target in ((capped, 0.9), (erk, 0.95)):
        densities = fxsparse.layer_densities(model)
        total = sum(n for _, n in densities.values())
        assert sum(n - nz for nz, n in densities.values()) == round(target * total)
    erk_densities = fxsparse.layer_densities(erk)
    assert all(n - nz <= math.floor(0.97 * n) for nz, n in erk_densities.values())
    assert any(n - nz == math.floor(0.97 * n) for nz, n in erk_densities.values())  # the cap binds
    uncapped = fxsparse.layer_densities(fxsparse.sparsify(small_cnn(), "st3", 0.95, distribution="erk"))
    assert any(n - nz > 0.97 * n for nz, n in uncapped.values())
    low = fxsparse.layer_densities(
        fxsparse.sparsify(small_cnn(), "st3", 0.9, distribution="erk", min_layer_sparsity=0.5)
    )
    assert all(n - nz >= math.ceil(0.5 * n) for nz, n in low.values())
    assert sum(n - nz for nz, n in low.values()) == round(0.9 * sum(n for _, n in low.values()))


def test_layer_targets_by_hand_with_caps():
    """Uniform with a max cap: capped layers sit at the cap, the rest at one shared sparsity."""
    targets = layer_targets(["a", "b", "c"], [(10, 10), (100, 10), (100, 100)], 0.9, "uniform", None, None)
    assert targets.pruned == (90, 900, 9000)
    targets = layer_targets(["a", "b"], [(10, 10), (1000,)], 0.5, {"a": 1.0}, None, None)
    assert targets.pruned == (100, 450)
    # ERK: a (sum 8 / 16) is dense, b prunes the 9014 = round(0.9 * 10016)
    assert layer_targets(["a", "b"], [(4, 4), (100, 100)], 0.9, "erk").pruned == (0, 9014)
    # b capped at 0.9 prunes 9000; a takes the other 14
    assert layer_targets(["a", "b"], [(4, 4), (100, 100)], 0.9, "erk", None, 0.9).pruned == (14, 9000)
    # a at least 0.5 sparse: 8, b the other 9006
    assert layer_targets(["a", "b"], [(4, 4), (100, 100)], 0.9, "erk", 0.5, None).pruned == (8, 9006)


def test_infeasible_caps_say_by_how_much():
    pool = 216 + 1152 + 256 + 160  # small_cnn's weights
    short = pool - round(0.9 * pool) - sum(math.ceil(0.5 * n) for n in (216, 1152, 256, 160))
    with pytest.raises(
        ValueError, match=rf"infeasible: with max_layer_sparsity=0.5 the layers keep .* by {-short} weights"
    ):
        fxsparse.sparsify(small_cnn(), "st3", 0.9, distribution="uniform", max_layer_sparsity=0.5)
    surplus = sum(math.ceil(0.95 * n) for n in (216, 1152, 256, 160)) - round(0.9 * pool)
    with pytest.raises(
        ValueError, match=rf"infeasible: with min_layer_sparsity=0.95 the layers prune .* by {surplus} weights"
    ):
        fxsparse.sparsify(small_cnn(), "st3", 0.9, distribution="erk", min_layer_sparsity=0.95)
    with pytest.raises(ValueError, match="infeasible: with the mapping's fixed layers the layers keep"):
        fxsparse.sparsify(small_cnn(), "st3", 0.9, distribution={"2.weight": 0.0})
    with pytest.raises(ValueError, match="fixes every pooled layer"):
        fxsparse.sparsify(small_cnn(), "st3", 0.9, distribution={"*": 0.5})
    least = round(0.9 * pool) - sum(math.floor(0.5 * n) for n in (216, 1152, 256, 160))
    with pytest.raises(ValueError, match=rf"with max_layer_sparsity=0.5 the layers keep .* by {least} weights"):
        fxsparse.sparsify(small_cnn(), "st3", 0.9, max_layer_sparsity=0.5)  # global with caps
    with pytest.raises(ValueError, match=r"min_layer_sparsity=0.95 the layers prune .* or raise sparsity$"):
        fxsparse.sparsify(small_cnn(), "st3", 0.9, distribution="global", min_layer_sparsity=0.95)
    with pytest.raises(ValueError, match="matches no pooled weight"):
        fxsparse.sparsify(small_cnn(), "st3", 0.9, distribution={"head.*": 0.5})
    with pytest.raises(ValueError, match="unknown distribution"):
        fxsparse.sparsify(small_cnn(), "st3", 0.9, distribution="erdos")
    with pytest.raises(ValueError, match="min_layer_sparsity=0.9 is above"):
        fxsparse.sparsify(small_cnn(), "st3", 0.9, distribution="erk", min_layer_sparsity=0.9, max_layer_sparsity=0.5)


def test_parse_distribution():
    assert parse_distribution("erk") == "erk"
    assert parse_distribution("conv1.*=0.5, fc.*=0.8") == {"conv1.*": 0.5, "fc.*": 0.8}
    with pytest.raises(ValueError, match="glob=sparsity"):
        parse_distribution("conv1.*=a")


# --- in place, state, outputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [{"distribution": "erk"}, {"distribution": "global", **GLOBAL_CAPS}])
def test_in_place_and_resume_bit_exact(spec):
    base = small_cnn()
    schedule = fxsparse.Cubic(0, 6)
    model = fxsparse.sparsify(base, "st3sigma", 0.9, schedule, **spec)
    in_place = small_cnn()
    in_place.load_state_dict(base.state_dict())
    fxsparse.sparsify_(in_place, "st3sigma", 0.9, schedule, **spec)
    train_steps(model, 3)
    train_steps(in_place, 3)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model(x), in_place(x))
    resumed = fxsparse.sparsify(base, "st3sigma", 0.9, schedule, **spec)
    resumed.load_state_dict(model.state_dict())
    train_steps(model, 4, seed=1)
    train_steps(resumed, 4, seed=1)
    assert torch.equal(fxsparse.get_threshold(model).layer_tau, fxsparse.get_threshold(resumed).layer_tau)
    assert torch.equal(model(x), resumed(x))
    assert torch.equal(fxsparse.fold(model)(x), model(x))


def test_outputs_record_the_distribution(tmp_path):
    model = fxsparse.sparsify(small_cnn(), "st3", 0.9, distribution="erk", max_layer_sparsity=0.97)
    record = fxsparse.layer_densities(model).distribution
    assert record["name"] == "erk" and record["max_layer_sparsity"] == 0.97
    targets = fxsparse.get_threshold(model).targets
    assert record["layer_targets"] == dict(zip(targets.names, targets.sparsities))
    report = fxsparse.flops(model, torch.randn(1, 3, 8, 8))
    assert report.to_dict()["distribution"] == record
    assert "distribution: erk" in report.table()
    fxsparse.save_csr(model, tmp_path / "m.safetensors")
    assert fxsparse.read_csr_metadata(tmp_path / "m.safetensors")["distribution"] == record
    assert fxsparse.layer_densities(fxsparse.sparsify(small_cnn(), "st3", 0.9)).distribution == {"name": "global"}
    capped = fxsparse.sparsify(small_cnn(), "st3", 0.9, max_layer_sparsity=0.95)
    record = fxsparse.layer_densities(capped).distribution
    assert record == {"name": "global", "max_layer_sparsity": 0.95}
    assert fxsparse.flops(capped, torch.randn(1, 3, 8, 8)).to_dict()["distribution"] == record
    fxsparse.save_csr(capped, tmp_path / "capped.safetensors")
    assert fxsparse.read_csr_metadata(tmp_path / "capped.safetensors")["distribution"] == record
    assert fxsparse.layer_densities(small_cnn()).distribution is None


# --- timm, torchvision, transformers: exact totals -------------------------------------------------------


def _check_exact(model, sparsity) -> None:
    """Every layer prunes its target k_l, or more only through ties at tau_l (a fp32 score equal to the k-th
    smallest, which the tie rule prunes too); then the pool's total is round(sparsity * N)."""
    threshold = fxsparse.get_threshold(model)
    pruned = pruned_per_layer(model)
    weights = fxsparse.pool.pooled_weights(model)
    for fqn, k, w in zip(threshold.targets.names, threshold.targets.pruned, weights):
        if pruned[fqn] != k:
            ordered = threshold.method.score(w).reshape(-1).sort().values
            assert 0 < k < pruned[fqn] and ordered[pruned[fqn] - 1] == ordered[k - 1], fqn
            pruned[fqn] = k
    assert sum(pruned[f] for f in threshold.targets.names) == round(sparsity * sum(threshold.targets.numels))


SPECS = [
    ("uniform", {}),
    ("erk", {}),
    ("erk", {"max_layer_sparsity": 0.95, "min_layer_sparsity": 0.3}),
]


def _check_capped(model, sparsity) -> None:
    """The global distribution with caps, checked by its definition: one shared tau (a pool score) with the layers
    within their bounds at tau pruning their scores <= tau, every other layer pruning its bound (or more only
    through ties), the layers held at the maximum exceeding it at tau and those at the minimum short of it, and
    the pool's total round(sparsity * N)."""
    threshold = fxsparse.get_threshold(model)
    caps = threshold.targets
    count, lows, highs = caps.counts(sparsity, caps.min_layer_sparsity, caps.max_layer_sparsity)
    weights = threshold.pool_values(fxsparse.pool.pooled_weights(model))
    pruned = pruned_per_layer(model)
    total = held = 0
    for i, (fqn, w, low, high) in enumerate(zip(caps.names, weights, lows, highs)):
        scores = threshold.layer_score(i, w).reshape(-1)
        at_tau = int((scores <= threshold.tau).sum())
        if low <= at_tau <= high:
            assert threshold.layer_tau[i] == threshold.tau and pruned[fqn] == at_tau, fqn
        else:
            k = low if at_tau < low else high
            ordered = scores.sort().values
            assert pruned[fqn] == (0 if k == 0 else int((ordered <= ordered[k - 1]).sum())), fqn
            at_tau, held = k, held + 1
        total += at_tau
    assert bool(
        (torch.cat([threshold.layer_score(i, w).reshape(-1) for i, w in enumerate(weights)]) == threshold.tau).any()
    )
    assert total == count == round(sparsity * sum(caps.numels)) and held > 0


@pytest.mark.parametrize("distribution,caps", SPECS)
def test_timm_and_torchvision(distribution, caps):
    timm = pytest.importorskip("timm")
    torchvision = pytest.importorskip("torchvision")
    models = [
        (timm.create_model("resnet18", num_classes=10), "conv1.*", torch.randn(1, 3, 32, 32)),
        (torchvision.models.mobilenet_v3_small(num_classes=10), "features.0.*", torch.randn(1, 3, 32, 32)),
    ]
    for model, head, x in models:
        for spec in (distribution, {head: 0.5}):
            sparse = fxsparse.sparsify(model, "st3sigma", 0.9, distribution=spec, **caps)
            sparse.eval()(x)
            _check_exact(sparse, 0.9)
        if distribution == "uniform":  # and the global distribution with caps
            sparse = fxsparse.sparsify(model, "st3sigma", 0.9, **GLOBAL_CAPS)
            sparse.eval()(x)
            _check_capped(sparse, 0.9)


@pytest.mark.parametrize("distribution,caps", SPECS)
def test_transformers(distribution, caps):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=40,
        max_position_embeddings=16,
    )
    model = transformers.BertModel(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for spec in (distribution, {"*.0.attention.self.query.*": 0.5}):
            sparse = fxsparse.sparsify(model, "feather", 0.9, distribution=spec, trace_model=False, **caps)
            sparse(torch.randint(0, 40, (1, 6)))
            _check_exact(sparse, 0.9)
        if distribution == "uniform":  # and the global distribution with caps
            tight = {"max_layer_sparsity": 0.91, "min_layer_sparsity": 0.89}  # the layers are near 0.9 already
            sparse = fxsparse.sparsify(model, "feather", 0.9, trace_model=False, **tight)
            sparse(torch.randint(0, 40, (1, 6)))
            _check_capped(sparse, 0.9)


# --- caps with the global distribution -------------------------------------------------------------------


def capped_by_sorting(scores: list[torch.Tensor], count: int, lows: list[int], highs: list[int]) -> list[int]:
    """The global distribution with caps by brute force, each layer's scores sorted: t = the smallest pool score
    with sum_l clamp(#{scores of layer l <= t}, low_l, high_l) >= count; a layer within its bounds at t prunes its
    scores <= t, another one its bound k: its k smallest and every score tied with the k-th. Pruned per layer."""
    ordered = [s.reshape(-1).sort().values for s in scores]
    candidates = torch.cat(ordered).unique()
    at = torch.stack([torch.searchsorted(o, candidates, right=True) for o in ordered])  # (layers, candidates)
    g = torch.minimum(torch.maximum(at, torch.tensor(lows)[:, None]), torch.tensor(highs)[:, None]).sum(0)
    first = int(torch.nonzero(g >= count)[0])
    pruned = []
    for o, c, low, high in zip(ordered, at[:, first].tolist(), lows, highs):
        k = c if low <= c <= high else (low if c < low else high)
        pruned.append(c if k == c else 0 if k == 0 else int((o <= o[k - 1]).sum()))
    return pruned


def pin_until_stable(scores: list[torch.Tensor], count: int, highs: list[int]) -> list[int]:
    """Max caps only, as an iteration: the layers whose share of one threshold exceeds their cap are pinned at it,
    the threshold recomputed over the rest with the rest of the budget (sort), until no layer is added."""
    pinned: dict[int, int] = {}
    while True:
        free = [i for i in range(len(scores)) if i not in pinned]
        budget = count - sum(pinned.values())
        t = torch.cat([scores[i].reshape(-1) for i in free]).sort().values[budget - 1]
        over = {i: highs[i] for i in free if int((scores[i] <= t).sum()) > highs[i]}
        if not over:
            return [pinned.get(i, int((scores[i] <= t).sum())) for i in range(len(scores))]
        pinned.update(over)


def _pool_scores(model) -> list[torch.Tensor]:
    threshold = fxsparse.get_threshold(model)
    weights = threshold.pool_values(fxsparse.pool.pooled_weights(model))
    return [threshold.layer_score(i, w) for i, w in enumerate(weights)]


@pytest.mark.parametrize("method", ["st3", "st3sigma", "gmp"])
@pytest.mark.parametrize("caps", [{"max_layer_sparsity": 0.92}, {"min_layer_sparsity": 0.85}, GLOBAL_CAPS])
def test_global_caps_equal_a_sort(method, caps):
    """distribution="global" with caps: per-layer pruned counts equal the brute-force sort, the total is exact, and
    with max caps only they equal the pin-until-stable iteration; at every step of a ramp (bounds ramped too)."""
    torch.manual_seed(0)
    model = fxsparse.sparsify(small_cnn(), method, 0.9, fxsparse.Cubic(0, 6), **caps)
    threshold = fxsparse.get_threshold(model)
    assert (
        threshold.distribution == "global" and fxsparse.layer_densities(model).distribution == {"name": "global"} | caps
    )
    low, high = caps.get("min_layer_sparsity"), caps.get("max_layer_sparsity")
    for step in range(8):
        if step:
            train_steps(model, 1, seed=step)
        fxsparse.pool.refresh_threshold_(model)
        if step == 0:
            assert all(v == 0 for v in pruned_per_layer(model).values())
            continue
        s = fxsparse.cubic(step, 0.9, 0, 6)
        scheduled = [None if c is None else fxsparse.cubic(step, c, 0, 6) for c in (low, high)]
        count, lows, highs = threshold.targets.counts(s, *scheduled)
        expected = capped_by_sorting(_pool_scores(model), count, lows, highs)
        assert list(pruned_per_layer(model).values()) == expected, step
        assert sum(expected) == count == round(s * sum(threshold.targets.numels))
        if low is None:
            assert expected == pin_until_stable(_pool_scores(model), count, highs)
    sparsities = [1 - nz / n for nz, n in fxsparse.layer_densities(model).values()]
    assert all((low or 0) <= x <= (high or 1) for x in sparsities)
    numels = list(threshold.targets.numels)
    assert expected != capped_by_sorting(_pool_scores(model), count, [0] * len(numels), numels)  # the caps bind


def test_global_caps_tie_rule():
    """Weights on a few levels (many ties): each layer prunes exactly what the sort says, ties at a threshold with
    it (so a held layer may pass its bound only through ties, and the total round(q * N) only through ties)."""
    model = small_cnn()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(1, 9, p.shape, generator=g).float() * 0.01)
    for caps in ({"max_layer_sparsity": 0.92}, GLOBAL_CAPS):
        sparse = fxsparse.sparsify(model, "st3", 0.9, **caps)
        threshold = fxsparse.get_threshold(sparse)
        count, lows, highs = threshold.targets.counts(0.9, caps.get("min_layer_sparsity"), caps["max_layer_sparsity"])
        fxsparse.pool.refresh_threshold_(sparse)
        expected = capped_by_sorting(_pool_scores(sparse), count, lows, highs)
        assert list(pruned_per_layer(sparse).values()) == expected and sum(expected) > count


def test_global_caps_one_pass_after_the_first_step(spy):
    """The shared threshold comes from one window pass around the previous one once training runs, the held layers'
    own thresholds from the same pass; radix selection only cold (the first computation) or when the window
    misses."""
    from fxsparse import threshold as th

    radix_calls = spy(th, "_capped_radix")
    model = fxsparse.sparsify(small_cnn(), "st3", 0.9, **GLOBAL_CAPS)
    with torch.no_grad():  # layer 1 far below the others: held at 95%, its own threshold far below the shared one
        fxsparse.pool.pooled_weights(model)[1].mul_(0.1)
    train_steps(model, 6)
    assert len(radix_calls) == 1
    # the layers held at the last step are tried as held again in the same pass: one pass in all
    threshold = fxsparse.get_threshold(model)
    assert threshold._held_at_max[1]
    pass_calls = spy(th._Pool, "layer_chunks")
    with torch.no_grad():
        for w in fxsparse.pool.pooled_weights(model):
            w.mul_(1.0001)
    fxsparse.pool.refresh_threshold_(model)
    passes = [pass_layers(call) for call in pass_calls]
    # one pass; a held layer whose own threshold is near the shared one (not layer 1) may need its count too
    assert passes[0] == [0, 1, 2, 3] and len(passes) <= 2 and all(1 not in p for p in passes[1:])
    count, lows, highs = threshold.targets.counts(0.9, 0.6, 0.95)
    assert list(pruned_per_layer(model).values()) == capped_by_sorting(_pool_scores(model), count, lows, highs)


def test_layer_quantiles_match_numpy_whatever_the_hints():
    tensors = [torch.randn(50, 7), torch.randn(300).to(torch.bfloat16), torch.zeros(10), torch.randn(40)]
    qs = [0.3, 0.9, 0.5, 0.0]
    out = layer_quantiles(tensors, qs, hints=[5.0, None, 0.0, 1.0])
    for tau, tensor, q in zip(out.tolist(), tensors, qs):
        scores = tensor.abs().float().numpy().reshape(-1)
        expected = 0.0 if q == 0 else float(np.float32(np.quantile(scores, q, method="linear")))
        assert tau == expected


# --- the application: config, command line, callbacks ------------------------------------------------


def test_train_config_and_command_line(tmp_path, load_tool):
    from fxsparse.train import TrainConfig, cli, run
    from fxsparse.train.config import resolve_config
    from fxsparse.train.errors import ConfigError

    args = cli.build_parser().parse_args(["train", "--distribution", "conv1.*=0.5", "--max-layer-sparsity", "0.97"])
    config = resolve_config(None, vars(args))
    assert config.distribution_options() == {
        "distribution": {"conv1.*": 0.5},
        "min_layer_sparsity": None,
        "max_layer_sparsity": 0.97,
    }
    toml = tmp_path / "run.toml"
    toml.write_text('distribution = "erk"\nmin-layer-sparsity = 0.5\n')
    assert resolve_config(str(toml), {}).distribution_options()["distribution"] == "erk"
    with pytest.raises(ConfigError, match="unknown distribution"):
        TrainConfig(distribution="erdos")
    assert TrainConfig(max_layer_sparsity=0.9).distribution_options() == {  # global with a cap
        "distribution": "global",
        "min_layer_sparsity": None,
        "max_layer_sparsity": 0.9,
    }
    tiny = dict(dataset="synthetic", model="cnn", width=0.25, batch_size=64, epochs=1, lr=0.05, threads=1)
    config = TrainConfig(
        **tiny, method="st3", sparsity=0.9, distribution="erk", progress=False, export=False, runs_dir=str(tmp_path)
    )
    assert config.run_name.endswith("st3-90-erk")
    summary = run(config)
    folded = summary["folded_model"]
    sparse = fxsparse.sparsify(folded, "st3", 0.9, distribution="erk")  # the targets, from the same shapes
    targets = fxsparse.get_threshold(sparse).targets
    densities = fxsparse.layer_densities(folded)
    assert [densities[f][1] - densities[f][0] for f in targets.names] == list(targets.pruned)
    out = tmp_path / "m.safetensors"
    assert load_tool("export").main(["--checkpoint", str(config.run_dir / "checkpoint.pt"), "-o", str(out)]) == 0
    extra = fxsparse.read_csr_metadata(out)["extra"]
    assert extra["distribution"]["name"] == "erk"
    assert extra["distribution"]["layer_targets"] == dict(zip(targets.names, targets.sparsities))


def test_callbacks_pass_the_distribution_through():
    from fxsparse.integrations.common import SparsifyOptions

    options = SparsifyOptions("feather", 0.9, None, None, 0, "uniform", None, 0.95)
    model = small_cnn()
    options.sparsify_(model)
    threshold = fxsparse.get_threshold(model)
    assert threshold.targets.name == "uniform" and threshold.targets.max_layer_sparsity == 0.95
    assert options.identity()["distribution"] == "uniform"
    assert "distribution" not in SparsifyOptions("feather", 0.9, None, None, 0).identity()
    with pytest.raises(ValueError, match="unknown distribution"):
        SparsifyOptions("feather", 0.9, None, None, 0, "erdos")
    capped = SparsifyOptions("st3", 0.9, None, None, 0, "global", None, 0.95)  # the global distribution with a cap
    model = small_cnn()
    capped.sparsify_(model)
    assert fxsparse.layer_densities(model).distribution == {"name": "global", "max_layer_sparsity": 0.95}
    assert capped.identity() == {"method": "st3", "sparsity": 0.9, "max_layer_sparsity": 0.95}
    with pytest.raises(
        ValueError, match="max_layer_sparsity=0.95 and this SparsifyCallback has max_layer_sparsity=0.9"
    ):
        SparsifyOptions("st3", 0.9, None, None, 0, "global", None, 0.9).check_resumed(capped.identity())
    lightning = pytest.importorskip("fxsparse.integrations.lightning")
    callback = lightning.SparsifyCallback("st3", 0.9, distribution="erk", max_layer_sparsity=0.97)
    assert callback.options.distribution == "erk" and callback.options.max_layer_sparsity == 0.97
    hf = pytest.importorskip("fxsparse.integrations.transformers")
    callback = hf.SparsifyCallback("st3", 0.9, distribution={"fc.*": 0.5})
    assert callback.options.distribution == {"fc.*": 0.5}


def test_layer_tau_stays_fp32_through_dtype_casts():
    model = fxsparse.sparsify(small_cnn(), "st3", 0.8, distribution="erk")
    x = torch.randn(2, 3, 8, 8)
    model(x)
    before = fxsparse.get_threshold(model).layer_tau.clone()
    model.to(torch.bfloat16)
    threshold = fxsparse.get_threshold(model)
    assert threshold.layer_tau.dtype == torch.float32 and torch.equal(threshold.layer_tau, before)
    model(x.to(torch.bfloat16))  # recomputed from the bf16 weights: each layer still at its target or above (ties)
    for (_, (nonzeros, numel)), k in zip(fxsparse.layer_densities(model).items(), threshold.targets.pruned):
        assert numel - nonzeros >= k
