"""GlobalThreshold: the one graph node that owns the schedule state and the global tau.

It sits at the top of the sparsified model's forward with every pooled dense weight as input, so the
global dependency is visible in ``print(model.code)``. State lives in buffers (``step``, ``tau``,
``frozen``), so a checkpoint is ``state_dict()`` and resume is exact. tau is recomputed only when it can
have changed: a new step, or weights modified in place since the last computation (an optimizer step).
ST-3 recomputes tau after each optimizer step and Feather before each training forward; both read the
weights as they are when the next forward starts, which is when this node runs.

Fused optimizers (``fused=True``) update weights without bumping their version counters: the
step counter is what marks their updates, so call ``fxsparse.step_`` (or ``hook_optimizer``) after
every optimizer step, also with a constant schedule.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from .distributed import any_sharded, local_pool, storage_key
from .methods.base import Method
from .parametrization import SparseWeight, _Reference
from .threshold import global_quantile, layer_scaled_abs

Schedule = Callable[[int, float], float]


class GlobalThreshold(nn.Module):
    _is_impure = True  # it has no users in the graph; torch.fx's dead-code elimination must keep it

    def __init__(self, method: Method, final_sparsity: float, schedule: Schedule, pool_size: int):
        super().__init__()
        self.method = method
        self.final_sparsity = float(final_sparsity)
        self.schedule = schedule
        self.pool_size = int(pool_size)
        self.process_group: Optional[object] = None  # set for sharded weights (see fxsparse.distributed)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("tau", torch.zeros((), dtype=torch.float32))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        self._step = 0  # host mirror of ``step``: no device sync to read the schedule
        self._frozen = False
        self._computed_for: Optional[tuple] = None
        self.prunes = False  # host flag: tau > 0 was computed for a positive target sparsity
        self._chains: dict[int, _Reference] = {}  # pool position -> SparseWeight ending a parametrization chain

    # --- schedule -------------------------------------------------------------------------------
    def target_sparsity(self, step: Optional[int] = None) -> float:
        """The scheduled sparsity at ``step`` (default: the current step)."""
        return float(self.schedule(self._step if step is None else step, self.final_sparsity))

    def advance_(self, steps: int = 1) -> None:
        """Move the schedule on by ``steps`` optimizer steps."""
        self._step += int(steps)
        self.step.fill_(self._step)

    def freeze_(self) -> None:
        """Stop recomputing tau (ST-3's fixed-mask fine-tune: the parametrizations hold the masks)."""
        self._frozen = True
        self.frozen.fill_(True)

    # --- threshold ------------------------------------------------------------------------------
    def compute_tau(self, weights: tuple[Tensor, ...]) -> Tensor:
        """The exact global threshold for the current step, from the given pooled weights (pure)."""
        sparsity = self.target_sparsity()
        if sparsity <= 0.0:
            return torch.zeros((), dtype=torch.float32, device=self.tau.device)
        method, group = self.method, self.process_group
        if group is not None or any_sharded(weights):  # each rank holds a shard of the pool
            weights, score_fn, group = local_pool(weights, method.score, group)
            return global_quantile(weights, sparsity, score_fn=score_fn, group=group)
        if type(method).score is Method.score:  # |w| * per-layer scale: scored slice by slice, bounded memory
            score_fn = layer_scaled_abs([method.score_scale(w) for w in weights])
        else:
            score_fn = lambda index, weight: method.score(weight)  # noqa: E731 (a custom score, whole layers)
        # the previous tau narrows the selection window (exact either way); read on the host only on CPU
        hint = float(self.tau) if self.prunes and self.tau.device.type == "cpu" else None
        return global_quantile(weights, sparsity, score_fn=score_fn, hint=hint)

    def watch_chains_(self, chains: Mapping[int, SparseWeight]) -> None:
        """The pooled weights at these positions end a parametrization chain (weight_norm, a lifted weight
        standardization): rank the chain's value instead (``SparseWeight.chain_input``, computed only when
        tau is), and recompute when any tensor it depends on changes, not only the weight passed in."""
        self._chains = {index: _Reference(sparse_weight) for index, sparse_weight in chains.items()}

    def _pool(self, weights: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        chains = self._chains
        return tuple(chains[i].target.chain_input() if i in chains else w for i, w in enumerate(weights))

    @torch.compiler.disable  # eager under torch.compile: no guards on the step, tau reaches the graph as a buffer
    @torch.no_grad()
    def forward(self, *weights: Tensor) -> None:
        if self._frozen:
            return None
        watched = weights + tuple(t for ref in self._chains.values() for t in ref.target.chain_sources())
        key = (self._step, tuple(w._version for w in watched), tuple(storage_key(w) for w in watched))
        if key != self._computed_for:
            self.tau.copy_(self.compute_tau(self._pool(weights)))
            self.prunes = self.target_sparsity() > 0.0
            self._computed_for = key
        return None

    def invalidate_(self) -> None:
        """Force a recomputation at the next forward (after weights were replaced, not modified in place)."""
        self._computed_for = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._step = int(self.step)
        self._frozen = bool(self.frozen)
        self._computed_for = None
        self.prunes = self.target_sparsity() > 0.0  # the loaded tau is in force until the next forward

    def extra_repr(self) -> str:
        return (
            f"method={self.method}, final_sparsity={self.final_sparsity}, schedule={self.schedule}, "
            f"pool_size={self.pool_size}, step={self._step}"
        )
