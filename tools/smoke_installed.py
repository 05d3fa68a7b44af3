"""Smoke test of an installed fxsparse, run from outside the checkout (tools/check.sh does, in a fresh
environment holding the built wheel): the package imports from site-packages, not from the checkout;
it sparsifies and folds a tiny model at exactly the requested sparsity; and its command line runs and
finds the shipped configs, which only a wheel with the configs as package data can.

    python tools/smoke_installed.py      # with the environment's python, from any folder but the checkout
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
SHIPPED_CONFIGS = {
    "st3_cifar": 'method = "st3"',
    "feather_cifar": 'method = "feather"',
    "fashion_mnist_cpu": 'dataset = "fashion-mnist"',
}


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"smoke test: FAILED: {message}")


def run(command: list[str], cwd: str) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    check(done.returncode == 0, f"`{' '.join(command)}` exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done.stdout


def main() -> int:
    import torch

    import fxsparse

    where = Path(fxsparse.__file__).resolve()
    check(CHECKOUT not in where.parents, f"fxsparse was imported from the checkout ({where}), not the installed wheel")
    print(f"smoke test: fxsparse {fxsparse.__version__} from {where.parent}, torch {torch.__version__}")

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 3)
    )
    sparse = fxsparse.sparsify(model, method="st3sigma", sparsity=0.75, schedule=fxsparse.Constant())
    sparse(torch.randn(2, 1, 8, 8)).sum().backward()
    dense = fxsparse.fold(sparse)
    weights = [p for name, p in dense.named_parameters() if name.endswith("weight")]
    zeros, total = sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)
    check(zeros == round(0.75 * total), f"folded model has {zeros} zeros of {total} weights, expected 75%")
    print(f"smoke test: sparsify + fold: {zeros}/{total} weights zero")

    from fxsparse.inference import native

    sources = [native.CSRC / name for name in native.SOURCES]
    check(all(path.is_file() for path in sources), f"the wheel lacks the kernel sources {sources}")
    print(f"smoke test: the compiled kernels' sources ship in {native.CSRC}")

    cli = str(Path(sys.executable).parent / "fxsparse")
    with tempfile.TemporaryDirectory() as outside:  # no configs/ or fxsparse/ to find by accident
        check("train" in run([cli, "--help"], outside), "`fxsparse --help` does not list `train`")
        check("--config" in run([cli, "train", "--help"], outside), "`fxsparse train --help` lacks --config")
        run([sys.executable, "-m", "fxsparse", "--version"], outside)
        for name, line in SHIPPED_CONFIGS.items():
            printed = run([cli, "train", "--config", name, "--print-config"], outside)
            check(line in printed, f"`fxsparse train --config {name} --print-config` does not print {line!r}")
        print(f"smoke test: the CLI runs and finds the shipped configs {', '.join(SHIPPED_CONFIGS)}")
        check(not os.listdir(outside), f"--print-config wrote files: {os.listdir(outside)}")
    print("smoke test: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
