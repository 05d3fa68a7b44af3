#!/usr/bin/env python
"""MACs of a model's masks under each layer-wise distribution (issue 18): global, uniform, ERK.

For each method and distribution it sparsifies the model (its own initialisation, seed 0: the masks a run
starts from at the final sparsity) and prints the sparse MACs of one forward as % of dense and the reduction
(dense / sparse), from `fxsparse.flops`. Under uniform and ERK every layer prunes a fixed count, so the MACs do
not depend on the weights, and st3 and st3sigma give the same figure; under global they depend on the weights.
--save-dir writes each model's CSR checkpoint (for tools/bench_inference.py --checkpoint ... --arch MODEL).

    python tools/bench_distributions.py --model resnet50 --sparsity 0.9
    python tools/bench_distributions.py --model resnet50 --sparsity 0.9 --distributions global@0.95
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tabulate import tabulate

import fxsparse


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", help="a timm model name")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--methods", default="st3,st3sigma")
    parser.add_argument(
        "--distributions",
        default="global,uniform,erk",
        help="comma-separated; 'global@0.95' is the global distribution with max_layer_sparsity=0.95",
    )
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--save-dir", default=None, help="write <model>-<method>-<distribution>.safetensors here")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    import timm

    torch.manual_seed(0)
    model = timm.create_model(args.model)
    x = torch.randn(1, 3, args.size, args.size)
    rows = []
    for method in args.methods.split(","):
        for distribution in args.distributions.split(","):
            name, _, cap = distribution.partition("@")  # global@0.95: with max_layer_sparsity=0.95
            caps = {"max_layer_sparsity": float(cap)} if cap else {}
            sparse = fxsparse.sparsify(model, method, args.sparsity, distribution=name, **caps)
            report = fxsparse.flops(sparse, x)
            rows.append(
                {
                    "method": method,
                    "distribution": distribution,
                    "realized_sparsity": fxsparse.realized_sparsity(sparse),
                    "dense_macs": report.dense_macs,
                    "sparse_macs": report.sparse_macs,
                }
            )
            if args.save_dir:
                Path(args.save_dir).mkdir(parents=True, exist_ok=True)
                path = Path(args.save_dir) / f"{args.model}-{method}-{distribution}.safetensors"
                fxsparse.save_csr(sparse, path, architecture=args.model)
    print(f"{args.model} at {args.sparsity:g} sparsity, input 1x3x{args.size}x{args.size}, initial weights (seed 0)")
    print(
        tabulate(
            [
                [
                    r["method"],
                    r["distribution"],
                    f"{r['realized_sparsity']:.4f}",
                    f"{r['sparse_macs'] / 1e6:,.0f}",
                    f"{100 * r['sparse_macs'] / r['dense_macs']:.1f}",
                    f"{r['dense_macs'] / r['sparse_macs']:.2f}x",
                ]
                for r in rows
            ],
            headers=["method", "distribution", "sparsity", "sparse MMACs", "% of dense", "MAC reduction"],
            tablefmt="github",
            disable_numparse=True,
        )
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
