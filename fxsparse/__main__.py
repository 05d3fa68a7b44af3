"""python -m fxsparse ...: the same as the `fxsparse` console script."""

import sys

from .train.cli import main

sys.exit(main())
