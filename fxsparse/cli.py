"""The `fxsparse` command (also `python -m fxsparse`).

    fxsparse train                                   # the Fashion-MNIST CPU preset (about 10 min on 2 cores)
    fxsparse train --method feather --sparsity 0.95 --epochs 30 --model resnet20 --width 2
    fxsparse train --config configs/st3_cifar.toml --epochs 2     # command-line values override the file
    fxsparse train ... --resume                      # continue an interrupted run from its last checkpoint

Subcommands live in SUBCOMMANDS (name -> (add_arguments, handler)); add one there.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config file or value that cannot be used; the message says what to write instead."""


# ---------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------
def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, e.g. 80,120; got {text!r}") from None


def _optional_int(text: str) -> Optional[int]:
    return None if text.lower() in ("none", "auto", "") else int(text)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from .methods import METHODS
    from .train import TrainConfig

    d = TrainConfig()
    S = argparse.SUPPRESS  # only what is typed reaches the namespace: defaults < --config file < command line
    bool_flag = argparse.BooleanOptionalAction
    parser.add_argument("--config", default=S, metavar="FILE",
                        help="TOML file of settings (keys as the long options, with _ or -); the command line overrides "
                             f"it; a bare name is looked up in {CONFIG_DIR.name}/ (e.g. st3_cifar, feather_cifar, fashion_mnist_cpu)")

    g = parser.add_argument_group("model and method")
    g.add_argument("--model", default=S, help=f"cnn (small, fast), resnet20 (CIFAR-style, see --width), or a timm name (default {d.model})")
    g.add_argument("--width", type=float, default=S, help=f"channel multiplier of the built-in models; Feather's ResNet-20 is 2 (default {d.width:g})")
    g.add_argument("--method", default=S, choices=sorted(METHODS) + ["dense"], help=f"sparse-training method (default {d.method})")
    g.add_argument("--sparsity", type=float, default=S, help=f"final fraction of zero weights, e.g. 0.9 (default {d.sparsity})")

    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default=S, choices=["fashion-mnist", "cifar10", "cifar100", "imagefolder", "synthetic"],
                   help=f"built-in data (default {d.dataset}); imagefolder reads --data-dir/train and --data-dir/val (or test)")
    g.add_argument("--data-dir", default=S, help="where the data is or goes (Fashion-MNIST: also /usr/share/datasets/fashion-mnist)")
    g.add_argument("--download", action=bool_flag, default=S, help="fetch missing data with torchvision (default on)")
    g.add_argument("--val-size", type=int, default=S, help=f"examples held out of the training set for validation (default {d.val_size})")
    g.add_argument("--split-seed", type=int, default=S, help=f"seed of the train/val split (default {d.split_seed})")
    g.add_argument("--augment", action=bool_flag, default=S, help="random crop and flip while training (default on)")
    g.add_argument("--image-size", type=int, default=S, help=f"imagefolder image size (default {d.image_size})")
    g.add_argument("--num-workers", type=int, default=S, help=f"imagefolder loader workers (default {d.num_workers})")
    g.add_argument("--limit-train", type=_optional_int, default=S, metavar="N", help="train on the first N examples only (smoke runs)")
    g.add_argument("--limit-eval", type=_optional_int, default=S, metavar="N", help="validate and test on the first N examples only")

    g = parser.add_argument_group("recipe")
    g.add_argument("--epochs", type=int, default=S, help=f"main-phase epochs; the sparsity ramp is placed inside them (default {d.epochs})")
    g.add_argument("--finetune-epochs", type=int, default=S, help="fixed-mask fine-tune epochs after the main phase (ST-3: 10; default 0)")
    g.add_argument("--batch-size", type=int, default=S, help=f"(default {d.batch_size})")
    g.add_argument("--eval-batch-size", type=int, default=S, help=f"(default {d.eval_batch_size})")
    g.add_argument("--lr", type=float, default=S, help=f"SGD learning rate (default {d.lr})")
    g.add_argument("--momentum", type=float, default=S, help=f"(default {d.momentum})")
    g.add_argument("--nesterov", action=bool_flag, default=S, help="Nesterov momentum (default off)")
    g.add_argument("--weight-decay", type=float, default=S, help=f"on conv/linear weights only (default {d.weight_decay:g})")
    g.add_argument("--lr-schedule", default=S, choices=["cosine", "step", "constant"], help=f"stepped per batch (default {d.lr_schedule})")
    g.add_argument("--milestones", type=_float_list, default=S, metavar="E1,E2", help="epochs of the step schedule's decays (default 80,120)")
    g.add_argument("--gamma", type=float, default=S, help=f"step schedule's factor (default {d.gamma})")
    g.add_argument("--warmup-epochs", type=float, default=S, help="linear lr warm-up (default 0)")
    g.add_argument("--label-smoothing", type=float, default=S, help="(default 0)")
    g.add_argument("--clip-grad-norm", type=float, default=S, help=f"gradient-norm clip, 0 disables (default {d.clip_grad_norm:g})")
    g.add_argument("--ramp-begin", type=float, default=S, metavar="EPOCH", help="start of the cubic sparsity ramp (default: as in the method's paper)")
    g.add_argument("--ramp-end", type=float, default=S, metavar="EPOCH", help="end of the ramp (default: as in the method's paper)")

    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=int, default=S, help=f"(default {d.seed})")
    g.add_argument("--device", default=S, help="auto (GPU when present), cpu, cuda, cuda:1 (default auto)")
    g.add_argument("--threads", type=_optional_int, default=S, help="torch CPU threads (default: the CPUs this process may use)")
    g.add_argument("--sname", default=S, metavar="NAME", help="run name: outputs and TensorBoard logs go to <runs-dir>/NAME")
    g.add_argument("--runs-dir", default=S, help=f"(default {d.runs_dir})")
    g.add_argument("--resume", action=bool_flag, default=S, help="continue the interrupted run from its last checkpoint")
    g.add_argument("--overwrite", action=bool_flag, default=S, help="start again in a run directory that holds a run")
    g.add_argument("--tensorboard", action=bool_flag, default=S, help="log to TensorBoard under <runs-dir>/<sname> (needs tensorboard)")
    g.add_argument("--log-every", type=int, default=S, help=f"steps between TensorBoard points (default {d.log_every})")
    g.add_argument("--progress", action=bool_flag, default=S, help="progress bars (default: when the terminal is interactive)")
    g.add_argument("--export", action=bool_flag, default=S, help="write the CSR checkpoint and FLOP report at the end (default on)")
    g.add_argument("--print-config", action="store_true", default=S, help="print the resolved settings as TOML and exit")


def read_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ConfigError(f"reading {path} needs Python >= 3.11 (tomllib) or the tomli package on 3.10: "
                              "pip install tomli") from None
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from error


def find_config(name: str) -> Path:
    """A path as given, or a shipped config by name (configs/NAME.toml)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / (name if name.endswith(".toml") else f"{name}.toml")
    if shipped.is_file():
        return shipped
    available = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))) if CONFIG_DIR.is_dir() else "none"
    raise ConfigError(f"config file {name!r} not found (shipped configs: {available})")


def _coerce(key: str, value: Any, field: dataclasses.Field, source: str) -> Any:
    """Check a config-file value against the TrainConfig field's type."""
    hint = typing.get_type_hints(_train_config_class())[key]
    optional = type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
    origin = typing.get_origin(base) or base
    if value is None and optional:
        return None
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }
    if origin in ok:
        if not ok[origin](value):
            raise ConfigError(f"{source}: {key} = {value!r} should be a {origin.__name__}")
        return float(value) if origin is float else value
    if isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return [float(v) for v in value]
    raise ConfigError(f"{source}: {key} = {value!r} should be a list of numbers")


def _train_config_class():
    from .train import TrainConfig

    return TrainConfig


def resolve_train_config(args: argparse.Namespace):
    """TrainConfig from defaults, then the --config file, then what was typed on the command line."""
    from .train import TrainConfig, config_fields

    fields = config_fields()
    values: dict[str, Any] = {}
    config_name = getattr(args, "config", None)
    if config_name:
        path = find_config(config_name)
        for raw_key, value in read_toml(path).items():
            key = raw_key.replace("-", "_")
            if key not in fields:
                close = [k for k in fields if k.startswith(key[:3])]
                raise ConfigError(f"{path}: unknown setting {raw_key!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                                  + f"; settings are: {', '.join(fields)}")
            values[key] = _coerce(key, value, fields[key], str(path))
    for key, value in vars(args).items():
        if key in fields:
            values[key] = value
    try:
        return TrainConfig(**values)
    except (TypeError, AttributeError) as error:
        raise ConfigError(f"invalid settings: {error}") from error


def config_to_toml(config) -> str:
    lines = []
    for key, value in config.to_dict().items():
        if value is None:
            lines.append(f"# {key} = (unset)")
        elif isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        elif isinstance(value, list):
            lines.append(f"{key} = [{', '.join(f'{v:g}' for v in value)}]")
        else:
            lines.append(f"{key} = {value!r}")
    return "\n".join(lines) + "\n"


def run_train(args: argparse.Namespace) -> int:
    from .train import run

    config = resolve_train_config(args)
    if getattr(args, "print_config", False):
        sys.stdout.write(config_to_toml(config))
        return 0
    try:
        run(config)
    except KeyboardInterrupt:
        print(f"\ninterrupted; the last finished epoch is in {config.run_dir}/checkpoint.pt: "
              "run the same command with --resume to continue", file=sys.stderr)
        return 130
    return 0


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "train": ("train a sparse model, then fold it and write the CSR checkpoint and FLOP report", add_train_arguments, run_train),
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="fxsparse", description="Sparse training with torch.fx: ST-3, ST-3-sigma, Feather, GMP, STE.")
    parser.add_argument("--version", action="version", version=f"fxsparse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, handler) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .data import DataError
    from .train import SetupError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except (ConfigError, DataError, SetupError, FileExistsError, FileNotFoundError, ValueError) as error:
        print(f"fxsparse {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
