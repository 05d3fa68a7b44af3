#!/usr/bin/env python
"""Per-layer dense and sparse MACs of a model (fxsparse.flops): table, JSON and an optional PNG chart.

    python tools/flops.py resnet50                                   # dense: 4,089,184,256 MACs
    python tools/flops.py resnet50 --checkpoint resnet50-csr.safetensors --json report.json --plot report.png
    python tools/flops.py resnet50 --checkpoint run/last.pth --method st3sigma

The checkpoint may be a CSR checkpoint, a folded state_dict, or a sparsified one (with --method).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source tree

import torch  # noqa: E402

from fxsparse.loading import load_model  # noqa: E402
from fxsparse.flops import flops  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="timm model name (resnet50) or package.module:callable")
    parser.add_argument("--checkpoint", help="CSR checkpoint, state_dict (.pth/.pt) or .safetensors file")
    parser.add_argument("--method", help="method of a sparsified checkpoint (st3, st3sigma, feather, gmp, ste)")
    parser.add_argument("--sparsity", type=float, help="final sparsity the sparsified checkpoint was trained for")
    parser.add_argument("--num-classes", type=int, help="classifier size, when it differs from the default")
    parser.add_argument("--input-size", type=int, nargs="+", metavar="N",
                        help="input size without the batch, e.g. 3 224 224 (default: the timm config, else 3 224 224)")
    parser.add_argument("--batch-size", type=int, default=1, help="MACs are for one forward of this batch (default 1)")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON ('-' for stdout instead of the table)")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG chart of per-layer density and MACs")
    args = parser.parse_args(argv)

    try:
        model, _ = load_model(args.model, args.checkpoint, method=args.method, sparsity=args.sparsity,
                              num_classes=args.num_classes)
        size = args.input_size or list(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
        report = flops(model, torch.randn(args.batch_size, *size))
        if args.plot:
            report.plot(args.plot)
    except (ValueError, TypeError, RuntimeError, ImportError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json == "-":
        print(report.to_json())
        return 0
    print(report.table())
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(report.to_json() + "\n")
        print(f"\nwrote {args.json}")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
