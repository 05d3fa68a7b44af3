#!/usr/bin/env python
"""`fxsparse export`: write a model as a sparse CSR checkpoint (fxsparse.save_csr) and print what was written.

    python tools/export.py --checkpoint runs/NAME/checkpoint.pt -o model.safetensors   # a training run's model
    python tools/export.py resnet50 --checkpoint run/last.pth --method st3sigma --sparsity 0.9 -o r50.safetensors
    python tools/export.py mypkg.models:build --checkpoint folded.pth -o model.safetensors

The same as `fxsparse export ...` (fxsparse.train.cli); `--help` lists the options.
"""

import sys

from fxsparse.train.cli import tool_main


def main(argv=None) -> int:
    return tool_main("export", argv)


if __name__ == "__main__":
    sys.exit(main())
