"""The training loop behind `fxsparse train`, as plain functions.

The recipe is the papers' (METHODS.md): SGD with momentum, weight decay on conv/linear weights only
(after sparsify() those are the ``...parametrizations.weight.original`` tensors), gradient-norm clip 3,
a cosine or step learning-rate schedule stepped per batch, and the cubic sparsity ramp placed as in the
method's paper (fxsparse.paper_schedule) over the main phase. An optional fixed-mask fine-tune phase
(ST-3's recipe, fxsparse.fix_mask_) follows the main phase. At the end the model is folded, the CSR
checkpoint and the FLOP report are written, and a summary is printed.

Resume is exact: the checkpoint written after every epoch holds the sparsified model's state_dict (the
schedule step and tau live in buffers), the optimizer, the lr scheduler, every RNG state and the epoch,
and the data order and augmentation of an epoch are a pure function of (seed, epoch).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .api import sparsify, step_
from .atomic import atomic_write
from .fold import fix_mask_, fold
from .layers import prunable_weights
from .pool import get_threshold, is_sparsified, layer_densities, realized_sparsity
from .schedule import Cubic, paper_schedule

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 1
DENSE = "dense"


class SetupError(RuntimeError):
    """The run cannot start as asked (a missing optional package, an absent device); the message says what to do."""


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on. The defaults are the Fashion-MNIST CPU preset (about 10 min on 2 cores)."""

    # what to train
    model: str = "cnn"  # "cnn", "resnet20" (CIFAR-style, --width), or any timm model name
    width: float = 1.0
    method: str = "st3sigma"  # st3, st3sigma, feather, gmp, ste, or "dense"
    sparsity: float = 0.9
    # data
    dataset: str = "fashion-mnist"  # fashion-mnist, cifar10, cifar100, imagefolder, synthetic
    data_dir: Optional[str] = None
    download: bool = True
    val_size: int = 5000
    split_seed: int = 0
    augment: bool = True
    image_size: int = 224  # imagefolder only
    num_workers: int = 4  # imagefolder only
    limit_train: Optional[int] = None  # first N training examples only (smoke runs)
    limit_eval: Optional[int] = None  # first N val/test examples only (smoke runs)
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
    ramp_begin: Optional[float] = None  # epoch where the cubic ramp starts; None: as in the method's paper
    ramp_end: Optional[float] = None  # epoch where it reaches the final sparsity; None: as in the paper
    # run
    seed: int = 0
    device: str = "auto"  # auto (cuda when present), cpu, cuda, cuda:1, mps
    threads: Optional[int] = None  # torch CPU threads; None: the free CPUs this process may use
    sname: Optional[str] = None  # run name; outputs go to <runs_dir>/<sname>
    runs_dir: str = "runs"
    resume: bool = False
    overwrite: bool = False
    tensorboard: bool = False
    log_every: int = 50  # steps between TensorBoard points
    progress: Optional[bool] = None  # progress bars; None: when stderr is a terminal
    export: bool = True  # write the CSR checkpoint and the FLOP report at the end

    def __post_init__(self) -> None:
        self.milestones = tuple(float(m) for m in self.milestones)
        self.method = self.method.lower()
        if self.method == DENSE:
            self.sparsity = 0.0

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.finetune_epochs

    @property
    def run_name(self) -> str:
        if self.sname:
            return self.sname
        tail = DENSE if self.method == DENSE else f"{self.method}-{round(self.sparsity * 100, 2):g}"
        return f"{self.dataset}-{self.model}{'' if self.width == 1 else f'-w{self.width:g}'}-{tail}"

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.run_name

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["milestones"] = list(self.milestones)
        return out


# Settings that do not change the numbers a run produces; a resumed run may change them.
NON_RESULT_KEYS = frozenset({
    "data_dir", "download", "num_workers", "device", "threads", "sname", "runs_dir", "resume", "overwrite",
    "tensorboard", "log_every", "progress", "export", "eval_batch_size",
})


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


# ---------------------------------------------------------------------------------------------------
# Pieces of the recipe
# ---------------------------------------------------------------------------------------------------
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


def set_threads(threads: Optional[int] = None) -> int:
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


def build_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
                    nesterov: bool = False) -> torch.optim.SGD:
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


def build_lr_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_epochs: int, steps_per_epoch: int,
                       milestones: Sequence[float] = (), gamma: float = 0.1, warmup_epochs: float = 0.0):
    """A per-batch LambdaLR: milestones and warm-up are given in epochs and applied at the matching step."""
    fn = LrLambda(kind, total_epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch),
                  tuple(round(m * steps_per_epoch) for m in milestones), gamma)
    fn(0)  # fail early on an unknown kind
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def sparsity_schedule(config: TrainConfig, steps_per_epoch: int) -> Cubic:
    """The cubic ramp over the main phase: the method's paper placement unless ramp_begin/ramp_end are set."""
    main_steps = config.epochs * steps_per_epoch
    schedule = paper_schedule(config.method, main_steps, steps_per_epoch)
    begin = schedule.begin if config.ramp_begin is None else round(config.ramp_begin * steps_per_epoch)
    end = schedule.end if config.ramp_end is None else round(config.ramp_end * steps_per_epoch)
    if not 0 <= begin < end <= main_steps:
        raise ValueError(f"the sparsity ramp must satisfy 0 <= ramp_begin < ramp_end <= epochs ({config.epochs}); "
                         f"got ramp_begin={config.ramp_begin}, ramp_end={config.ramp_end}")
    return Cubic(begin=begin, end=end)


# ---------------------------------------------------------------------------------------------------
# RNG state and checkpoints
# ---------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state = np.random.get_state()
    out = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]) + [random.getstate()[0]],
        "numpy": {"keys": torch.from_numpy(state[1].astype(np.int64)), "pos": int(state[2]),
                  "has_gauss": int(state[3]), "cached_gaussian": float(state[4])},
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    python = state["python"]
    random.setstate((python[-1], tuple(python[:-1]), None))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save through fxsparse.atomic.atomic_write: never half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise RuntimeError(f"cannot read the checkpoint {path}: {error}; it is corrupt or not an fxsparse checkpoint "
                           "(start again without --resume, with --overwrite)") from error


def _saved_threads(path: Path) -> Optional[int]:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True).get("threads"))
    except Exception:  # an unreadable checkpoint is reported properly when it is loaded
        return None


def check_resumable(saved: dict[str, Any], config: TrainConfig) -> None:
    """Refuse to resume with settings that would change the result; say which differ."""
    current = config.to_dict()
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {current[k]!r}" for k in current
             if k not in NON_RESULT_KEYS and _normal(saved.get(k)) != _normal(current[k])]
    if diffs:
        raise ValueError("--resume needs the settings of the interrupted run; these differ:\n  " + "\n  ".join(diffs)
                         + "\nrun the original command again with --resume (or start a new run with --sname NEW)")


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


# ---------------------------------------------------------------------------------------------------
# One epoch, evaluation
# ---------------------------------------------------------------------------------------------------
def _progress_enabled(flag: Optional[bool]) -> bool:
    return sys.stderr.isatty() if flag is None else bool(flag)


def current_target_sparsity(model: nn.Module) -> float:
    return get_threshold(model).target_sparsity() if is_sparsified(model) else 0.0


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, scheduler, *, clip: float = 3.0,
                    label_smoothing: float = 0.0, progress: bool = False, desc: str = "train",
                    on_step=None) -> dict[str, float]:
    """One pass over ``loader``: forward, loss, backward, clip, optimizer step, lr step, schedule step."""
    from tqdm import tqdm

    model.train()
    sparse = is_sparsified(model)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    device = next(iter(params)).device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True, unit="batch")
    for i, (x, y) in enumerate(bar):
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip and clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        scheduler.step()
        if sparse:
            step_(model)
        with torch.no_grad():
            loss_sum += loss.detach().double() * y.shape[0]
            correct += (logits.argmax(1) == y).sum()
        seen += y.shape[0]
        if on_step is not None:
            on_step(loss, logits, y)
        if progress and (i % 10 == 0 or i == len(loader) - 1):
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{100 * correct.item() / seen:.2f}",
                            sparsity=f"{current_target_sparsity(model):.3f}", refresh=False)
    bar.close()
    return {"loss": loss_sum.item() / max(seen, 1), "acc": 100.0 * correct.item() / max(seen, 1)}


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, progress: bool = False, desc: str = "eval") -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy (%) of ``model`` in eval mode over ``loader``."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True, unit="batch"):
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(1) == y).sum())
        seen += y.shape[0]
    model.train(was_training)
    return {"loss": loss_sum / max(seen, 1), "acc": 100.0 * correct / max(seen, 1)}


# ---------------------------------------------------------------------------------------------------
# TensorBoard
# ---------------------------------------------------------------------------------------------------
def open_tensorboard(log_dir: Path):
    """A SummaryWriter under ``log_dir``, or a clear error when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except (ImportError, ModuleNotFoundError) as error:
        raise SetupError(
            "--tensorboard needs the tensorboard package, which is not installed: "
            "pip install tensorboard  (or pip install 'fxsparse[tensorboard]'), or run without --tensorboard"
        ) from error
    return SummaryWriter(log_dir=str(log_dir))


class TensorBoardLogger:
    """Scalars every ``every`` steps (loss, accuracy, lr, target sparsity, tau) and per epoch (val, realised, per-layer)."""

    def __init__(self, writer, model: nn.Module, optimizer, every: int, steps_per_epoch: int):
        self.writer, self.model, self.optimizer, self.every = writer, model, optimizer, max(1, every)
        self.step = 0
        self.steps_per_epoch = steps_per_epoch
        self.loss_sum = 0.0
        self.correct = 0
        self.count = 0

    def start_epoch(self, epoch: int) -> None:
        self.step = epoch * self.steps_per_epoch

    def on_step(self, loss: Tensor, logits: Tensor, y: Tensor) -> None:
        self.step += 1
        if self.step % self.every:
            return
        w, sparse = self.writer, is_sparsified(self.model)
        w.add_scalar("train/loss", loss.item(), self.step)
        w.add_scalar("train/acc", 100.0 * (logits.argmax(1) == y).float().mean().item(), self.step)
        w.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], self.step)
        if sparse:
            threshold = get_threshold(self.model)
            w.add_scalar("sparsity/target", threshold.target_sparsity(), self.step)
            w.add_scalar("sparsity/tau", float(threshold.tau), self.step)

    def on_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        w, step = self.writer, (epoch + 1) * self.steps_per_epoch
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "target_sparsity", "realized_sparsity", "tau"):
            if record.get(key) is not None:
                group = key.split("_", 1)
                w.add_scalar(f"epoch/{key}" if group[0] not in ("train", "val") else f"{group[0]}/epoch_{group[1]}", record[key], step)
        if is_sparsified(self.model):
            for fqn, (nonzero, numel) in layer_densities(self.model).items():
                w.add_scalar(f"density/{fqn}", nonzero / numel, step)
        w.flush()


# ---------------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------------
def _log(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _prepare_run_dir(config: TrainConfig) -> Path:
    run_dir = config.run_dir
    checkpoint = run_dir / CHECKPOINT_NAME
    if config.resume:
        if not checkpoint.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint}; start the run without --resume "
                                    "(or give the same --sname / --runs-dir as the interrupted run)")
    elif checkpoint.exists() or (run_dir / "summary.json").exists():
        if not config.overwrite:
            raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to start "
                                  "it again, or --sname NEW for a new run")
        for name in (CHECKPOINT_NAME, "summary.json"):
            if (run_dir / name).exists():
                (run_dir / name).unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def run(config: TrainConfig, *, stop_after: Optional[int] = None, data=None) -> dict[str, Any]:
    """Train, evaluate, fold, export; return the summary (also written to <run_dir>/summary.json).

    ``stop_after``: stop after this many epochs in total, as if interrupted (for tests of --resume).
    ``data``: an already loaded fxsparse.data.Data (the benchmark loads it once for every run).
    """
    from . import data as data_module
    from .models import build_model

    device = resolve_device(config.device)
    threads = config.threads
    if threads is None and config.resume and (config.run_dir / CHECKPOINT_NAME).is_file():
        # CPU results can depend on the thread count in the last bits: resume with the interrupted run's
        threads = _saved_threads(config.run_dir / CHECKPOINT_NAME)
    threads = set_threads(threads)
    progress = _progress_enabled(config.progress)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    run_dir = _prepare_run_dir(config)
    writer = open_tensorboard(run_dir) if config.tensorboard else None

    if data is None:
        data = data_module.load_data(config.dataset, config.data_dir, val_size=config.val_size,
                                     split_seed=config.split_seed, download=config.download,
                                     image_size=config.image_size, augment=config.augment)
    loaders = {
        split: data_module.make_loader(data, split, config.batch_size if split == "train" else config.eval_batch_size,
                                       seed=config.seed, device=device, num_workers=config.num_workers,
                                       limit=config.limit_train if split == "train" else config.limit_eval)
        for split in ("train", "val", "test")
    }
    steps_per_epoch = len(loaders["train"])
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {config.batch_size} is larger than the training set ({len(data.train)} examples)")

    seed_everything(config.seed)
    dense_model = build_model(config.model, data.num_classes, data.in_channels, config.width, image_size=data.image_size)
    if config.method == DENSE:
        model = dense_model
    else:
        model = sparsify(dense_model, config.method, config.sparsity, sparsity_schedule(config, steps_per_epoch))
    model.to(device)
    optimizer = build_optimizer(model, config.lr, config.momentum, config.weight_decay, config.nesterov)
    scheduler = build_lr_scheduler(optimizer, config.lr_schedule, config.total_epochs, steps_per_epoch,
                                   config.milestones, config.gamma, config.warmup_epochs)

    start_epoch, history, train_time = 0, [], 0.0
    checkpoint_path = run_dir / CHECKPOINT_NAME
    if config.resume:
        state = load_checkpoint(checkpoint_path, device)
        check_resumable(state["config"], config)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["lr_scheduler"])
        set_rng_state(state["rng"])
        start_epoch, history, train_time = int(state["epoch"]), list(state["history"]), float(state["train_time"])
        _log(f"resumed {checkpoint_path} after epoch {start_epoch}/{config.total_epochs}")

    sparse = is_sparsified(model)
    n_weights = sum(p.numel() for p in decayed_parameters(model))
    sizes = [min(len(getattr(data, split)), limit or len(getattr(data, split)))
             for split, limit in (("train", config.limit_train), ("val", config.limit_eval), ("test", config.limit_eval))]
    _log(f"fxsparse train: {config.model} on {data.name} ({sizes[0]} train / {sizes[1]} val / {sizes[2]} test), method {config.method}"
         + (f" to {config.sparsity:.0%} sparsity" if sparse else "")
         + f", {config.total_epochs} epochs x {steps_per_epoch} steps, {n_weights:,} conv/linear weights, "
         f"device {device}" + (f" ({threads} thread{'' if threads == 1 else 's'})" if device.type == "cpu" else "") + f" -> {run_dir}")
    if sparse:
        ramp = get_threshold(model).schedule
        _log(f"sparsity ramp: cubic from step {ramp.begin} (epoch {ramp.begin / steps_per_epoch:g}) to step {ramp.end} "
             f"(epoch {ramp.end / steps_per_epoch:g})" + (f", then {config.finetune_epochs} fixed-mask epochs" if config.finetune_epochs else ""))

    tb = TensorBoardLogger(writer, model, optimizer, config.log_every, steps_per_epoch) if writer else None
    end_epoch = config.total_epochs if stop_after is None else min(stop_after, config.total_epochs)
    for epoch in range(start_epoch, end_epoch):
        if sparse and epoch == config.epochs and config.finetune_epochs and not bool(get_threshold(model).frozen):
            fix_mask_(model)
            _log(f"main phase done: mask fixed at {realized_sparsity(model):.4f} sparsity, fine-tuning {config.finetune_epochs} epochs")
        tick = time.perf_counter()
        loaders["train"].set_epoch(epoch)
        if tb:
            tb.start_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        train_stats = train_one_epoch(model, loaders["train"], optimizer, scheduler, clip=config.clip_grad_norm,
                                      label_smoothing=config.label_smoothing, progress=progress,
                                      desc=f"epoch {epoch + 1}/{config.total_epochs}", on_step=tb.on_step if tb else None)
        val_stats = evaluate(model, loaders["val"], progress=progress, desc="val")
        seconds = time.perf_counter() - tick
        train_time += seconds
        record = {
            "epoch": epoch + 1, "train_loss": train_stats["loss"], "train_acc": train_stats["acc"],
            "val_loss": val_stats["loss"], "val_acc": val_stats["acc"], "lr": lr,
            "target_sparsity": current_target_sparsity(model),
            "realized_sparsity": realized_sparsity(model) if sparse else 0.0,
            "tau": float(get_threshold(model).tau) if sparse else None, "seconds": seconds,
        }
        history.append(record)
        _log(f"epoch {epoch + 1:>3}/{config.total_epochs}  train loss {record['train_loss']:.4f} acc {record['train_acc']:.2f}  "
             f"val loss {record['val_loss']:.4f} acc {record['val_acc']:.2f}  sparsity {record['realized_sparsity']:.4f}  "
             f"lr {lr:.4g}  {seconds:.0f}s")
        if tb:
            tb.on_epoch(epoch, record)
        save_checkpoint(checkpoint_path, {
            "version": CHECKPOINT_VERSION, "epoch": epoch + 1, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(), "rng": rng_state(),
            "config": config.to_dict(), "history": history, "train_time": train_time, "threads": threads,
        })
    if writer:
        writer.close()
    if end_epoch < config.total_epochs:
        _log(f"stopped after epoch {end_epoch}; continue with --resume")
        return {"stopped_after": end_epoch, "model": model, "history": history}
    return finish(config, model, loaders, data, history, train_time, run_dir, progress)


def finish(config: TrainConfig, model: nn.Module, loaders: dict, data, history: list, train_time: float,
           run_dir: Path, progress: bool) -> dict[str, Any]:
    """Fold, evaluate on the test set, write the CSR checkpoint and FLOP report, print and save the summary."""
    from tabulate import tabulate

    sparse = is_sparsified(model)
    realized = realized_sparsity(model) if sparse else 0.0
    folded = fold(model) if sparse else model
    folded.eval()
    test = evaluate(folded, loaders["test"], progress=progress, desc="test")
    dense_bytes = sum(p.numel() * p.element_size() for p in folded.parameters()) + sum(
        b.numel() * b.element_size() for b in folded.buffers())
    summary: dict[str, Any] = {
        "run": config.run_name, "run_dir": str(run_dir), "model": config.model, "dataset": data.name, "method": config.method,
        "sparsity": config.sparsity, "realized_sparsity": realized, "test_acc": test["acc"], "test_loss": test["loss"],
        "val_acc": history[-1]["val_acc"] if history else None, "epochs": config.total_epochs,
        "train_time_s": train_time, "threads": torch.get_num_threads(), "dense_state_bytes": dense_bytes, "config": config.to_dict(), "history": history,
    }
    example = torch.zeros(1, data.in_channels, data.image_size, data.image_size, device=next(folded.parameters()).device)
    if config.export:
        summary.update(_export(folded, example, run_dir))
    atomic_write(run_dir / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    rows = [
        ["test accuracy", f"{test['acc']:.2f} %"],
        ["val accuracy (last epoch)", f"{summary['val_acc']:.2f} %" if summary["val_acc"] is not None else "-"],
        ["realised sparsity", f"{realized:.4f}" + (f" (asked {config.sparsity})" if sparse else "")],
    ]
    if "dense_macs" in summary:
        rows += [["dense MACs / image", f"{summary['dense_macs']:,}"],
                 ["sparse MACs / image", f"{summary['sparse_macs']:,} ({100 * summary['sparse_macs'] / summary['dense_macs']:.1f} % of dense)"]]
    if "csr_bytes" in summary:
        rows.append(["CSR checkpoint", f"{summary['csr_path']}  {_human_bytes(summary['csr_bytes'])} "
                                       f"(dense fp32 state {_human_bytes(dense_bytes)})"])
    rows += [["train time", f"{train_time / 60:.1f} min"], ["outputs", str(run_dir)]]
    _log("\n" + tabulate(rows, tablefmt="simple_outline"))
    summary["folded_model"] = folded
    return summary


def _export(folded: nn.Module, example: Tensor, run_dir: Path) -> dict[str, Any]:
    """The CSR checkpoint (fxsparse.export) and the FLOP report (fxsparse.flops), written next to the run."""
    out: dict[str, Any] = {}
    try:
        from .flops import flops
    except ImportError as error:
        _log(f"FLOP report skipped: fxsparse.flops is not available ({error})")
    else:
        report = flops(folded, example)
        (run_dir / "flops.json").write_text(report.to_json())
        (run_dir / "flops.txt").write_text(report.table() + "\n")
        totals = report.totals() if callable(report.totals) else report.totals
        out.update({"dense_macs": int(totals["dense_macs"]), "sparse_macs": int(totals["sparse_macs"]),
                    "flops_path": str(run_dir / "flops.json")})
    try:
        from .export import save_csr
    except ImportError as error:
        _log(f"CSR checkpoint skipped: fxsparse.export is not available ({error})")
    else:
        path = run_dir / "model.csr.safetensors"
        save_csr(folded, path)
        out.update({"csr_path": str(path), "csr_bytes": path.stat().st_size})
    return out
