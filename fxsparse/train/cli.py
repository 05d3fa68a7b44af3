"""The `fxsparse` command (also `python -m fxsparse`): train, export, flops.

    fxsparse train                                   # the Fashion-MNIST CPU preset (about 10 min on 2 cores)
    fxsparse train --method feather --sparsity 0.95 --epochs 30 --model resnet20 --width 2
    fxsparse train --config st3_cifar --epochs 2     # a shipped config; command-line values override the file
    fxsparse train ... --resume                      # continue an interrupted run from its last checkpoint
    fxsparse export --checkpoint runs/NAME/checkpoint.pt -o model.safetensors   # the run's model, at its step
    fxsparse export resnet50 --checkpoint folded.pth -o resnet50-csr.safetensors
    fxsparse flops cnn                               # per-layer dense and sparse MACs of a fresh model
    fxsparse flops --checkpoint runs/NAME/checkpoint.pt --json flops.json --plot flops.png

Subcommands live in SUBCOMMANDS (name -> (help, add_arguments, handler)); add one there.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence

import torch

from ..atomic import atomic_write_text
from ..methods import METHODS
from .config import TrainConfig, config_to_toml, resolve_config, shipped_config_names
from .errors import CommandError, SetupError, first_line

MODEL_HELP = (
    "cnn (small, fast), resnet20/32/44/56/110 (CIFAR-style, see --width), a timm name, or package.module:callable"
)


# ---------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------
def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, e.g. 80,120; got {text!r}") from None


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "auto", "") else int(text)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    S = argparse.SUPPRESS  # only what is typed reaches the namespace: defaults < --config file < command line
    bool_flag = argparse.BooleanOptionalAction
    parser.add_argument(
        "--config",
        default=S,
        metavar="FILE",
        help="TOML file of settings (keys as the long options, with _ or -); the command line overrides "
        f"it; or the name of a shipped config: {', '.join(shipped_config_names())}",
    )

    g = parser.add_argument_group("model and method")
    g.add_argument("--model", default=S, help=f"{MODEL_HELP} (default {d.model})")
    g.add_argument(
        "--width",
        type=float,
        default=S,
        help=f"channel multiplier of the built-in models; Feather's ResNet-20 is 2 (default {d.width:g})",
    )
    g.add_argument(
        "--method", default=S, choices=sorted(METHODS) + ["dense"], help=f"sparse-training method (default {d.method})"
    )
    g.add_argument(
        "--sparsity", type=float, default=S, help=f"final fraction of zero weights, e.g. 0.9 (default {d.sparsity})"
    )
    # -- layer-wise distribution (issue 18) --
    g.add_argument(
        "--distribution",
        default=S,
        help="where the zeros go: global (one threshold), uniform, erk, or per-layer glob=sparsity pairs "
        f"'conv1.*=0.5,fc.*=0.8' with the rest sharing the budget (default {d.distribution})",
    )
    g.add_argument("--min-layer-sparsity", type=float, default=S, help="lower bound on each layer's sparsity")
    g.add_argument("--max-layer-sparsity", type=float, default=S, help="upper bound on each layer's sparsity")
    # -- end layer-wise distribution --

    g = parser.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default=S,
        choices=["fashion-mnist", "cifar10", "cifar100", "imagefolder", "synthetic"],
        help=f"built-in data (default {d.dataset}); imagefolder reads --data-dir/train and --data-dir/val (or test)",
    )
    g.add_argument(
        "--data-dir",
        default=S,
        help="where the data is or goes (Fashion-MNIST: also /usr/share/datasets/fashion-mnist)",
    )
    g.add_argument("--download", action=bool_flag, default=S, help="fetch missing data with torchvision (default on)")
    g.add_argument(
        "--val-size",
        type=int,
        default=S,
        help=f"examples held out of the training set for validation (default {d.val_size})",
    )
    g.add_argument("--split-seed", type=int, default=S, help=f"seed of the train/val split (default {d.split_seed})")
    g.add_argument("--augment", action=bool_flag, default=S, help="random crop and flip while training (default on)")
    g.add_argument("--image-size", type=int, default=S, help=f"imagefolder image size (default {d.image_size})")
    g.add_argument("--num-workers", type=int, default=S, help=f"imagefolder loader workers (default {d.num_workers})")
    g.add_argument(
        "--limit-train",
        type=_optional_int,
        default=S,
        metavar="N",
        help="train on the first N examples only (smoke runs)",
    )
    g.add_argument(
        "--limit-eval",
        type=_optional_int,
        default=S,
        metavar="N",
        help="validate and test on the first N examples only",
    )

    g = parser.add_argument_group("recipe")
    g.add_argument(
        "--epochs",
        type=int,
        default=S,
        help=f"main-phase epochs; the sparsity ramp is placed inside them (default {d.epochs})",
    )
    g.add_argument(
        "--finetune-epochs",
        type=int,
        default=S,
        help="fixed-mask fine-tune epochs after the main phase (ST-3: 10; default 0)",
    )
    g.add_argument("--batch-size", type=int, default=S, help=f"(default {d.batch_size})")
    g.add_argument("--eval-batch-size", type=int, default=S, help=f"(default {d.eval_batch_size})")
    g.add_argument("--lr", type=float, default=S, help=f"SGD learning rate (default {d.lr})")
    g.add_argument("--momentum", type=float, default=S, help=f"(default {d.momentum})")
    g.add_argument("--nesterov", action=bool_flag, default=S, help="Nesterov momentum (default off)")
    g.add_argument(
        "--weight-decay", type=float, default=S, help=f"on conv/linear weights only (default {d.weight_decay:g})"
    )
    g.add_argument(
        "--lr-schedule",
        default=S,
        choices=["cosine", "step", "constant"],
        help=f"stepped per batch (default {d.lr_schedule})",
    )
    g.add_argument(
        "--milestones",
        type=_float_list,
        default=S,
        metavar="E1,E2",
        help="epochs of the step schedule's decays (default 80,120)",
    )
    g.add_argument("--gamma", type=float, default=S, help=f"step schedule's factor (default {d.gamma})")
    g.add_argument("--warmup-epochs", type=float, default=S, help="linear lr warm-up (default 0)")
    g.add_argument("--label-smoothing", type=float, default=S, help="(default 0)")
    g.add_argument(
        "--clip-grad-norm", type=float, default=S, help=f"gradient-norm clip, 0 disables (default {d.clip_grad_norm:g})"
    )
    g.add_argument(
        "--ramp-begin",
        type=float,
        default=S,
        metavar="EPOCH",
        help="start of the cubic sparsity ramp (default: as in the method's paper)",
    )
    g.add_argument(
        "--ramp-end", type=float, default=S, metavar="EPOCH", help="end of the ramp (default: as in the method's paper)"
    )

    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=int, default=S, help=f"(default {d.seed})")
    g.add_argument("--device", default=S, help="auto (GPU when present), cpu, cuda, cuda:1 (default auto)")
    g.add_argument(
        "--threads", type=_optional_int, default=S, help="torch CPU threads (default: the CPUs this process may use)"
    )
    g.add_argument(
        "--sname", default=S, metavar="NAME", help="run name: outputs and TensorBoard logs go to <runs-dir>/NAME"
    )
    g.add_argument("--runs-dir", default=S, help=f"(default {d.runs_dir})")
    g.add_argument(
        "--resume", action=bool_flag, default=S, help="continue the interrupted run from its last checkpoint"
    )
    g.add_argument("--overwrite", action=bool_flag, default=S, help="start again in a run directory that holds a run")
    g.add_argument(
        "--tensorboard",
        action=bool_flag,
        default=S,
        help="log to TensorBoard under <runs-dir>/<sname> (needs tensorboard)",
    )
    g.add_argument("--log-every", type=int, default=S, help=f"steps between TensorBoard points (default {d.log_every})")
    g.add_argument(
        "--progress", action=bool_flag, default=S, help="progress bars (default: when the terminal is interactive)"
    )
    g.add_argument(
        "--export", action=bool_flag, default=S, help="write the CSR checkpoint and FLOP report at the end (default on)"
    )
    g.add_argument(
        "--print-config", action="store_true", default=S, help="print the resolved settings as TOML and exit"
    )


def run_train(args: argparse.Namespace) -> int:
    from .job import run

    config = resolve_config(getattr(args, "config", None), vars(args))
    if getattr(args, "print_config", False):
        sys.stdout.write(config_to_toml(config))
        return 0
    try:
        run(config)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; the last finished epoch is in {config.run_dir}/checkpoint.pt: "
            "run the same command with --resume to continue",
            file=sys.stderr,
        )
        return 130
    return 0


# ---------------------------------------------------------------------------------------------------
# export, flops: a model from a name and a checkpoint (fxsparse.train.loading)
# ---------------------------------------------------------------------------------------------------
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help=f"{MODEL_HELP}; optional with a `fxsparse train` checkpoint")
    parser.add_argument(
        "--checkpoint",
        help="a `fxsparse train` checkpoint (runs/NAME/checkpoint.pt), a state_dict "
        "(.pt/.pth), a CSR checkpoint or a .safetensors file; omitted: a fresh model",
    )
    parser.add_argument(
        "--method",
        choices=sorted(METHODS),
        help="method of a sparsified state_dict (a `fxsparse train` checkpoint records its own)",
    )
    parser.add_argument("--sparsity", type=float, help="final sparsity of a sparsified state_dict (likewise)")
    parser.add_argument("--num-classes", type=int, help="classifier size, when it differs from the model's default")
    parser.add_argument("--width", type=float, help="channel multiplier of the built-in models (default 1)")


def _check_model_arguments(args: argparse.Namespace) -> None:
    if args.sparsity is not None and not 0.0 <= args.sparsity < 1.0:
        raise CommandError(
            f"--sparsity is the fraction of zero weights, in [0, 1); got {args.sparsity:g} (for 90% write 0.9)"
        )
    if args.width is not None and not (math.isfinite(args.width) and args.width > 0):
        raise CommandError(f"--width is a channel multiplier and must be > 0; got {args.width:g}")
    if args.num_classes is not None and args.num_classes < 1:
        raise CommandError(f"--num-classes must be >= 1; got {args.num_classes}")


def _check_output_paths(**paths: str | None) -> None:
    """Every file the command will write can be written, checked before anything is: never half the outputs."""
    for option, path in paths.items():
        if path is None or path == "-":
            continue
        flag = "-o" if option == "output" else f"--{option}"
        directory = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise CommandError(f"{flag} {path!r} is a directory: give a file name")
        if not os.path.isdir(directory):
            raise CommandError(f"cannot write {flag} {path!r}: directory {directory!r} does not exist")
        if not os.access(directory, os.W_OK):
            raise CommandError(f"cannot write {flag} {path!r}: directory {directory!r} is not writable")


def _load(args: argparse.Namespace):
    from .loading import load_model

    _check_model_arguments(args)
    try:
        loaded = load_model(
            args.model,
            args.checkpoint,
            method=args.method,
            sparsity=args.sparsity,
            num_classes=args.num_classes,
            width=args.width,
        )
    except TypeError as error:  # a package.module:callable that does not build a model from these arguments
        raise CommandError(
            f"cannot build {args.model}: {first_line(error)}; a package.module:callable must build the model when "
            "called with no arguments (or with num_classes=N, given --num-classes)"
        ) from error
    for note in loaded.notes:
        print(f"note: {note}", file=sys.stderr)
    return loaded


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("-o", "--output", required=True, help="where to write the CSR checkpoint (.safetensors)")
    parser.add_argument("--all-tensors", action="store_true", help="list every tensor, not only the CSR ones")


def run_export(args: argparse.Namespace) -> int:
    from ..export import save_csr

    _check_output_paths(output=args.output)
    loaded = _load(args)
    report = save_csr(
        loaded.model, args.output, method=loaded.method, architecture=loaded.name, metadata=loaded.metadata or None
    )
    print(report.table(all_tensors=args.all_tensors))
    return 0


def add_flops_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--input-size",
        type=int,
        nargs="+",
        metavar="N",
        help="one input without the batch, e.g. 3 224 224 (default: the checkpoint's data, the "
        "built-in model's data, timm's config, else 3 224 224)",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="MACs are for one forward of this batch (default 1)")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON ('-' for stdout instead of the table)")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG chart of per-layer density and MACs")


def run_flops(args: argparse.Namespace) -> int:
    from ..flops import flops

    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1; got {args.batch_size}")
    _check_output_paths(json=args.json, plot=args.plot)
    loaded = _load(args)
    size = tuple(args.input_size or loaded.input_size)
    try:
        report = flops(loaded.model, torch.randn(args.batch_size, *size))
    except RuntimeError as error:
        raise CommandError(
            f"{loaded.name} does not run on an input of size {list(size)}: {first_line(error)} (give --input-size)"
        ) from error
    if args.plot:
        try:
            report.plot(args.plot)
        except ImportError as error:
            raise SetupError(str(error)) from error
    if args.json == "-":
        print(report.to_json())
        return 0
    print(report.table())
    if args.json:
        atomic_write_text(args.json, report.to_json() + "\n")
        print(f"\nwrote {args.json}")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------
Handler = Callable[[argparse.Namespace], int]
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {
    "train": (
        "train a sparse model, then fold it and write the CSR checkpoint and FLOP report",
        add_train_arguments,
        run_train,
    ),
    "export": (
        "write a model (a training run's, at its checkpoint's step) as a sparse CSR checkpoint",
        add_export_arguments,
        run_export,
    ),
    "flops": ("per-layer dense and sparse MACs of a model: table, JSON, PNG chart", add_flops_arguments, run_flops),
}


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="fxsparse", description="Sparse training with torch.fx: ST-3, ST-3-sigma, Feather, GMP, STE."
    )
    parser.add_argument("--version", action="version", version=f"fxsparse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, handler) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand; bad input is one line on stderr and exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except (CommandError, FileExistsError, FileNotFoundError, IsADirectoryError, PermissionError, ValueError) as error:
        print(f"fxsparse {args.command}: error: {error}", file=sys.stderr)
        return 2


def tool_main(command: str, argv: Sequence[str] | None = None) -> int:
    """tools/export.py and tools/flops.py: ``fxsparse COMMAND`` with the script's arguments."""
    return main([command, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
