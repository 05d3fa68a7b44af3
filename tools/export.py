#!/usr/bin/env python
"""Turn a training checkpoint into a sparse CSR checkpoint (fxsparse.save_csr) and print what was written.

    python tools/export.py resnet50 --checkpoint run/last.pth --method st3sigma -o resnet50-csr.safetensors
    python tools/export.py mypkg.models:build --checkpoint folded.pth -o model.safetensors

The checkpoint is a state_dict (or a dict holding one under "state_dict"/"model") of a folded model, or
of a sparsified one (then --method is needed to rebuild and fold it), or a .safetensors file.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source tree

from fxsparse.export import save_csr  # noqa: E402
from fxsparse.loading import load_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="timm model name (resnet50) or package.module:callable")
    parser.add_argument("--checkpoint", help="state_dict file (.pth/.pt/.safetensors); omitted: the fresh model")
    parser.add_argument("-o", "--output", required=True, help="where to write the CSR checkpoint (.safetensors)")
    parser.add_argument("--method", help="method of a sparsified checkpoint (st3, st3sigma, feather, gmp, ste)")
    parser.add_argument("--sparsity", type=float, help="final sparsity the sparsified checkpoint was trained for")
    parser.add_argument("--num-classes", type=int, help="classifier size, when it differs from the default")
    parser.add_argument("--all-tensors", action="store_true", help="list every tensor, not only the CSR ones")
    args = parser.parse_args(argv)

    try:
        model, method = load_model(args.model, args.checkpoint, method=args.method, sparsity=args.sparsity,
                                   num_classes=args.num_classes)
        if args.checkpoint is None:
            print(f"note: no --checkpoint, exporting the freshly initialised {args.model}", file=sys.stderr)
        report = save_csr(model, args.output, method=method, architecture=args.model,
                          metadata={"source": os.path.abspath(args.checkpoint) if args.checkpoint else None})
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.table(all_tensors=args.all_tensors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
