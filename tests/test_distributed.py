"""torch.distributed on CPU (gloo, 2 processes): DDP and FSDP2 sharded training give the exact global tau.

One spawn runs every scenario (process start-up dominates the cost); each rank writes what it saw to
a file and the tests below read them. Scenarios:
  ddp      DistributedDataParallel: every rank has the same tau and masks at every step, and they
           match a single process trained on the same global batch.
  fsdp     FSDP2 fully_shard (each rank holds row shards of the weights, uneven ones included, one
           layer left to the root): tau equals the single-process quantile of the gathered weights,
           bit for bit, at every step, and the realised global sparsity is exact.
  fsdp_blocks  fully_shard on whole blocks: refused with the fix when torch.fx inlined them; exact when
           they are kept as leaves (sparsify(..., leaf_modules=(Block,))).
  explicit shard_pool_ with an explicit group on replicated weights: counted once, same tau.
  fsdp_erk FSDP2 with per-layer targets (distribution="erk", issue 18): every layer's tau_l equals the
           single-process quantile of that layer's gathered weights, bit for bit, at every step.
  fsdp_capped FSDP2 with the global distribution and caps: the shared and the per-layer thresholds equal
           those of one process on the gathered weights, bit for bit, at every step.
"""

import math
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse.threshold import reference_quantile

WORLD = 2
STEPS = 6


class SmallNet(nn.Module):
    """conv -> conv -> linear with no BatchNorm: DDP equals one process on the global batch (no per-rank stats)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 5, 3, stride=2, padding=1)  # 5 output rows: an uneven shard over 2 ranks
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def global_batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(4 * WORLD, 1, 6, 6, generator=g), torch.randint(0, 3, (4 * WORLD,), generator=g)


def masks(model):
    return [(getattr(e.module, e.name) != 0) for e in fxsparse.pool.unique_entries(model)]


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def zeros_expected(n, q):
    return math.floor((n - 1) * q) + 1  # entries <= the linearly interpolated quantile (no ties)


def scenario_ddp(rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    base = SmallNet()
    out = {}
    for method in ("st3", "feather"):
        model = fxsparse.sparsify(base, method, 0.7, fxsparse.Cubic(0, 4))
        single = fxsparse.sparsify(base, method, 0.7, fxsparse.Cubic(0, 4))
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        opt_single = torch.optim.SGD(single.parameters(), lr=0.05, momentum=0.9)
        fxsparse.hook_optimizer(ddp, opt)  # get_threshold sees through the DDP wrapper
        fxsparse.hook_optimizer(single, opt_single)
        taus, same_as_single, mask_flips = [], [], 0
        for step in range(STEPS):
            x, y = global_batch(step)
            local = slice(rank * 4, rank * 4 + 4)
            loss = F.cross_entropy(ddp(x[local]), y[local])
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_single = F.cross_entropy(single(x), y)
            opt_single.zero_grad()
            loss_single.backward()
            opt_single.step()
            # compare the tau and masks the forward used (recomputed before the next forward)
            ddp.module.eval()(x[:1])
            single.eval()(x[:1])
            ddp.module.train()
            single.train()
            tau = fxsparse.get_threshold(model).tau.clone()
            gathered = [torch.empty_like(tau) for _ in range(WORLD)]
            dist.all_gather(gathered, tau)
            taus.append([float(t) for t in gathered])
            flat = torch.cat([m.flatten() for m in masks(model)]).to(torch.uint8)
            others = [torch.empty_like(flat) for _ in range(WORLD)]
            dist.all_gather(others, flat)
            assert all(torch.equal(o, flat) for o in others), f"{method}: ranks disagree on the masks at step {step}"
            same_as_single.append(abs(float(tau) - float(fxsparse.get_threshold(single).tau)))
            mask_flips += int((flat != torch.cat([m.flatten() for m in masks(single)]).to(torch.uint8)).sum())
        out[method] = {
            "taus": taus,
            "tau_vs_single": max(same_as_single),
            "mask_flips": mask_flips,
            "sparsity": fxsparse.realized_sparsity(model),
            "pool": fxsparse.get_threshold(model).pool_size,
        }
    return out


def scenario_fsdp(rank):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    out = {}
    for method in ("st3sigma", "feather"):
        model = fxsparse.sparsify(SmallNet(), method, 0.7, fxsparse.Cubic(0, 4))
        fully_shard(model.conv1)
        fully_shard(model.conv2)  # fc stays with the root: whole on every rank during the forward
        fully_shard(model)
        threshold = fxsparse.get_threshold(model)
        score = threshold.method.score
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        fxsparse.hook_optimizer(model, opt)
        exact, kinds = [], set()
        for step in range(STEPS):
            weights = [full(model.get_parameter(p)).detach().clone() for p in threshold.pool_paths]
            kinds |= {type(model.get_parameter(p)).__name__ for p in threshold.pool_paths}
            expected = reference_quantile(weights, threshold.target_sparsity(), lambda i, w, score=score: score(w))
            x, y = global_batch(step)
            local = slice(rank * 4, rank * 4 + 4)
            loss = F.cross_entropy(model(x[local]), y[local])
            exact.append(bool(torch.equal(threshold.tau, expected)) or threshold.target_sparsity() == 0.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        # realised sparsity of the effective weights the next forward uses, over the whole pool
        model(global_batch(STEPS)[0][:1])
        weights = [full(model.get_parameter(p)).detach() for p in threshold.pool_paths]
        zeros = sum(int((threshold.method.effective(w, threshold.tau) == 0).sum()) for w in weights)
        total = sum(w.numel() for w in weights)
        out[method] = {
            "exact": exact,
            "zeros": zeros,
            "total": total,
            "q": threshold.target_sparsity(),
            "kinds": sorted(kinds),
            "tau": float(threshold.tau),
        }
    return out


class Block(nn.Module):
    """A residual block: inlined by torch.fx unless kept as a leaf (FSDP2 hooks need it to be called)."""

    def __init__(self, width):
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)

    def forward(self, x):
        return x + self.b(F.relu(self.a(x)))


class BlockNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(Block(6), Block(6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.blocks(x))


def scenario_fsdp_blocks(rank):
    """fully_shard on whole blocks: a misplaced shard is refused clearly; blocks kept as leaves train exactly."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    out = {}
    inlined = fxsparse.sparsify(BlockNet(), "st3", 0.5)
    fully_shard(inlined.get_submodule("blocks.0"))  # GraphModule keeps the path, not the Sequential
    try:
        fxsparse.distributed.shard_pool_(inlined)
        out["refused"] = ""
    except ValueError as exc:
        out["refused"] = str(exc)
    model = fxsparse.sparsify(BlockNet(), "st3", 0.5, fxsparse.Cubic(0, 2), leaf_modules=(Block,))
    for name in ("blocks.0", "blocks.1"):
        fully_shard(model.get_submodule(name))
    fully_shard(model)
    fxsparse.distributed.shard_pool_(model)
    threshold = fxsparse.get_threshold(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fxsparse.hook_optimizer(model, opt)
    exact = []
    for step in range(3):
        weights = [full(model.get_parameter(p)).detach().clone() for p in threshold.pool_paths]
        expected = reference_quantile(weights, threshold.target_sparsity())
        g = torch.Generator().manual_seed(step * WORLD + rank)
        loss = model(torch.randn(4, 6, generator=g)).square().mean()
        exact.append(bool(torch.equal(threshold.tau, expected)) or threshold.target_sparsity() == 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out["exact"] = exact
    out["group_size"] = dist.get_world_size(threshold.process_group)
    return out


def scenario_fsdp_erk(rank):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = fxsparse.sparsify(SmallNet(), "st3sigma", 0.7, fxsparse.Cubic(0, 4), distribution="erk")
    fully_shard(model.conv1)
    fully_shard(model.conv2)
    fully_shard(model)
    threshold = fxsparse.get_threshold(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    fxsparse.hook_optimizer(model, opt)
    exact = []
    for step in range(STEPS):
        weights = [full(model.get_parameter(p)).detach().clone() for p in threshold.pool_paths]
        expected = [
            reference_quantile([w], q, lambda i, w: threshold.method.score(w)) if q > 0 else torch.tensor(0.0)
            for w, q in zip(weights, threshold.layer_sparsities())
        ]
        x, y = global_batch(step)
        local = slice(rank * 4, rank * 4 + 4)
        loss = F.cross_entropy(model(x[local]), y[local])
        exact.append(bool(torch.equal(threshold.layer_tau, torch.stack(expected))))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"exact": exact, "taus": threshold.layer_tau.tolist()}


def scenario_fsdp_capped(rank):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    caps = {"min_layer_sparsity": 0.5, "max_layer_sparsity": 0.75}
    model = fxsparse.sparsify(SmallNet(), "st3sigma", 0.7, fxsparse.Cubic(0, 4), **caps)
    single = fxsparse.sparsify(SmallNet(), "st3sigma", 0.7, fxsparse.Cubic(0, 4), **caps)
    fully_shard(model.conv1)
    fully_shard(model.conv2)
    fully_shard(model)
    threshold, reference = fxsparse.get_threshold(model), fxsparse.get_threshold(single)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    fxsparse.hook_optimizer(model, opt)
    exact = []
    for step in range(STEPS):
        x, y = global_batch(step)
        local = slice(rank * 4, rank * 4 + 4)
        loss = F.cross_entropy(model(x[local]), y[local])
        with torch.no_grad():  # one process, the same weights, the same step
            for path in threshold.pool_paths:
                single.get_parameter(path).copy_(full(model.get_parameter(path)))
        reference.advance_(threshold.current_step - reference.current_step)
        fxsparse.pool.refresh_threshold_(single)
        same = torch.equal(threshold.layer_tau, reference.layer_tau) and torch.equal(threshold.tau, reference.tau)
        exact.append(bool(same))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"exact": exact, "taus": threshold.layer_tau.tolist()}


def scenario_explicit_group(rank):
    torch.manual_seed(0)
    model = fxsparse.sparsify(SmallNet(), "st3sigma", 0.6)
    reference = fxsparse.sparsify(SmallNet(), "st3sigma", 0.6)
    reference.load_state_dict(model.state_dict())
    fxsparse.distributed.shard_pool_(model, dist.group.WORLD)
    x = torch.randn(2, 1, 6, 6)
    model(x)
    reference(x)
    return {"equal": bool(torch.equal(fxsparse.get_threshold(model).tau, fxsparse.get_threshold(reference).tau))}


# FSDP2 needs torch.Stream.record_event on the CPU, which torch has from 2.7 on ("'Stream' object has no
# attribute 'record_event'" before): with older torch these CPU tests cannot run FSDP2 at all.
FSDP2_ON_CPU = torch.__version__ >= "2.7"
needs_fsdp2_on_cpu = pytest.mark.skipif(not FSDP2_ON_CPU, reason="torch < 2.7 runs no FSDP2 on the CPU")


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {}
    scenarios = (
        ("ddp", scenario_ddp),
        ("fsdp", scenario_fsdp),
        ("fsdp_blocks", scenario_fsdp_blocks),
        ("explicit", scenario_explicit_group),
        ("fsdp_erk", scenario_fsdp_erk),
        ("fsdp_capped", scenario_fsdp_capped),
    )
    for name, fn in scenarios:
        if name.startswith("fsdp") and not FSDP2_ON_CPU:
            continue
        try:
            results[name] = fn(rank)
        except Exception:  # record, keep the other scenarios (and the other rank) going
            results[name] = {"error": traceback.format_exc()}
        dist.barrier()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    directory = tmp_path_factory.mktemp("dist")
    mp.start_processes(_worker, args=(str(directory / "init"), str(directory)), nprocs=WORLD, start_method="spawn")
    return [torch.load(directory / f"rank{r}.pt") for r in range(WORLD)]


def _get(results, rank, name):
    result = results[rank][name]
    assert "error" not in result, result.get("error")
    return result


def test_ddp_every_rank_has_the_same_tau_and_masks_as_one_process_on_the_global_batch(results):
    for rank in range(WORLD):
        for method, r in _get(results, rank, "ddp").items():
            assert all(len(set(step)) == 1 for step in r["taus"]), (method, r["taus"])
            assert r["tau_vs_single"] < 1e-5, method
            assert r["mask_flips"] == 0, method
            assert r["taus"][-1][0] > 0
            zeros = round(r["sparsity"] * r["pool"])
            assert zeros == zeros_expected(r["pool"], 0.7), method


@needs_fsdp2_on_cpu
def test_fsdp2_sharded_threshold_is_the_exact_global_quantile_at_every_step(results):
    for rank in range(WORLD):
        for method, r in _get(results, rank, "fsdp").items():
            assert "DTensor" in r["kinds"], r["kinds"]  # the threshold really saw shards
            assert all(r["exact"]), (method, r["exact"])
            assert r["q"] == 0.7 and r["zeros"] == zeros_expected(r["total"], 0.7), (method, r)
    assert _get(results, 0, "fsdp")["feather"]["tau"] == _get(results, 1, "fsdp")["feather"]["tau"]


@needs_fsdp2_on_cpu
def test_fsdp2_per_layer_thresholds_are_exact(results):
    for rank in range(WORLD):
        assert all(_get(results, rank, "fsdp_erk")["exact"])
    assert _get(results, 0, "fsdp_erk")["taus"] == _get(results, 1, "fsdp_erk")["taus"]


@needs_fsdp2_on_cpu
def test_fsdp2_global_caps_are_exact(results):
    for rank in range(WORLD):
        assert all(_get(results, rank, "fsdp_capped")["exact"])
    assert _get(results, 0, "fsdp_capped")["taus"] == _get(results, 1, "fsdp_capped")["taus"]


def test_explicit_group_on_replicated_weights_counts_each_weight_once(results):
    for rank in range(WORLD):
        assert _get(results, rank, "explicit")["equal"]


@needs_fsdp2_on_cpu
def test_fsdp2_on_blocks_needs_them_kept_whole_in_the_graph(results):
    for rank in range(WORLD):
        r = _get(results, rank, "fsdp_blocks")
        assert "never calls" in r["refused"] and "leaf_modules=(YourBlock,)" in r["refused"], r["refused"]
        assert all(r["exact"]) and r["group_size"] == WORLD, r
