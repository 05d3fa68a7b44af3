"""One training epoch and one evaluation pass: the loop `fxsparse train` runs, in plain functions."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..api import step_
from ..pool import get_threshold, is_sparsified


def log(message: str) -> None:
    """A line on stdout that does not break the progress bars."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


def current_target_sparsity(model: nn.Module) -> float:
    return get_threshold(model).target_sparsity() if is_sparsified(model) else 0.0


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    *,
    clip: float = 3.0,
    label_smoothing: float = 0.0,
    progress: bool = False,
    desc: str = "train",
    on_step: Callable[[Tensor, Tensor, Tensor], None] | None = None,
) -> dict[str, float]:
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
            bar.set_postfix(
                loss=f"{loss_sum.item() / seen:.4f}",
                acc=f"{100 * correct.item() / seen:.2f}",
                sparsity=f"{current_target_sparsity(model):.3f}",
                refresh=False,
            )
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
