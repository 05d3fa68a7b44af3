#!/usr/bin/env python
"""Accuracy benchmark: dense and every method at several sparsities, same recipe and seed.

    python tools/bench_accuracy.py --preset cpu                 # Fashion-MNIST, small CNN (2 CPU cores)
    python tools/bench_accuracy.py --preset gpu                 # Fashion-MNIST, ResNet-20, 30 epochs
    python tools/bench_accuracy.py --quick                      # smoke run on a small subset, 1 epoch
    python tools/bench_accuracy.py --methods st3,gmp --sparsities 0.98 --epochs 5
    python tools/bench_accuracy.py --methods st3,feather --sparsities 0.9,0.95 --distributions uniform,erk --no-dense

Every run is `fxsparse.train.run` (the same code as `fxsparse train`): the test accuracy is measured on
the 10k test set once, at the end; nothing is chosen on it. Prints a table (test accuracy, realised
sparsity, sparse MACs as % of dense, train time), checks the benchmark's bars, and writes JSON.
Runs whose summary.json already holds the same settings are reused (--fresh retrains them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

from fxsparse.train import TrainConfig, run
from fxsparse.train.config import NON_RESULT_KEYS
from fxsparse.train.data import load_data_of
from fxsparse.train.recipe import set_threads

METHODS = ("st3", "st3sigma", "feather", "gmp", "ste")
STE_METHODS = ("st3", "st3sigma", "feather")
PRESETS = {
    # Small CNN (388k conv/linear weights, 7.7M MACs/image), 12 epochs: about 5 min per run on 2 free cores.
    "cpu": dict(
        dataset="fashion-mnist",
        model="cnn",
        width=1.0,
        epochs=12,
        batch_size=128,
        lr=0.1,
        weight_decay=5e-4,
        lr_schedule="cosine",
    ),
    # CIFAR-style ResNet-20 (width 1, 271k weights), 30 epochs: for a GPU.
    "gpu": dict(
        dataset="fashion-mnist",
        model="resnet20",
        width=1.0,
        epochs=30,
        batch_size=128,
        lr=0.1,
        weight_decay=5e-4,
        lr_schedule="cosine",
    ),
}
QUICK = dict(epochs=1, limit_train=2048, limit_eval=1000)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.replace(",", " ").split()]


def _names(text: str) -> list[str]:
    return [v for v in text.replace(",", " ").split() if v]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--methods", type=_names, default=list(METHODS), help="comma-separated (dense is always run first)")
    p.add_argument("--sparsities", type=_floats, default=[0.9, 0.95, 0.98])
    p.add_argument(
        "--distributions",
        type=_names,
        default=["global"],
        help="comma-separated layer-wise distributions: global, uniform, erk (fxsparse.sparsify's distribution=)",
    )
    p.add_argument("--epochs", type=int, help="override the preset's epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    p.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    p.add_argument("--runs-dir", default="runs/bench")
    p.add_argument("--json", default=None, help="results file (default <runs-dir>/bench_<preset>.json)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the free CPUs)")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None)
    p.add_argument(
        "--fresh", action="store_true", help="retrain runs that already have a summary with the same settings"
    )
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    return p.parse_args(argv)


def configs(args: argparse.Namespace) -> list[TrainConfig]:
    base = dict(
        PRESETS[args.preset],
        seed=args.seed,
        device=args.device,
        data_dir=args.data_dir,
        threads=args.threads,
        runs_dir=args.runs_dir,
        progress=args.progress,
        overwrite=True,
    )
    if args.quick:
        base.update(QUICK)
    if args.epochs is not None:
        base["epochs"] = args.epochs
    tag = f"{args.preset}{'-quick' if args.quick else ''}"
    out = [] if args.no_dense else [TrainConfig(**base, method="dense", sname=f"{tag}-dense")]
    for distribution in args.distributions:
        suffix = "" if distribution == "global" else f"-{distribution}"
        for sparsity in args.sparsities:
            for method in args.methods:
                out.append(
                    TrainConfig(
                        **base,
                        method=method,
                        sparsity=sparsity,
                        distribution=distribution,
                        sname=f"{tag}-{method}-{round(sparsity * 100, 2):g}{suffix}",
                    )
                )
    return out


def _same_settings(saved: dict, config: TrainConfig) -> bool:
    current = {k: v for k, v in config.to_dict().items() if k not in NON_RESULT_KEYS}
    return {k: saved.get(k) for k in current} == current


def row_of(summary: dict) -> dict:
    dense, sparse = summary.get("dense_macs"), summary.get("sparse_macs")
    return {
        "method": summary["method"],
        "distribution": summary.get("config", {}).get("distribution", "global"),
        "sparsity": summary["sparsity"],
        "test_acc": summary["test_acc"],
        "val_acc": summary["val_acc"],
        "realized_sparsity": summary["realized_sparsity"],
        "sparse_macs": sparse,
        "dense_macs": dense,
        "macs_pct": 100.0 * sparse / dense if dense else None,
        "csr_bytes": summary.get("csr_bytes"),
        "train_time_s": summary["train_time_s"],
        "epochs": summary["epochs"],
        "threads": summary.get("threads"),
    }


def check_bars(rows: list[dict]) -> list[tuple[str, bool, str]]:
    """The benchmark's three bars, on the rows present."""
    rows = [r for r in rows if r.get("distribution", "global") == "global"]  # the bars are about the global ranking
    by = {(r["method"], round(r["sparsity"], 4)): r for r in rows}
    dense = by.get(("dense", 0.0))
    bars = []
    if dense:
        for m in STE_METHODS:
            r = by.get((m, 0.9))
            if r:
                gap = dense["test_acc"] - r["test_acc"]
                bars.append(
                    (
                        f"90%: {m} within 1.0 point of dense",
                        gap <= 1.0,
                        f"{r['test_acc']:.2f} vs {dense['test_acc']:.2f} ({-gap:+.2f})",
                    )
                )
    gmp = by.get(("gmp", 0.98))
    for m in ("feather", "st3"):
        r = by.get((m, 0.98))
        if r and gmp:
            bars.append(
                (
                    f"98%: {m} beats gmp",
                    r["test_acc"] > gmp["test_acc"],
                    f"{r['test_acc']:.2f} vs {gmp['test_acc']:.2f}",
                )
            )
    for s in sorted({r["sparsity"] for r in rows if r["method"] == "st3sigma"}):
        a, b = by.get(("st3sigma", round(s, 4))), by.get(("st3", round(s, 4)))
        if a and b and a["sparse_macs"] is not None and b["sparse_macs"] is not None:
            bars.append(
                (
                    f"{s:.0%}: st3sigma fewer sparse MACs than st3",
                    a["sparse_macs"] < b["sparse_macs"],
                    f"{a['macs_pct']:.1f} % vs {b['macs_pct']:.1f} % of dense",
                )
            )
    return bars


def _order(row: dict) -> tuple:
    method_rank = METHODS.index(row["method"]) if row["method"] in METHODS else -1
    return (row["method"] != "dense", row.get("distribution", "global"), row["sparsity"], method_rank)


def table(rows: list[dict], tablefmt: str = "github") -> str:
    rows = sorted(rows, key=_order)
    body = [
        [
            r["method"],
            "-" if r["method"] == "dense" else r.get("distribution", "global"),
            "-" if r["method"] == "dense" else f"{r['sparsity']:.0%}",
            f"{r['test_acc']:.2f}",
            f"{r['val_acc']:.2f}",
            f"{r['realized_sparsity']:.4f}",
            "-" if r["macs_pct"] is None else f"{r['macs_pct']:.1f}",
            f"{r['train_time_s'] / 60:.1f}",
        ]
        for r in rows
    ]
    return tabulate(
        body,
        headers=[
            "method",
            "distribution",
            "target",
            "test acc %",
            "val acc %",
            "realised sparsity",
            "sparse MACs % of dense",
            "train min",
        ],
        tablefmt=tablefmt,
        disable_numparse=True,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        sys.exit(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    set_threads(args.threads)  # for loading; run() sets them again per run
    todo = configs(args)
    tail = "" if args.distributions == ["global"] else "_" + "_".join(args.distributions)
    json_path = Path(
        args.json or Path(args.runs_dir) / f"bench_{args.preset}{'_quick' if args.quick else ''}{tail}.json"
    )
    json_path.parent.mkdir(parents=True, exist_ok=True)
    first = todo[0]
    data = load_data_of(first)
    rows, started = [], time.time()
    for i, config in enumerate(todo, 1):
        summary_path = config.run_dir / "summary.json"
        if not args.fresh and summary_path.is_file():
            saved = json.loads(summary_path.read_text())
            if _same_settings(saved.get("config", {}), config):
                print(f"[{i}/{len(todo)}] {config.run_name}: reusing {summary_path}", flush=True)
                rows.append(row_of(saved))
                continue
        print(f"\n[{i}/{len(todo)}] {config.run_name} ({time.time() - started:.0f}s elapsed)", flush=True)
        rows.append(row_of(run(config, data=data)))  # threads: --threads, else the free CPUs when each run starts
        json_path.write_text(
            json.dumps(
                {"preset": args.preset, "settings": PRESETS[args.preset], "quick": args.quick, "rows": rows}, indent=2
            )
        )
    bars = check_bars(rows)
    threads_used = sorted(
        {
            json.loads((c.run_dir / "summary.json").read_text()).get("threads") or 0
            for c in todo
            if (c.run_dir / "summary.json").is_file()
        }
    )
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch threads {threads_used if args.threads is None else args.threads}, "
        f"torch {torch.__version__}"
    )
    result = {
        "preset": args.preset,
        "settings": dict(PRESETS[args.preset], **({"epochs": args.epochs} if args.epochs else {})),
        "quick": args.quick,
        "seed": args.seed,
        "machine": machine,
        "command": " ".join(sys.argv),
        "rows": rows,
        "bars": [{"bar": b, "met": ok, "numbers": n} for b, ok, n in bars],
        "wall_time_s": time.time() - started,
    }
    json_path.write_text(json.dumps(result, indent=2))
    print(
        f"\npreset {args.preset}: {todo[0].model} on {todo[0].dataset}, {todo[0].total_epochs} epochs, "
        f"seed {args.seed}; {machine}"
    )
    print(table(rows))
    if bars:
        print()
        print(
            tabulate(
                [[b, "met" if ok else "MISSED", n] for b, ok, n in bars],
                headers=["bar", "", "numbers"],
                tablefmt="github",
            )
        )
    print(f"\nwall time {(time.time() - started) / 60:.1f} min; results in {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
