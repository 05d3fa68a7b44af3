"""The recipe's pieces (the papers', docs/METHODS.md): device and threads, seeds, the optimizer, the
learning-rate schedule and the sparsity ramp.

SGD with momentum, weight decay on conv/linear weights only (after sparsify() those are the
``...parametrizations.weight.original`` tensors), a cosine or step learning-rate schedule stepped per batch,
and the cubic sparsity ramp placed as in the method's paper (fxsparse.paper_schedule) over the main phase.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..layers import prunable_weights
from ..pool import get_threshold, is_sparsified
from ..schedule import Cubic, paper_schedule
from .config import TrainConfig
from .errors import SetupError


def resolve_device(name: str = "auto") -> torch.device:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SetupError(f"device {name!r} asked for but CUDA is not available; use --device cpu or auto")
        if device.index is None:  # generators and tensors must agree on the index
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def default_threads() -> int:
    """The CPUs this process may use, less those other processes keep busy (1-minute load average).

    On a shared machine, more torch threads than free cores makes every step several times slower
    (OpenMP threads spin waiting for each other), so a busy machine gets fewer threads.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        busy = 0.0
    return max(1, min(cpus, round(cpus - busy)))


def set_threads(threads: int | None = None) -> int:
    """Use ``threads`` torch CPU threads (default: default_threads()); returns the number set."""
    threads = default_threads() if threads is None else max(1, int(threads))
    torch.set_num_threads(threads)
    return threads


def decayed_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The prunable weights (fxsparse.layers; the raw ``original`` behind a sparse parametrization), each once."""
    seen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name in prunable_weights(module):
            if parametrize.is_parametrized(module, name):
                param = module.parametrizations[name].original
            else:
                param = getattr(module, name)
            if isinstance(param, nn.Parameter):
                seen[id(param)] = param
    if is_sparsified(model):  # F.linear / F.conv uses on raw parameters are pooled too
        for path in get_threshold(model).pool_paths:
            param = model.get_parameter(path)
            seen[id(param)] = param
    return list(seen.values())


def build_optimizer(
    model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4, nesterov: bool = False
) -> torch.optim.SGD:
    """SGD with weight decay on conv/linear weights only (no decay on norm layers and biases)."""
    decay = decayed_parameters(model)
    decay_ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in decay_ids]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=momentum, nesterov=nesterov)


@dataclasses.dataclass
class LrLambda:
    """Learning-rate factor at an optimizer step: linear warm-up, then cosine to 0, step decay, or constant.

    A plain picklable object (LambdaLR saves its __dict__), so the schedule resumes exactly.
    """

    kind: str
    total_steps: int
    warmup_steps: int = 0
    milestones: tuple[int, ...] = ()  # in steps
    gamma: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(step - self.warmup_steps, span) / span))
        if self.kind == "step":
            return self.gamma ** sum(step >= m for m in self.milestones)
        if self.kind == "constant":
            return 1.0
        raise ValueError(f"unknown lr_schedule {self.kind!r}; choose cosine, step or constant")


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    kind: str,
    total_epochs: int,
    steps_per_epoch: int,
    milestones: Sequence[float] = (),
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
):
    """A per-batch LambdaLR: milestones and warm-up are given in epochs and applied at the matching step."""
    fn = LrLambda(
        kind,
        total_epochs * steps_per_epoch,
        round(warmup_epochs * steps_per_epoch),
        tuple(round(m * steps_per_epoch) for m in milestones),
        gamma,
    )
    fn(0)  # fail early on an unknown kind
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def sparsity_schedule(config: TrainConfig, steps_per_epoch: int) -> Cubic:
    """The cubic ramp over the main phase: the method's paper placement unless ramp_begin/ramp_end are set."""
    main_steps = config.epochs * steps_per_epoch
    schedule = paper_schedule(config.method, main_steps)
    begin = schedule.begin if config.ramp_begin is None else round(config.ramp_begin * steps_per_epoch)
    end = schedule.end if config.ramp_end is None else round(config.ramp_end * steps_per_epoch)
    if not 0 <= begin < end <= main_steps:
        raise ValueError(
            f"the sparsity ramp must satisfy 0 <= ramp_begin < ramp_end <= epochs ({config.epochs}); "
            f"got ramp_begin={config.ramp_begin}, ramp_end={config.ramp_end}"
        )
    return Cubic(begin=begin, end=end)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
