#!/usr/bin/env python
"""`fxsparse flops`: per-layer dense and sparse MACs of a model (fxsparse.flops): table, JSON, PNG chart.

    python tools/flops.py resnet50                                   # dense: 4,089,184,256 MACs
    python tools/flops.py cnn                                        # the training default, on a 1x28x28 image
    python tools/flops.py resnet50 --checkpoint resnet50-csr.safetensors --json report.json --plot report.png
    python tools/flops.py --checkpoint runs/NAME/checkpoint.pt       # a training run's model, at its step

The same as `fxsparse flops ...` (fxsparse.train.cli); `--help` lists the options.
"""

import sys

from fxsparse.train.cli import tool_main


def main(argv=None) -> int:
    return tool_main("flops", argv)


if __name__ == "__main__":
    sys.exit(main())
