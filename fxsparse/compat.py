"""Drop-in replacements for other sparse-training libraries' entry points, on top of fxsparse.sparsify_.

``Pruner`` follows the Feather library's documented usage (github.com/athglentis/feather, README
"Library Usage"); the only change to a training script is the import line (docs/MIGRATION.md):

    pruner = Pruner(model, device=..., final_rate=..., nbatches=..., epochs=...)
    for epoch in range(epochs):
        for data, target in train_loader:
            pruner.update_thresh()               # before each batch: advance the schedule, recompute T
            output = model(data)
            ...
            optimizer.step()
        pruner.update_thresh(end_of_batch=True)  # after each epoch: T from the final weights, for evaluation
    pruner.desparsify()                          # weights <- what evaluation computed, plain modules again

It is not a second implementation: the model is sparsified in place by `fxsparse.sparsify_` with the
`Feather` method (theta from the final rate), the global threshold node and the cubic schedule that
`fxsparse.sparsify` uses; the Pruner only maps the arguments and counts the batches.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .api import sparsify_
from .fold import fold_
from .global_threshold import GlobalThreshold
from .methods import Feather
from .pool import get_threshold, is_sparsified, layer_densities, pooled_weights
from .schedule import Cubic

__all__ = ["Pruner"]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Pruner: {name} must be a positive integer, got {value!r}")
    return value


class Pruner:
    """Feather-Global's Pruner, on fxsparse: sparsifies ``model`` in place and drives its schedule.

    model: the module the training loop keeps calling (it is modified in place; its Parameter objects
        are kept, so an optimizer built before or after the Pruner both work).
    device: accepted for compatibility and unused: the threshold lives beside the weights.
    final_rate: the final sparsity (fraction of pruned weights over the pooled Conv/Linear weights).
    nbatches, epochs: batches per epoch and epochs; one update_thresh() per batch is one schedule step.
    pthres: layers with fewer than ``pthres`` weights stay dense (fxsparse's ``min_numel``).
    t1: the epoch at which the cubic ramp starts; it ends at half of training, floor(0.5 * nbatches * epochs)
        batches, and holds final_rate from there on.
    theta (Feather's gradient scale on pruned weights) is 0.5 if final_rate > 0.95 else 1.0, as in the paper.
    """

    def __init__(
        self,
        model: nn.Module,
        device=None,
        final_rate: float = 0.9,
        nbatches: int = 1,
        epochs: int = 1,
        pthres: int = 0,
        t1: int = 0,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Pruner takes the torch.nn.Module being trained, got {type(model).__name__}")
        nbatches = _positive_int("nbatches", nbatches)
        epochs = _positive_int("epochs", epochs)
        if isinstance(t1, bool) or not isinstance(t1, int) or t1 < 0:
            raise ValueError(f"Pruner: t1 (the epoch the ramp starts) must be an integer >= 0, got {t1!r}")
        total = nbatches * epochs
        begin, end = t1 * nbatches, math.floor(0.5 * total)
        if end <= begin:
            raise ValueError(
                f"Pruner: the pruning ramp runs from epoch t1={t1} (batch {begin}) to half of training (batch {end} "
                f"of {total} = nbatches {nbatches} x epochs {epochs}); it must start before it ends: lower t1 or "
                "train for more epochs"
            )
        self.model = model
        self.device = device
        self.final_rate = final_rate
        self.nbatches, self.epochs, self.pthres, self.t1 = nbatches, epochs, pthres, t1
        self.ntotalsteps = total
        # The threshold's step counts update_thresh() calls, so that it is in the model's state_dict and a
        # resumed run continues exactly; the k-th call (k = 1, 2, ...) uses Feather's rate for batch k - 1,
        # hence the ramp shifted by one: Cubic(begin + 1, end + 1) at step k is Feather's cubic at k - 1.
        self.schedule = Cubic(begin=begin + 1, end=end + 1)
        sparsify_(model, Feather(), final_rate, self.schedule, min_numel=pthres)
        self.threshold: GlobalThreshold = get_threshold(model)
        self.theta = self.threshold.method.theta

    @property
    def step_idx(self) -> int:
        """update_thresh() calls so far (Feather's counter), kept in the model's state_dict."""
        return self.threshold.current_step

    def _require_sparse(self) -> None:
        if not is_sparsified(self.model):
            raise RuntimeError("Pruner: the model was already desparsified; create a new Pruner to prune again")

    @torch.no_grad()
    def _recompute(self) -> None:
        self.threshold(*pooled_weights(self.model))

    def update_thresh(self, end_of_batch: bool = False) -> None:
        """Before each batch: move to the next schedule step and recompute T from the current weights.

        ``end_of_batch=True`` (after the last optimizer step of an epoch): recompute T from the final
        weights at the same step, so that evaluation sees a fresh threshold; the schedule does not move.
        """
        self._require_sparse()
        if not end_of_batch:
            self.threshold.advance_(1)
        self._recompute()  # the forward pre-hook then finds T current and does not recompute it

    @property
    def gth(self) -> float:
        """The current global threshold T (0 before the ramp starts)."""
        return float(self.threshold.tau)

    @property
    def rate(self) -> float:
        """The scheduled sparsity at the current step."""
        return self.threshold.target_sparsity()

    def print_sparsity(self) -> float:
        """Print each pruned layer's sparsity; return the global sparsity in percent (as Feather's does)."""
        self._require_sparse()
        self._recompute()
        zeros = total = 0
        for fqn, (nonzero, numel) in layer_densities(self.model).items():
            zeros, total = zeros + numel - nonzero, total + numel
            print(
                f"{fqn}".ljust(40),
                f"#w: {numel}".ljust(11),
                f"| sparsity: {round(100.0 * (numel - nonzero) / numel, 2)}%",
            )
        return 100.0 * zeros / total if total else 0.0

    def desparsify(self) -> None:
        """Finalize: weights <- the effective weights evaluation computed (Feather's p=3 output, exact zeros),
        parametrizations, threshold and pre-hook removed; the model is a plain dense module again."""
        self._require_sparse()
        fold_(self.model)

    def __repr__(self) -> str:
        return (
            f"Pruner(final_rate={self.final_rate}, nbatches={self.nbatches}, epochs={self.epochs}, "
            f"pthres={self.pthres}, t1={self.t1}, theta={self.theta}, step_idx={self.step_idx})"
        )
