"""Checks that the training loop drives the sparsified model it holds, not a copy of it.

sparsify() returns a copy: an optimizer built on the original model before it keeps training the
original, while the sparsified copy never changes. ``hook_optimizer`` can see the optimizer and refuses
one that holds none of the model's parameters; ``step_`` cannot, so during its first calls it watches
the pooled weights: unchanged across several steps although they have finite, non-zero gradients means
that no optimizer is updating them. Values are compared (a few entries per weight), not autograd
version counters, so fused optimizers (which do not bump them) cause no false alarm.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from .distributed import any_sharded
from .pool import pooled_weights

BUILT_BEFORE_SPARSIFY = (
    "fxsparse.sparsify() returns a copy of the model; build the optimizer from the sparsified model "
    "(optimizer = torch.optim.SGD(sparse_model.parameters(), ...)), or sparsify in place with "
    "fxsparse.sparsify_(model, ...), which keeps the model's parameter objects"
)


def check_optimizer_trains(model: nn.Module, optimizer: Optimizer) -> None:
    """Raise if ``optimizer`` holds none of ``model``'s parameters (typically built before sparsify())."""
    own = {id(p) for p in model.parameters()}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    if held and not any(id(p) in own for p in held):
        raise ValueError(
            f"the optimizer holds none of this model's parameters, so it would train another model. "
            f"{BUILT_BEFORE_SPARSIFY}"
        )


class _HookRegistry:
    """The step hooks hook_optimizer put on one optimizer, by threshold (weakly: copies get their own)."""

    def __init__(self):
        self._hooks: dict[int, tuple[weakref.ref, RemovableHandle]] = {}

    def get(self, threshold: nn.Module) -> RemovableHandle | None:
        found = self._hooks.get(id(threshold))
        if found is None or found[0]() is not threshold:
            return None
        handle = found[1]
        hooks = handle.hooks_dict_ref()
        return handle if hooks is not None and handle.id in hooks else None  # None once removed

    def add(self, threshold: nn.Module, handle: RemovableHandle) -> None:
        self._hooks[id(threshold)] = (weakref.ref(threshold), handle)


def hook_registry(optimizer: Optimizer) -> _HookRegistry:
    registry = vars(optimizer).get("_fxsparse_hooks")
    if registry is None:
        registry = vars(optimizer)["_fxsparse_hooks"] = _HookRegistry()
    return registry


class _StepWatch:
    WATCHED_CALLS = 6  # step_ calls checked per threshold object and process; then the check costs nothing
    ALARM_AFTER = 2  # consecutive unchanged steps (one can be legitimate: lr 0 at the first warmup step)
    PROBE = 16  # entries compared per weight

    def __init__(self):
        self.calls = 0
        self.unchanged = 0
        self.previous: list[Tensor] | None = None

    def done(self) -> bool:
        return self.calls >= self.WATCHED_CALLS

    @torch.no_grad()
    def after_step(self, weights: Sequence[Tensor]) -> None:
        self.calls += 1
        probe = [w.detach().reshape(-1)[:: max(1, w.numel() // self.PROBE)].clone() for w in weights]
        grads = [w.grad for w in weights if w.grad is not None]
        if self.previous is not None and grads and all(torch.equal(a, b) for a, b in zip(probe, self.previous)):
            size = sum(float(g.detach().float().abs().sum()) for g in grads)
            self.unchanged = self.unchanged + 1 if 0.0 < size < float("inf") else 0
        else:
            self.unchanged = 0
        self.previous = None if self.done() else probe
        if self.unchanged >= self.ALARM_AFTER:
            self.calls = self.WATCHED_CALLS
            self.previous = None
            warnings.warn(
                f"fxsparse.step_: the sparsified model's pooled weights have not changed over the last "
                f"{self.unchanged} steps although they have gradients: no optimizer is updating them. If the "
                f"optimizer was built before sparsify(), it trains the original model: {BUILT_BEFORE_SPARSIFY}. "
                "(Weights frozen on purpose: set requires_grad=False. Gradient accumulation: call step_ once per "
                "optimizer step.)",
                stacklevel=3,
            )


_watches: weakref.WeakKeyDictionary[nn.Module, _StepWatch] = weakref.WeakKeyDictionary()


def watch_step(threshold: nn.Module, model: nn.Module) -> None:
    """Called by step_ after advancing ``model``'s ``threshold``: the check above, on its first few calls only."""
    watch = _watches.get(threshold)
    if watch is None:
        watch = _watches[threshold] = _StepWatch()
    if watch.done():
        return
    weights = pooled_weights(model)
    if not any_sharded(weights):  # DTensor shards: not compared (FSDP2 code builds its optimizer after sharding)
        watch.after_step(weights)
