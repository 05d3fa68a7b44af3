#!/usr/bin/env python
"""Training-step overhead of a sparsified model over the same dense model (issue 5).

One full step = forward, cross-entropy, backward, SGD step, schedule advance. The variants run
round-robin in one process (dense, st3sigma, feather, and st3sigma with the reference algorithm's
sort-and-interpolate threshold), so slow drifts of a shared machine hit them alike; each figure is the
median over --repeats steps, and ratios are against dense. Also times sparsify() itself.

    python tools/bench_step.py --model resnet50 --batch 16 --repeats 7
    python tools/bench_step.py --model resnet50 --batch 8 --repeats 5 --threads 1 --distributions erk --no-reference
    python tools/bench_step.py --threads 1 --distributions uniform,erk --global-max-layer-sparsity 0.95 --no-reference
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate

import fxsparse
from fxsparse.threshold import reference_quantile


def make_variants(
    model_name: str, sparsity: float, device: torch.device, distributions=(), reference=True, global_max=None
) -> dict:
    import timm

    torch.manual_seed(0)
    base = timm.create_model(model_name).to(device)
    variants = {"dense": base}
    for method in ("st3sigma", "feather"):
        variants[method] = fxsparse.sparsify(base, method, sparsity)
    for distribution in distributions:  # per-layer thresholds (issue 18)
        variants[f"st3sigma, {distribution}"] = fxsparse.sparsify(base, "st3sigma", sparsity, distribution=distribution)
    if global_max is not None:  # the global distribution with a cap
        capped = fxsparse.sparsify(base, "st3sigma", sparsity, max_layer_sparsity=global_max)
        variants[f"st3sigma, global, max_layer_sparsity={global_max}"] = capped
    if not reference:
        return variants
    naive = fxsparse.sparsify(base, "st3sigma", sparsity)
    threshold = fxsparse.get_threshold(naive)
    method = threshold.method
    # the reference code's algorithm: concatenate every score, sort, interpolate
    threshold.compute_tau = lambda weights: reference_quantile(
        weights, threshold.target_sparsity(), score_fn=lambda i, w: method.score(w)
    )
    variants["st3sigma, sort-based tau"] = naive
    return variants


def timed_step(model, optimizer, x, y, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if fxsparse.is_sparsified(model):
        fxsparse.step_(model)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_sparsify(model_name: str, repeats: int) -> float:
    import timm

    model = timm.create_model(model_name)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fxsparse.sparsify(model, "st3sigma")
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads (0: torch's default). On a shared machine, 1 avoids OpenMP stalls "
        "that hit the many small ops of every variant",
    )
    parser.add_argument(
        "--distributions", default="", help="also st3sigma under these layer-wise distributions, e.g. uniform,erk"
    )
    parser.add_argument(
        "--global-max-layer-sparsity", type=float, default=None, help="also st3sigma, global, with this cap"
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the sort-based tau variant")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    sparsify_seconds = time_sparsify(args.model, repeats=5)
    distributions = [d for d in args.distributions.split(",") if d]
    variants = make_variants(
        args.model, args.sparsity, device, distributions, not args.no_reference, args.global_max_layer_sparsity
    )
    optimizers = {
        name: torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-5)
        for name, model in variants.items()
    }
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    times = {name: [] for name in variants}
    names = list(variants)
    for repeat in range(args.warmup + args.repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]  # rotated: no variant always first
        for name in order:  # round-robin: drifts hit every variant alike
            model = variants[name]
            seconds = timed_step(model.train(), optimizers[name], x, y, device)
            if repeat >= args.warmup:
                times[name].append(seconds)

    dense = statistics.median(times["dense"])
    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        rows.append([name, f"{median * 1000:.1f}", f"{min(samples) * 1000:.1f}", f"{median / dense:.3f}x"])
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device) + f", torch {torch.__version__}"
    print(f"{args.model}, batch {args.batch} at {args.size}px, sparsity {args.sparsity}, device {device} ({machine})")
    print(f"median of {args.repeats} steps per variant after {args.warmup} warm-up, round-robin in rotating order")
    print(tabulate(rows, headers=["variant", "median ms/step", "min ms/step", "vs dense"], tablefmt="github"))
    print(f"sparsify({args.model}) (deepcopy + trace + rewrite): median {sparsify_seconds * 1000:.0f} ms over 5")
    result = {
        "model": args.model,
        "batch": args.batch,
        "device": str(device),
        "machine": machine,
        "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "ratio_vs_dense": {k: statistics.median(v) / dense for k, v in times.items()},
        "sparsify_seconds": sparsify_seconds,
    }
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
