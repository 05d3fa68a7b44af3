"""TrainConfig, everything a `fxsparse train` run depends on, and where its values come from.

Precedence: the defaults below (the Fashion-MNIST CPU preset), then a TOML file (``--config``: a path,
or the name of a config shipped in fxsparse/train/configs/), then what is typed on the command line.
A TrainConfig is checked when it is made, so a bad value stops the run before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..distribution import check_spec, parse_distribution
from ..methods import METHODS
from .data import DATASETS
from .errors import ConfigError

DENSE = "dense"
LR_SCHEDULES = ("cosine", "step", "constant")
SHIPPED_CONFIGS = resources.files(__package__) / "configs"  # package data: found in a wheel install too


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on. The defaults are the Fashion-MNIST CPU preset (about 10 min on 2 cores)."""

    # what to train
    model: str = "cnn"  # "cnn", "resnet20" (CIFAR-style, --width), a timm name, or "package.module:callable"
    width: float = 1.0
    method: str = "st3sigma"  # st3, st3sigma, feather, gmp, ste, or "dense"
    sparsity: float = 0.9
    distribution: str = "global"  # global, uniform, erk, or "glob=sparsity,..." (fxsparse.distribution)
    min_layer_sparsity: float | None = None  # bounds on each layer's sparsity (any distribution)
    max_layer_sparsity: float | None = None
    # data
    dataset: str = "fashion-mnist"  # fashion-mnist, cifar10, cifar100, imagefolder, synthetic
    data_dir: str | None = None
    download: bool = True
    val_size: int = 5000
    split_seed: int = 0
    augment: bool = True
    image_size: int = 224  # imagefolder only
    num_workers: int = 4  # imagefolder only
    limit_train: int | None = None  # first N training examples only (smoke runs)
    limit_eval: int | None = None  # first N val/test examples only (smoke runs)
    # recipe
    epochs: int = 20  # main phase (the sparsity ramp is placed inside it)
    finetune_epochs: int = 0  # fixed-mask fine-tune after the main phase (ST-3's recipe: 10)
    batch_size: int = 128
    eval_batch_size: int = 1000
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4  # conv/linear weights only
    lr_schedule: str = "cosine"  # cosine | step | constant; stepped per batch over main + fine-tune
    milestones: Sequence[float] = (80, 120)  # epochs, for lr_schedule = "step"
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    clip_grad_norm: float = 3.0  # 0 disables
    ramp_begin: float | None = None  # epoch where the cubic ramp starts; None: as in the method's paper
    ramp_end: float | None = None  # epoch where it reaches the final sparsity; None: as in the paper
    # run
    seed: int = 0
    device: str = "auto"  # auto (cuda when present), cpu, cuda, cuda:1, mps
    threads: int | None = None  # torch CPU threads; None: the free CPUs this process may use
    sname: str | None = None  # run name; outputs go to <runs_dir>/<sname>
    runs_dir: str = "runs"
    resume: bool = False
    overwrite: bool = False
    tensorboard: bool = False
    log_every: int = 50  # steps between TensorBoard points
    progress: bool | None = None  # progress bars; None: when stderr is a terminal
    export: bool = True  # write the CSR checkpoint and the FLOP report at the end

    def __post_init__(self) -> None:
        self.milestones = tuple(float(m) for m in self.milestones)
        self.method = self.method.lower()
        if self.method == DENSE:
            self.sparsity = 0.0
        self._check()

    def _check(self) -> None:
        """Refuse values that cannot make a run, naming the option and what it accepts."""

        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"--{key.replace('_', '-')} {what}; got {getattr(self, key)!r}")

        need(self.method in METHODS or self.method == DENSE, "method", f"is one of {', '.join(sorted(METHODS))}, dense")
        need(0.0 <= self.sparsity < 1.0, "sparsity", "is the final fraction of zero weights, in [0, 1) (e.g. 0.9)")
        try:
            self.distribution_options()
        except (TypeError, ValueError) as error:
            raise ConfigError(f"--distribution/--min-layer-sparsity/--max-layer-sparsity: {error}") from None
        need(
            self.dataset.lower() in DATASETS or self.dataset.lower() in ("fashion_mnist", "fashionmnist", "fmnist"),
            "dataset",
            f"is one of {', '.join(DATASETS)}",
        )
        need(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"is one of {', '.join(LR_SCHEDULES)}")
        for key in ("epochs", "batch_size", "eval_batch_size", "log_every", "image_size"):
            need(getattr(self, key) >= 1, key, "must be a whole number >= 1")
        for key in ("finetune_epochs", "val_size", "num_workers"):
            need(getattr(self, key) >= 0, key, "must be a whole number >= 0")
        for key in ("limit_train", "limit_eval", "threads"):
            need(getattr(self, key) is None or getattr(self, key) >= 1, key, "must be >= 1 (or unset)")
        for key in ("width", "lr"):
            need(math.isfinite(getattr(self, key)) and getattr(self, key) > 0, key, "must be a number > 0")
        for key in ("momentum", "weight_decay", "warmup_epochs", "clip_grad_norm", "gamma"):
            need(math.isfinite(getattr(self, key)) and getattr(self, key) >= 0, key, "must be a number >= 0")
        need(0.0 <= self.label_smoothing < 1.0, "label_smoothing", "must be in [0, 1)")
        need(self.ramp_begin is None or self.ramp_begin >= 0, "ramp_begin", "must be an epoch >= 0")
        need(
            self.ramp_end is None or 0 < self.ramp_end <= self.epochs,
            "ramp_end",
            f"must be an epoch in (0, epochs = {self.epochs}]",
        )
        if self.ramp_begin is not None and self.ramp_end is not None and self.ramp_begin >= self.ramp_end:
            raise ConfigError(
                f"the sparsity ramp must satisfy ramp_begin < ramp_end; got {self.ramp_begin}, {self.ramp_end}"
            )
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ConfigError(
                    f"--device {self.device!r} is not a device: use auto, cpu, cuda, cuda:N or mps"
                ) from None

    def distribution_options(self) -> dict[str, Any]:
        """sparsify()'s distribution arguments (checked)."""
        spec, low, high = check_spec(
            parse_distribution(self.distribution), self.min_layer_sparsity, self.max_layer_sparsity
        )
        return {"distribution": spec, "min_layer_sparsity": low, "max_layer_sparsity": high}

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.finetune_epochs

    @property
    def run_name(self) -> str:
        if self.sname:
            return self.sname
        tail = DENSE if self.method == DENSE else f"{self.method}-{round(self.sparsity * 100, 2):g}"
        if self.method != DENSE and self.distribution != "global":
            tail += f"-{self.distribution if '=' not in self.distribution else 'mapping'}"
        return f"{self.dataset}-{self.model}{'' if self.width == 1 else f'-w{self.width:g}'}-{tail}"

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.run_name

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["milestones"] = list(self.milestones)
        return out


# Settings that do not change the numbers a run produces; a resumed run may change them.
NON_RESULT_KEYS = frozenset(
    {
        "data_dir",
        "download",
        "num_workers",
        "device",
        "threads",
        "sname",
        "runs_dir",
        "resume",
        "overwrite",
        "tensorboard",
        "log_every",
        "progress",
        "export",
        "eval_batch_size",
    }
)


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _coerce(key: str, value: Any, source: str) -> Any:
    """Check a file's value against the TrainConfig field's type."""
    hint = typing.get_type_hints(TrainConfig)[key]
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
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return [float(v) for v in value]
    raise ConfigError(f"{source}: {key} = {value!r} should be a list of numbers")


# ---------------------------------------------------------------------------------------------------
# TOML files
# ---------------------------------------------------------------------------------------------------
def shipped_config_names() -> list[str]:
    return sorted(p.name[:-5] for p in SHIPPED_CONFIGS.iterdir() if p.name.endswith(".toml"))


def find_config(name: str):
    """A path as given, or a config shipped with fxsparse by name (st3_cifar, feather_cifar, fashion_mnist_cpu)."""
    path = Path(name)
    if path.is_file():
        return path
    if path.name == name:  # a bare name: look it up among the shipped configs
        shipped = SHIPPED_CONFIGS / (name if name.endswith(".toml") else f"{name}.toml")
        if shipped.is_file():
            return shipped
    raise ConfigError(
        f"config file {name!r} not found (shipped configs: {', '.join(shipped_config_names()) or 'none'})"
    )


def read_toml(path) -> dict[str, Any]:
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # Python 3.10: tomli is a dependency there
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from error


def checked_settings(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Settings as written in a TOML file or a checkpoint (``-`` or ``_`` in keys), checked against TrainConfig's
    fields and types; ``source`` names them in errors."""
    fields = config_fields()
    checked = {}
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        if key not in fields:
            close = [k for k in fields if k.startswith(key[:3])]
            raise ConfigError(
                f"{source}: unknown setting {raw_key!r}"
                + (f" (did you mean {', '.join(close)}?)" if close else "")
                + f"; settings are: {', '.join(fields)}"
            )
        checked[key] = _coerce(key, value, source)
    return checked


def resolve_config(config_name: str | None, overrides: Mapping[str, Any]) -> TrainConfig:
    """TrainConfig from the defaults, then the config file (if any), then ``overrides`` (the command line)."""
    values: dict[str, Any] = {}
    if config_name:
        path = find_config(config_name)
        values.update(checked_settings(read_toml(path), str(path)))
    values.update({key: value for key, value in overrides.items() if key in config_fields()})
    return TrainConfig(**values)


def config_to_toml(config: TrainConfig) -> str:
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
