"""Interleaved A/B of builds of the compiled kernels on one accelerated model, in one process.

Timings on a shared VM swing by up to 2x between runs, so a kernel change is judged by timing the builds side by
side: the model is pruned and accelerated once (planned with the first build), then each round times every
build in turn (the kernels' module swapped under the model), and the table gives each build's median over the
rounds, its range, its speed-up over the first build, and that speed-up paired round by round
(timing.paired_ratios: the VM's phases last longer than a round). The builds' outputs must match the first's.

    PYTHONPATH=. python tools/ab_kernels.py --model bert-base --threads 2 \\
        old=/tmp/csrc-before new=fxsparse/inference/csrc

A build is NAME=DIR, DIR a copy of fxsparse/inference/csrc (sparse_kernels.cpp and spmm_simd.h), compiled on
first use and cached like the shipped kernels.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_inference as bench  # noqa: E402
import bench_runtimes as runtimes  # noqa: E402

import fxsparse  # noqa: E402
from fxsparse.inference import call_model, native, timing  # noqa: E402


def build_kernels(directory: str):
    """The kernels compiled from the sources in ``directory`` (native's build, pointed at another folder)."""
    shipped = native.CSRC
    native.CSRC = Path(directory).resolve()
    try:
        missing = [name for name in native.SOURCES if not (native.CSRC / name).is_file()]
        if missing:
            raise SystemExit(f"ab_kernels: {directory} lacks {', '.join(missing)}: give a copy of the csrc folder")
        return native._build()
    finally:
        native.CSRC = shipped


def use(module) -> None:
    """Route the accelerated model's kernel calls to ``module``."""
    native._module, native._tried = module, True


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("builds", nargs="+", metavar="NAME=DIR", help="two or more builds; the first is the base")
    parser.add_argument("--model", default="resnet50", help="a timm name or bert-base (tools/bench_inference.py)")
    parser.add_argument("--masks", default="magnitude", choices=sorted(bench.MASKS))
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--input", type=int, nargs=4, metavar=("N", "C", "H", "W"), help="a timm model's input")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=3, help="forwards timed together in a round")
    args = parser.parse_args(argv)
    builds = {}
    for spec in args.builds:
        name, sep, directory = spec.partition("=")
        if not sep or not name or name in builds:
            parser.error(f"a build is NAME=DIR with a new name, got {spec!r}")
        builds[name] = build_kernels(directory)
    shipped = native._module, native._tried
    try:
        return _run(args, builds)
    finally:
        native._module, native._tried = shipped  # the kernels of this process as they were


def _run(args, builds: dict) -> list[dict]:
    torch.set_num_threads(args.threads)
    model = bench.build(args.model)
    bench.MASKS[args.masks](model, args.sparsity)
    example = bench.example(args.model, args.batch, args.input)
    if args.model != bench.BERT:
        bench.calibrate_batchnorms_(model, bench.example(args.model, 8, args.input))
    use(next(iter(builds.values())))
    fast = fxsparse.accelerate(model, example, progress=False)

    def call():
        return call_model(fast, example)

    times: dict[str, list[float]] = {name: [] for name in builds}
    with torch.no_grad():
        reference = None
        for name, module in builds.items():
            use(module)
            out = runtimes.first_tensor(call())
            if reference is None:
                reference = out
            elif runtimes.relative_error(out, reference) > 1e-5:  # the benchmark's bound on every runtime
                raise SystemExit(f"ab_kernels: build {name}'s output differs from {next(iter(builds))}'s")
        for _ in range(args.rounds):
            for name, module in builds.items():
                use(module)
                call()  # warm: the other build's buffers and code were in the caches
                start = time.perf_counter()
                for _ in range(args.calls):
                    call()
                times[name].append((time.perf_counter() - start) / args.calls)
    base = statistics.median(times[next(iter(builds))])
    paired = timing.paired_ratios(times, next(iter(builds)))
    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        rows.append(
            {
                "build": name,
                "ms": 1e3 * median,
                "min": 1e3 * min(samples),
                "max": 1e3 * max(samples),
                "speedup": base / median,
                "paired": 1 / paired[name],
            }
        )
    print(
        f"{args.model} {args.masks} {args.sparsity:g}, batch {args.batch}, {args.threads} thread(s), "
        f"{args.rounds} rounds of {args.calls} forwards (wall clock, medians)"
    )
    print(
        tabulate(
            [
                [
                    r["build"],
                    f"{r['ms']:.2f}",
                    f"{r['min']:.2f}-{r['max']:.2f}",
                    f"{r['speedup']:.3f}x",
                    f"{r['paired']:.3f}x",
                ]
                for r in rows
            ],
            headers=["build", "ms", "range", f"vs {rows[0]['build']}", "paired"],
        )
    )
    return rows


if __name__ == "__main__":
    main()
