"""Benchmark the exact global threshold against the two obvious exact baselines.

    python tools/bench_threshold.py                # resnet50 pool + a 102.5M-weight pool, CPU
    python tools/bench_threshold.py --quick        # tiny smoke run
    python tools/bench_threshold.py --device cuda
    python tools/bench_threshold.py --distributions uniform,erk --global-max-layer-sparsity 0.95 --threads 1 \
        --only-distributions                     # per-layer thresholds and caps (issue 18)

Methods, all exact (the table says whether each value is torch.equal to sort-and-interpolate):
  sort-and-interpolate   fxsparse.threshold.reference_quantile (cat + sort, what the reference code does)
  kthvalue on the cat    cat, torch.kthvalue for rank k, the next order statistic by one masked min
                         (also with 1 intra-op thread, as global_quantile runs on CPU)
  global_quantile cold   no hint, default |w| score (elementwise: sampled off the raw weights)
  global_quantile warm   hint = tau of the pool one simulated training step earlier
  cold/warm, whole-layer score_fn   the same |w| from a score_fn not marked elementwise (as a
                         method's shape-dependent score is): a cold call makes one more pass
--distributions adds, for the resnet50 pool, one exact threshold per layer (`layer_quantiles`, warm: hints = the
previous step's thresholds) at each distribution's per-layer quantiles, next to the global warm call and to the
same per-layer quantiles taken one layer at a time (a `global_quantile` call per layer, the algorithm before
issue 18's second round); "identical" then compares with each layer's sort-and-interpolate. A second table times
the whole threshold recompute of a sparsified resnet50 (st3sigma) per distribution, the global one with
--global-max-layer-sparsity too, after the same simulated training step.
Timings are medians over --repeats, the methods interleaved round-robin inside every repeat so that
load from other processes on a shared machine hits them alike. Peak extra memory is measured, not
estimated: on CPU, each method runs once in a fresh child process that loads the saved pool, resets
its peak RSS (/proc/self/clear_refs) and reports VmHWM minus the RSS before the call, with glibc told
to mmap every allocation >= 64 KiB (MALLOC_MMAP_THRESHOLD_) so that freed blocks are not reused
unseen; on CUDA, torch.cuda.max_memory_allocated() minus the memory allocated before the call.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

THRESHOLD_PY = Path(__file__).resolve().parents[1] / "fxsparse" / "threshold.py"
METHODS = (
    "sort-and-interpolate",
    "kthvalue on the cat",
    "kthvalue on the cat, 1 thread",
    "global_quantile cold",
    "global_quantile warm",
    "cold, whole-layer score_fn",
    "warm, whole-layer score_fn",
)
NO_MEMORY_RUN = {"kthvalue on the cat, 1 thread"}  # same allocations as "kthvalue on the cat"


def load_threshold():
    """fxsparse/threshold.py on its own (it imports only torch): fast start-up for the child processes."""
    spec = importlib.util.spec_from_file_location("fxsparse_threshold_bench", THRESHOLD_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


th = load_threshold()


# -- pools ---------------------------------------------------------------------------------------


def resnet50_pool() -> list[torch.Tensor]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet50")
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    return [m.weight.detach().clone() for m in model.modules() if isinstance(m, kinds)]


def transformer_pool(blocks: int, width: int, seed: int = 0) -> list[torch.Tensor]:
    """ViT-L-like layers (width 1024, MLP 4x): patch-embed conv, per block qkv/proj/fc1/fc2, a head."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(width, 3, 16, 16)]
    for _ in range(blocks):
        shapes += [(3 * width, width), (width, width), (4 * width, width), (width, 4 * width)]
    shapes.append((1000, width))
    return [torch.randn(s, generator=g) * 0.02 * (1.0 + 0.1 * (i % 7)) for i, s in enumerate(shapes)]


def training_step_(pool: list[torch.Tensor], seed: int) -> None:
    """A stand-in for one optimizer step: every weight moves by ~0.1% of the layer's scale."""
    g = torch.Generator().manual_seed(seed)
    for w in pool:
        w.add_(torch.randn(w.shape, generator=g).to(w.device) * (1e-3 * float(w.float().std())))


# -- methods -------------------------------------------------------------------------------------


def kthvalue_on_cat(pool: list[torch.Tensor], q: float) -> torch.Tensor:
    scores = torch.cat([th._abs_score(i, w).reshape(-1) for i, w in enumerate(pool)])
    r_lo, r_hi, frac = th.quantile_position(scores.numel(), q)
    lo = torch.kthvalue(scores, r_lo + 1).values
    if r_hi == r_lo or int(torch.count_nonzero(scores <= lo)) > r_lo + 1:
        hi = lo
    else:
        hi = torch.where(scores > lo, scores, math.inf).amin()
    return th.lerp_like_numpy(lo, hi, frac)


def whole_layer_score(index: int, weight: torch.Tensor) -> torch.Tensor:
    """|w| as a method's score function would compute it: one call per whole layer (not elementwise),
    so a cold call needs a pass to sample the pool and the layer's scores exist at once."""
    return weight.detach().abs().float()


def run_method(name: str, pool, q: float, hint: float) -> torch.Tensor:
    if name == "sort-and-interpolate":
        return th.reference_quantile(pool, q)
    if name == "kthvalue on the cat":
        return kthvalue_on_cat(pool, q)
    if name == "kthvalue on the cat, 1 thread":
        with th._one_thread(True):
            return kthvalue_on_cat(pool, q)
    if name == "global_quantile cold":
        return th.global_quantile(pool, q)
    if name == "global_quantile warm":
        return th.global_quantile(pool, q, hint=hint)
    if name == "cold, whole-layer score_fn":
        return th.global_quantile(pool, q, whole_layer_score)
    if name == "warm, whole-layer score_fn":
        return th.global_quantile(pool, q, whole_layer_score, hint=hint)
    raise ValueError(name)


PASSES = {  # method -> (score_fn, uses the hint)
    "global_quantile cold": (th._abs_score, False),
    "global_quantile warm": (th._abs_score, True),
    "cold, whole-layer score_fn": (whole_layer_score, False),
    "warm, whole-layer score_fn": (whole_layer_score, True),
}


def count_passes(pool, q: float, score_fn, hint) -> int:
    """How many passes over the pool's scores one call makes (the strided sample is not one)."""
    counter = {"n": 0}
    original = th._Pool.chunks

    def counting(self):
        counter["n"] += 1
        return original(self)

    th._Pool.chunks = counting
    try:
        th.global_quantile(pool, q, score_fn, hint=hint)
    finally:
        th._Pool.chunks = original
    return counter["n"]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# -- peak extra memory ---------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def memory_child(method: str, pool_file: str, q: float, hint: float) -> None:
    """Child process: peak RSS growth of one call (see the module docstring)."""
    pool = torch.load(pool_file)
    run_method(method, [torch.randn(1000)], q, hint)  # lazy initialisation outside the measurement
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    run_method(method, pool, q, hint)
    print(json.dumps({"extra_bytes": (_status_kib("VmHWM") - before) * 1024}))


def peak_extra_bytes(method: str, pool, q: float, hint: float, device: str, workdir: Path) -> int | None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run_method(method, pool, q, hint)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    pool_file = workdir / "pool.pt"
    if not pool_file.exists():
        torch.save(pool, pool_file)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(torch.get_num_threads()))
    out = subprocess.run(
        [sys.executable, __file__, "--_memory-child", method, str(pool_file), repr(q), repr(hint)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if out.returncode != 0:
        print(f"  memory child for {method!r} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"]


# -- benchmark -----------------------------------------------------------------------------------


def bench_pool(label: str, pool, q: float, repeats: int, device: str, memory: bool) -> list[list]:
    pool = [w.to(device) for w in pool]
    numel = sum(w.numel() for w in pool)
    pool_bytes = sum(w.numel() * w.element_size() for w in pool)
    hint = float(th.global_quantile(pool, q))  # tau before the simulated step ...
    training_step_(pool, seed=1)  # ... every method then runs on the stepped pool
    times = {m: [] for m in METHODS}
    values = {}
    for r in range(repeats):
        order = METHODS[r % len(METHODS) :] + METHODS[: r % len(METHODS)]
        for method in order:
            sync(device)
            start = time.perf_counter()
            values[method] = run_method(method, pool, q, hint)
            sync(device)
            times[method].append(time.perf_counter() - start)
    reference = values["sort-and-interpolate"]
    median = {m: statistics.median(times[m]) for m in METHODS}
    passes = {m: count_passes(pool, q, fn, hint if warm else None) for m, (fn, warm) in PASSES.items()}
    extra = {}
    if memory:
        with tempfile.TemporaryDirectory() as workdir:
            for method in METHODS:
                if method not in NO_MEMORY_RUN:
                    extra[method] = peak_extra_bytes(method, pool, q, hint, device, Path(workdir))
    rows = []
    for method in METHODS:
        mem = extra.get(method)
        rows.append(
            [
                label if method == METHODS[0] else "",
                method,
                f"{median[method] * 1e3:.1f}",
                f"{min(times[method]) * 1e3:.1f}",
                f"{median['sort-and-interpolate'] / median[method]:.1f}x",
                f"{median['kthvalue on the cat'] / median[method]:.1f}x",
                passes.get(method, "-"),
                "-" if mem is None else f"{mem / 2**20:.1f}",
                "-" if mem is None else f"{100.0 * mem / pool_bytes:.1f}%",
                torch.equal(values[method], reference),
            ]
        )
    print(
        f"  {label}: {len(pool)} tensors, {numel:,} weights ({pool_bytes / 2**20:.0f} MiB), q={q}, "
        f"tau={reference.item():.9g}, hint={hint:.9g}",
        flush=True,
    )
    return rows


def layer_quantile_targets(pool, q: float, distribution: str) -> list[float]:
    """Each layer's final quantile under ``distribution`` (fxsparse.distribution; tensors named l0, l1, ...)."""
    from fxsparse.distribution import layer_targets

    targets = layer_targets([f"l{i}" for i in range(len(pool))], [tuple(w.shape) for w in pool], q, distribution)
    return list(targets.quantiles())


def layer_by_layer(pool, qs, hints) -> torch.Tensor:
    """The per-layer quantiles, one global_quantile call per layer (chunks sized for the whole pool)."""
    budget = sum(w.numel() * w.element_size() for w in pool)
    out = torch.zeros(len(pool))
    for i, (w, q) in enumerate(zip(pool, qs)):
        if q > 0:
            out[i] = th._global_quantile([w], q, th._abs_score, None, hints[i], budget_bytes=budget)
    return out


def bench_distributions(label: str, pool, q: float, distributions: list[str], repeats: int, device: str) -> list:
    """Global warm vs per-layer warm (one pass, and layer by layer), interleaved; medians."""
    pool = [w.to(device) for w in pool]
    qs = {d: layer_quantile_targets(pool, q, d) for d in distributions}
    hint = float(th.global_quantile(pool, q))
    hints = {d: th.layer_quantiles(pool, qs[d]).tolist() for d in distributions}
    training_step_(pool, seed=1)
    calls = {"global_quantile warm": lambda: th.global_quantile(pool, q, hint=hint)}
    for d in distributions:
        calls[f"layer_quantiles warm, {d}"] = lambda d=d: th.layer_quantiles(pool, qs[d], hints=hints[d])
        calls[f"layer by layer warm, {d}"] = lambda d=d: layer_by_layer(pool, qs[d], hints[d])
    names = list(calls)
    times = {name: [] for name in names}
    values = {}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            start = time.perf_counter()
            values[name] = calls[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    references = {"global_quantile warm": th.reference_quantile(pool, q)}
    for d in distributions:
        per_layer = [th.reference_quantile([w], x) if x > 0 else torch.tensor(0.0) for w, x in zip(pool, qs[d])]
        references[f"layer_quantiles warm, {d}"] = references[f"layer by layer warm, {d}"] = torch.stack(per_layer)
    base = statistics.median(times["global_quantile warm"])
    rows = []
    for name in names:
        median = statistics.median(times[name])
        same = torch.equal(values[name].cpu(), references[name].cpu())
        rows.append([label if name == names[0] else "", name, f"{median * 1e3:.1f}", f"{min(times[name]) * 1e3:.1f}"])
        rows[-1] += [f"{median / base:.2f}x", same]
    return rows


def bench_recompute(q: float, distributions: list[str], max_layer_sparsity: float | None, repeats: int) -> list:
    """The whole threshold recompute of a sparsified timm resnet50 (st3sigma; GlobalThreshold.compute_tau with the
    hints a training step leaves) under each distribution, after the same simulated training step; medians."""
    import timm

    import fxsparse

    torch.manual_seed(0)
    base = timm.create_model("resnet50")
    specs = {"global": {}} | {d: {"distribution": d} for d in distributions}
    if max_layer_sparsity is not None:
        specs[f"global, max_layer_sparsity={max_layer_sparsity}"] = {"max_layer_sparsity": max_layer_sparsity}
    variants = {}
    for name, spec in specs.items():
        model = fxsparse.sparsify(base, "st3sigma", q, **spec)
        threshold = fxsparse.get_threshold(model)
        weights = tuple(model.get_parameter(path) for path in threshold.pool_paths)
        variants[name] = (threshold, weights)

    def recompute(threshold, weights) -> float:
        start = time.perf_counter()
        threshold.thresholds().copy_(threshold.compute_tau(threshold.pool_values(weights)))
        threshold._set_prunes()
        return time.perf_counter() - start

    for threshold, weights in variants.values():
        recompute(threshold, weights)  # cold: the hints for the first timed (warm) call
    names = list(variants)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names:
            with torch.no_grad():
                training_step_(list(variants[name][1]), seed=100 + r)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(recompute(*variants[name]))
    base_median = statistics.median(times["global"])
    return [
        [name, f"{statistics.median(times[name]) * 1e3:.1f}", f"{min(times[name]) * 1e3:.1f}"]
        + [f"{statistics.median(times[name]) / base_median:.2f}x"]
        for name in names
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per method (median reported)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--q", type=float, default=0.9, help="quantile (the sparsity)")
    parser.add_argument(
        "--blocks", type=int, default=8, help="transformer blocks of the large pool (12.6M weights each)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny pools, 2 repeats: a smoke run")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument(
        "--distributions", default="", help="also per-layer thresholds on the first pool, e.g. uniform,erk (issue 18)"
    )
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    parser.add_argument(
        "--global-max-layer-sparsity",
        type=float,
        default=None,
        help="with --distributions: also the recompute of the global distribution with this cap",
    )
    parser.add_argument("--only-distributions", action="store_true", help="skip the global methods table")
    parser.add_argument("--_memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory_child:
        method, pool_file, q, hint = args._memory_child
        memory_child(method, pool_file, float(q), float(hint))
        return
    from tabulate import tabulate

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} intra-op threads, "
        f"{os.cpu_count()} CPUs, load average at start {load[0]:.1f}"
    )
    if args.quick:
        repeats = min(args.repeats, 2)
        pools = [
            ("small ViT-like (2 blocks, width 256)", transformer_pool(2, 256)),
            ("small ViT-like (4 blocks, width 256)", transformer_pool(4, 256, seed=1)),
        ]
    else:
        repeats = args.repeats
        pools = [
            ("timm resnet50", resnet50_pool()),
            (f"ViT-L-like, {args.blocks} blocks", transformer_pool(args.blocks, 1024)),
        ]
    distributions = [d for d in args.distributions.split(",") if d]
    if distributions:
        label, pool = pools[0]
        table = bench_distributions(label, pool, args.q, distributions, repeats, args.device)
        headers = ["pool", "thresholds", "median ms", "min ms", "vs global warm", "identical"]
        print(f"\nper-layer thresholds, q={args.q}, median of {repeats} interleaved repeats")
        print(tabulate(table, headers=headers, tablefmt="github", disable_numparse=True))
        table = bench_recompute(args.q, distributions, args.global_max_layer_sparsity, repeats)
        print(f"\nthreshold recompute of timm resnet50 (st3sigma, warm), q={args.q}, median of {repeats}")
        headers = ["distribution", "median ms", "min ms", "vs global"]
        print(tabulate(table, headers=headers, tablefmt="github", disable_numparse=True))
        if args.only_distributions:
            return
    rows = []
    for label, pool in pools:
        rows += bench_pool(label, pool, args.q, repeats, args.device, not args.no_memory)
        del pool
    headers = [
        "pool",
        "method",
        "median ms",
        "min ms",
        "vs sort",
        "vs kthvalue",
        "passes",
        "peak extra MiB",
        "of pool",
        "identical",
    ]
    print()
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
    load = os.getloadavg()
    if args.no_memory:
        method = "not measured (--no-memory)."
    elif args.device == "cuda":
        method = "torch.cuda.max_memory_allocated() growth during one call."
    else:
        method = "VmHWM - VmRSS of one call in a fresh process (clear_refs reset, MALLOC_MMAP_THRESHOLD_=65536)."
    print(f"\nmedian of {repeats} interleaved repeats; load average at end {load[0]:.1f}. Peak extra memory: {method}")


if __name__ == "__main__":
    main()
