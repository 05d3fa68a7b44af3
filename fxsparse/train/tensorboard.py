"""TensorBoard logging for `fxsparse train --tensorboard` (the tensorboard package is optional)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..pool import get_threshold, is_sparsified, layer_densities
from .errors import SetupError


def require_tensorboard():
    """torch's SummaryWriter class, or a clear error when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise SetupError(
            "--tensorboard needs the tensorboard package, which is not installed: "
            "pip install tensorboard  (or pip install 'fxsparse[tensorboard]'), or run without --tensorboard"
        ) from error
    return SummaryWriter


def open_tensorboard(log_dir: Path):
    """A SummaryWriter under ``log_dir``."""
    return require_tensorboard()(log_dir=str(log_dir))


class TensorBoardLogger:
    """Scalars every ``every`` steps (loss, accuracy, lr, target sparsity, tau) and per epoch (val, realised sparsity,
    per-layer density)."""

    def __init__(self, log_dir: Path, model: nn.Module, optimizer, every: int, steps_per_epoch: int):
        self.writer = open_tensorboard(log_dir)
        self.model, self.optimizer, self.every = model, optimizer, max(1, every)
        self.step = 0
        self.steps_per_epoch = steps_per_epoch

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
        for key in (
            "train_loss",
            "train_acc",
            "val_loss",
            "val_acc",
            "lr",
            "target_sparsity",
            "realized_sparsity",
            "tau",
        ):
            if record.get(key) is not None:
                group = key.split("_", 1)
                w.add_scalar(
                    f"epoch/{key}" if group[0] not in ("train", "val") else f"{group[0]}/epoch_{group[1]}",
                    record[key],
                    step,
                )
        if is_sparsified(self.model):
            for fqn, (nonzero, numel) in layer_densities(self.model).items():
                w.add_scalar(f"density/{fqn}", nonzero / numel, step)
        w.flush()

    def close(self) -> None:
        self.writer.close()
