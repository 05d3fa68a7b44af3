"""`fxsparse train`: one run, in the few steps of run().

Resume is exact: the checkpoint written after every epoch (fxsparse.train.checkpoint) restores the model
(the schedule step and tau are buffers), the optimizer, the lr scheduler, every RNG state and the epoch,
and the data order and augmentation of an epoch are a pure function of (seed, epoch).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import torch
from torch import nn

from ..api import sparsify
from ..fold import fix_mask_
from ..models import build_model
from ..pool import get_threshold, is_sparsified, realized_sparsity
from .checkpoint import (
    CHECKPOINT_NAME,
    CHECKPOINT_VERSION,
    check_resumable,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import DENSE, TrainConfig
from .data import Data, load_data_of, make_loader
from .errors import CheckpointError, ConfigError, first_line
from .loop import current_target_sparsity, evaluate, log, train_one_epoch
from .recipe import (
    build_lr_scheduler,
    build_optimizer,
    decayed_parameters,
    resolve_device,
    seed_everything,
    set_threads,
    sparsity_schedule,
)
from .summary import SUMMARY_NAME, finish
from .tensorboard import TensorBoardLogger, require_tensorboard


@dataclasses.dataclass
class Training:
    """A run: its settings, what it trains with, and how far it has got."""

    config: TrainConfig
    device: torch.device
    threads: int
    data: Data
    loaders: dict[str, Any]  # "train", "val", "test"
    model: nn.Module  # sparsified (or dense for method "dense")
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    progress: bool
    epoch: int = 0  # epochs finished
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    train_time: float = 0.0

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loaders["train"])


def run(config: TrainConfig, *, stop_after: int | None = None, data: Data | None = None) -> dict[str, Any]:
    """Train, evaluate, fold, export; return the summary (also written to <run_dir>/summary.json).

    ``stop_after``: stop after this many epochs in total, as if interrupted (for tests of --resume).
    ``data``: an already loaded fxsparse.train.data.Data (the benchmark loads it once for every run).
    """
    saved = check_run_dir(config)  # the interrupted run's checkpoint with --resume; nothing written yet
    training = build_training(config, data, saved)
    if saved is not None:
        restore(training, saved)
    open_run_dir(config)
    announce(training)
    end_epoch = config.total_epochs if stop_after is None else min(stop_after, config.total_epochs)
    train_epochs(training, end_epoch)
    if end_epoch < config.total_epochs:
        log(f"stopped after epoch {end_epoch}; continue with --resume")
        return {"stopped_after": end_epoch, "model": training.model, "history": training.history}
    return finish(training)


# ---------------------------------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------------------------------
def check_run_dir(config: TrainConfig) -> dict[str, Any] | None:
    """Refuse to start over a finished or interrupted run (unless --overwrite); with --resume, read its checkpoint."""
    if config.tensorboard:
        require_tensorboard()
    checkpoint = config.run_dir / CHECKPOINT_NAME
    if config.resume:
        if not checkpoint.is_file():
            raise FileNotFoundError(
                f"--resume: no checkpoint at {checkpoint}; start the run without --resume "
                "(or give the same --sname / --runs-dir as the interrupted run)"
            )
        try:
            saved = read_checkpoint(checkpoint)
        except CheckpointError as error:
            raise CheckpointError(f"--resume: {error}; to start the run again instead, use --overwrite") from error
        check_resumable(saved["config"], config)
        return saved
    if (checkpoint.exists() or (config.run_dir / SUMMARY_NAME).exists()) and not config.overwrite:
        raise FileExistsError(
            f"{config.run_dir} already holds a run; pass --resume to continue it, --overwrite to start "
            "it again, or --sname NEW for a new run"
        )
    return None


def build_training(config: TrainConfig, data: Data | None, saved: dict[str, Any] | None) -> Training:
    """Device, threads, data, model, optimizer and lr scheduler, as the config says."""
    device = resolve_device(config.device)
    threads = config.threads
    if threads is None and saved is not None and isinstance(saved.get("threads"), int):
        threads = saved["threads"]  # CPU results can depend on the thread count in the last bits
    threads = set_threads(threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    if data is None:
        data = load_data_of(config)
    loaders = {
        split: make_loader(
            data,
            split,
            config.batch_size if split == "train" else config.eval_batch_size,
            seed=config.seed,
            device=device,
            num_workers=config.num_workers,
            limit=config.limit_train if split == "train" else config.limit_eval,
        )
        for split in ("train", "val", "test")
    }
    steps_per_epoch = len(loaders["train"])
    if steps_per_epoch == 0:
        raise ConfigError(
            f"--batch-size {config.batch_size} is larger than the training set "
            f"({examples(data, 'train', config.limit_train)} examples)"
        )
    seed_everything(config.seed)
    # the settings are the user's (command line, their config file; --resume refuses other ones)
    model = build_model(config.model, data.num_classes, data.in_channels, config.width, allow_import=True)
    if config.method != DENSE:
        model = sparsify(
            model,
            config.method,
            config.sparsity,
            sparsity_schedule(config, steps_per_epoch),
            **config.distribution_options(),
        )
    model.to(device)
    optimizer = build_optimizer(model, config.lr, config.momentum, config.weight_decay, config.nesterov)
    scheduler = build_lr_scheduler(
        optimizer,
        config.lr_schedule,
        config.total_epochs,
        steps_per_epoch,
        config.milestones,
        config.gamma,
        config.warmup_epochs,
    )
    progress = sys.stderr.isatty() if config.progress is None else bool(config.progress)
    return Training(config, device, threads, data, loaders, model, optimizer, scheduler, progress)


def restore(training: Training, saved: dict[str, Any]) -> None:
    """Continue from an interrupted run's checkpoint: model, optimizer, lr schedule, RNG, epoch and history."""
    path = training.config.run_dir / CHECKPOINT_NAME
    try:
        training.model.load_state_dict(saved["model"])
        training.optimizer.load_state_dict(saved["optimizer"])
        training.scheduler.load_state_dict(saved["lr_scheduler"])
        set_rng_state(saved["rng"])
    except (RuntimeError, KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(
            f"--resume: cannot restore the run from {path}: {first_line(error)}; to start the run "
            "again instead, use --overwrite"
        ) from error
    training.epoch, training.history, training.train_time = (
        saved["epoch"],
        list(saved["history"]),
        float(saved["train_time"]),
    )
    log(f"resumed {path} after epoch {training.epoch}/{training.config.total_epochs}")


def examples(data: Data, split: str, limit: int | None) -> int:
    """How many examples of ``split`` the run uses (--limit-train / --limit-eval)."""
    size = len(getattr(data, split))
    return size if limit is None else min(size, limit)


def open_run_dir(config: TrainConfig) -> None:
    """Create the run directory once every check has passed (--overwrite: remove the old checkpoint and summary)."""
    if config.overwrite and not config.resume:
        for name in (CHECKPOINT_NAME, SUMMARY_NAME):
            (config.run_dir / name).unlink(missing_ok=True)
    config.run_dir.mkdir(parents=True, exist_ok=True)


def announce(training: Training) -> None:
    config, model, device, threads = training.config, training.model, training.device, training.threads
    sparse, steps = is_sparsified(model), training.steps_per_epoch
    sizes = [
        examples(training.data, split, limit)
        for split, limit in (("train", config.limit_train), ("val", config.limit_eval), ("test", config.limit_eval))
    ]
    log(
        f"fxsparse train: {config.model} on {training.data.name} "
        f"({sizes[0]} train / {sizes[1]} val / {sizes[2]} test), "
        f"method {config.method}"
        + (f" to {config.sparsity:.0%} sparsity" if sparse else "")
        + f", {config.total_epochs} epochs x {steps} steps, {sum(p.numel() for p in decayed_parameters(model)):,} "
        f"conv/linear weights, device {device}"
        + (f" ({threads} thread{'' if threads == 1 else 's'})" if device.type == "cpu" else "")
        + f" -> {config.run_dir}"
    )
    if sparse:
        ramp = get_threshold(model).schedule
        log(
            f"sparsity ramp: cubic from step {ramp.begin} (epoch {ramp.begin / steps:g}) to step {ramp.end} "
            f"(epoch {ramp.end / steps:g})"
            + (f", then {config.finetune_epochs} fixed-mask epochs" if config.finetune_epochs else "")
        )


def train_epochs(training: Training, end_epoch: int) -> None:
    """Epochs from where the run is up to ``end_epoch``, a checkpoint after each."""
    config = training.config
    board = (
        TensorBoardLogger(
            config.run_dir, training.model, training.optimizer, config.log_every, training.steps_per_epoch
        )
        if config.tensorboard
        else None
    )
    try:
        for epoch in range(training.epoch, end_epoch):
            if (
                epoch == config.epochs
                and config.finetune_epochs
                and is_sparsified(training.model)
                and not bool(get_threshold(training.model).frozen)
            ):
                fix_mask_(training.model)
                log(
                    f"main phase done: mask fixed at {realized_sparsity(training.model):.4f} sparsity, "
                    f"fine-tuning {config.finetune_epochs} epochs"
                )
            record = train_epoch(training, epoch, board)
            log(
                f"epoch {epoch + 1:>3}/{config.total_epochs}  train loss {record['train_loss']:.4f} "
                f"acc {record['train_acc']:.2f}  val loss {record['val_loss']:.4f} acc {record['val_acc']:.2f}  "
                f"sparsity {record['realized_sparsity']:.4f}  lr {record['lr']:.4g}  {record['seconds']:.0f}s"
            )
            save_checkpoint(config.run_dir / CHECKPOINT_NAME, checkpoint_state(training))
    finally:
        if board:
            board.close()


def train_epoch(training: Training, epoch: int, board: TensorBoardLogger | None) -> dict[str, Any]:
    """Train one epoch and validate; the epoch's record is appended to the history and returned."""
    config, model = training.config, training.model
    tick = time.perf_counter()
    training.loaders["train"].set_epoch(epoch)
    if board:
        board.start_epoch(epoch)
    lr = training.optimizer.param_groups[0]["lr"]
    train = train_one_epoch(
        model,
        training.loaders["train"],
        training.optimizer,
        training.scheduler,
        clip=config.clip_grad_norm,
        label_smoothing=config.label_smoothing,
        progress=training.progress,
        desc=f"epoch {epoch + 1}/{config.total_epochs}",
        on_step=board.on_step if board else None,
    )
    val = evaluate(model, training.loaders["val"], progress=training.progress, desc="val")
    seconds = time.perf_counter() - tick
    sparse = is_sparsified(model)
    record = {
        "epoch": epoch + 1,
        "train_loss": train["loss"],
        "train_acc": train["acc"],
        "val_loss": val["loss"],
        "val_acc": val["acc"],
        "lr": lr,
        "target_sparsity": current_target_sparsity(model),
        "realized_sparsity": realized_sparsity(model) if sparse else 0.0,
        "tau": float(get_threshold(model).tau) if sparse else None,
        "seconds": seconds,
    }
    training.history.append(record)
    training.epoch = epoch + 1
    training.train_time += seconds
    if board:
        board.on_epoch(epoch, record)
    return record


def checkpoint_state(training: Training) -> dict[str, Any]:
    """What --resume needs, and what `fxsparse export` needs to rebuild the run's model."""
    return {
        "version": CHECKPOINT_VERSION,
        "epoch": training.epoch,
        "model": training.model.state_dict(),
        "optimizer": training.optimizer.state_dict(),
        "lr_scheduler": training.scheduler.state_dict(),
        "rng": rng_state(),
        "config": training.config.to_dict(),
        "history": training.history,
        "train_time": training.train_time,
        "threads": training.threads,
        "data": training.data.shape,
    }
