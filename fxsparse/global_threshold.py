"""GlobalThreshold: the one module that owns the schedule state and the global tau.

It runs at the top of the sparsified model's forward with every pooled dense weight as input: as a graph
node (``print(model.code)`` shows the global dependency) in a model sparsify() traced, or as a forward
pre-hook on the root of a model sparsified in place or by walking its modules (``pre_hook`` holds that
hook's handle; it is None for a graph node, and fold reads it to know what to remove). State lives in
buffers (``step``, ``tau``, ``frozen``), so a checkpoint is ``state_dict()`` and resume is exact. tau is
recomputed only when it can have changed: a new step, or weights modified in place since the last
computation (an optimizer step). ST-3 recomputes tau after each optimizer step and Feather before each
training forward; both read the weights as they are when the next forward starts, which is when this
module runs.

What it cannot see: writes that bypass autograd's version counters. Fused optimizers (``fused=True``)
update weights without bumping them: the step counter marks their updates, so call ``fxsparse.step_``
(or ``hook_optimizer``) after every optimizer step, also with a constant schedule. Writes through
``param.data`` (``w.data.copy_(...)``, old-style optimizers): call ``fxsparse.refresh_(model)`` after
them; fold and save_csr recompute tau and warn if it was stale.

tau stays fp32 whatever the model's dtype (``.half()``, ``.to(torch.bfloat16)``), and a model built on
the meta device and materialised with ``to_empty`` gets its step and frozen flag back from the host
state, with tau recomputed at the next forward.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .distributed import any_sharded, local_pool, storage_key
from .distribution import GlobalCaps, LayerTargets, count_quantile
from .layers import expert_matrices
from .methods.base import Method
from .parametrization import SparseWeight, _Reference
from .threshold import capped_threshold, global_quantile, layer_quantiles, layer_scaled_abs

Schedule = Callable[[int, float], float]


def step_count(steps) -> int:
    """``steps`` as a whole number of optimizer steps >= 0; a clear error for anything else."""
    if isinstance(steps, bool) or (isinstance(steps, Tensor) and steps.dtype == torch.bool):
        raise TypeError(f"steps must be a whole number of optimizer steps (an int >= 0), got the bool {steps!r}")
    try:
        count = operator.index(steps)
    except TypeError:
        raise TypeError(f"steps must be a whole number of optimizer steps (an int >= 0), got {steps!r}") from None
    if count < 0:
        raise ValueError(
            f"steps must be >= 0: the schedule only moves forward, got {count}; to go back, load an earlier "
            "checkpoint (model.load_state_dict) or sparsify the dense model again"
        )
    return count


class GlobalThreshold(nn.Module):
    """The schedule and the exact global threshold of one sparsified model.

    pool: the path of each raw pooled weight from the model's root (``<module>.parametrizations.<name>.original``)
    -> the weight, in the order the forward passes them; the buffers are created beside the first one.
    targets: per-layer final targets (`fxsparse.distribution`), or None for the one global threshold. With
    targets, layer l runs the schedule toward its own target and gets its own exact threshold ``layer_tau[l]``
    (the scalar ``tau`` then stays 0); with None, nothing differs from a threshold without the argument. With
    `GlobalCaps` (the global distribution with caps), ``tau`` is the shared threshold and ``layer_tau[l]`` is it
    for the layers within their bounds, each held layer's own threshold for the others.
    """

    _is_impure = True  # it has no users in the graph; torch.fx's dead-code elimination must keep it

    def __init__(
        self,
        method: Method,
        final_sparsity: float,
        schedule: Schedule,
        pool: Mapping[str, Tensor],
        targets: LayerTargets | None = None,
    ):
        super().__init__()
        if not pool:
            raise ValueError("GlobalThreshold needs at least one pooled weight")
        self.method = method
        self.final_sparsity = float(final_sparsity)
        self.schedule = schedule
        self.pool_paths: list[str] = list(pool)
        self.pool_size = sum(weight.numel() for weight in pool.values())
        self.process_group: object | None = None  # set for sharded weights (see fxsparse.distributed)
        self.pre_hook: RemovableHandle | None = None  # the root's forward pre-hook that runs it; None: a graph node
        device = next(iter(pool.values())).device  # tau beside the weights (DDP/NCCL broadcasts it)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("tau", torch.zeros((), dtype=torch.float32, device=device))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool, device=device))
        self.targets = targets
        if targets is not None:
            if len(targets.numels) != len(self.pool_paths):
                raise ValueError(f"{len(targets.numels)} layer targets for a pool of {len(self.pool_paths)} weights")
            self.register_buffer("layer_tau", torch.zeros(len(targets.numels), dtype=torch.float32, device=device))
            self._final_quantiles = targets.quantiles() if isinstance(targets, LayerTargets) else ()
        self.layer_prunes: list[bool] = [False] * len(self.pool_paths)  # host flags per layer (per-layer targets)
        self._held_prunes: list[bool] | None = None  # global caps: what the last computation prunes, per layer
        self._held_at_max: dict[int, bool] = {}  # global caps: the layers the last computation held (at the maximum?)
        self._step = 0  # host mirror of ``step``: no device sync to read the schedule
        self._frozen = False
        self._computed_for: tuple | None = None
        self.prunes = False  # host flag: tau > 0 was computed for a positive target sparsity
        self._chains: dict[int, _Reference] = {}  # pool position -> SparseWeight ending a parametrization chain
        self._stacks: dict[int, int] = {}  # pool position of a mixture-of-experts stack -> its experts' output axis

    # --- schedule -------------------------------------------------------------------------------
    @property
    def current_step(self) -> int:
        """Optimizer steps taken so far (the ``step`` buffer, read on the host without a device sync)."""
        return self._step

    @property
    def is_frozen(self) -> bool:
        """True after freeze_ (fix_mask_): tau is no longer recomputed."""
        return self._frozen

    def target_sparsity(self, step: int | None = None) -> float:
        """The scheduled sparsity at ``step`` (default: the current step)."""
        return float(self.schedule(self._step if step is None else step, self.final_sparsity))

    @property
    def distribution(self) -> str:
        """ "global", or the per-layer distribution's name ("uniform", "erk", "mapping")."""
        return "global" if self.targets is None else self.targets.name

    def layer_sparsities(self, step: int | None = None) -> list[float]:
        """Per-layer targets: the schedule run toward each layer's own final quantile (METHODS.md sec. 8); empty for
        the global distribution (with caps too: its layers have bounds, not targets)."""
        step = self._step if step is None else step
        return [float(self.schedule(step, q)) for q in self._final_quantiles]

    def thresholds(self) -> Tensor:
        """The threshold state: ``tau`` (global) or ``layer_tau`` (per-layer targets)."""
        return self.tau if self.targets is None else self.layer_tau

    def advance_(self, steps: int = 1) -> None:
        """Move the schedule on by ``steps`` optimizer steps (a whole number >= 0)."""
        self._step += step_count(steps)
        self.step.fill_(self._step)

    def freeze_(self) -> None:
        """Stop recomputing tau (ST-3's fixed-mask fine-tune: the parametrizations hold the masks)."""
        self._frozen = True
        self.frozen.fill_(True)

    # --- threshold ------------------------------------------------------------------------------
    def compute_tau(self, weights: tuple[Tensor, ...]) -> Tensor:
        """The exact global threshold for the current step, from the given pooled weights (pure); with per-layer
        targets, the vector of per-layer thresholds."""
        if isinstance(self.targets, GlobalCaps):
            return self._compute_capped(weights)
        if self.targets is not None:
            return self._compute_layer_taus(weights)
        sparsity = self.target_sparsity()
        if sparsity <= 0.0:
            return torch.zeros((), dtype=torch.float32, device=self.tau.device)
        method, group = self.method, self.process_group
        if group is not None or any_sharded(weights):  # each rank holds a shard of the pool
            weights, score_fn, group = local_pool(weights, self.layer_score, group)
            return global_quantile(weights, sparsity, score_fn=score_fn, group=group)
        if type(method).score is Method.score:  # |w| * per-layer scale: scored slice by slice, bounded memory
            score_fn = layer_scaled_abs([self.layer_score_scale(i, w) for i, w in enumerate(weights)])
        else:
            score_fn = self.layer_score  # a custom score, whole layers
        # the previous tau narrows the selection window (exact either way); read on the host only on CPU
        hint = float(self.tau) if self.prunes and self.tau.device.type == "cpu" else None
        return global_quantile(weights, sparsity, score_fn=score_fn, hint=hint)

    def _scored_pool(self, weights: tuple[Tensor, ...]) -> tuple[list[Tensor], object, object | None, bool]:
        """(the local pool, its score function, the process group, whether host hints may be passed): a sharded
        pool's local part, else the weights scored slice by slice when the method scores |w| * a scale."""
        group = self.process_group
        if group is not None or any_sharded(weights):
            weights, score_fn, group = local_pool(weights, self.layer_score, group)
            return weights, score_fn, group, False
        if type(self.method).score is Method.score:
            score_fn = layer_scaled_abs([self.layer_score_scale(i, w) for i, w in enumerate(weights)])
        else:
            score_fn = self.layer_score
        return list(weights), score_fn, None, self.layer_tau.device.type == "cpu"

    def _layer_hints(self, use: bool, layers: Sequence[bool] | None = None) -> list[float | None] | None:
        """The thresholds in force as hints for the next (``layers``: only those layers'), read on the host."""
        if not use:
            return None
        layers = self.layer_prunes if layers is None else [a and b for a, b in zip(layers, self.layer_prunes)]
        return [t if wanted else None for t, wanted in zip(self.layer_tau.tolist(), layers)]

    def _compute_layer_taus(self, weights: tuple[Tensor, ...]) -> Tensor:
        """tau_l = the exact quantile of layer l's own scores at its scheduled sparsity (0: prune nothing)."""
        weights, score_fn, group, hints = self._scored_pool(weights)
        qs = self.layer_sparsities()
        taus = layer_quantiles(weights, qs, score_fn=score_fn, group=group, hints=self._layer_hints(hints))
        return taus.to(self.layer_tau.device)

    def _compute_capped(self, weights: tuple[Tensor, ...]) -> Tensor:
        """The global distribution with caps (METHODS.md sec. 8): the shared threshold of `capped_threshold` for the
        layers it leaves within their scheduled bounds, each other layer held at its bound by its own exact
        threshold. The layers the previous call held are tried as held again, in the same pass. Also writes the
        shared threshold to ``tau`` (the next call's hint)."""
        caps, sparsity, layers = self.targets, self.target_sparsity(), len(self.pool_paths)
        device = self.layer_tau.device
        if sparsity <= 0.0:
            self._held_prunes, self._held_at_max = [False] * layers, {}
            return torch.zeros(layers, dtype=torch.float32, device=device)
        low, high = (None if c is None else float(self.schedule(self._step, c)) for c in caps.bounds())
        count, lows, highs = caps.counts(sparsity, low, high)
        count = min(max(count, sum(lows)), sum(highs))  # a schedule not proportional to its target: caps win
        weights, score_fn, group, use_hints = self._scored_pool(weights)
        shared, own = None, {}
        counts: list[int | None] = [0] * layers  # count == sum(lows): every layer at its least, nothing shared
        if count > sum(lows):
            hint = float(self.tau) if use_hints and self.prunes else None
            held_before = {}  # the layers held last time: tried as held again, around their own thresholds
            if use_hints:
                previous = self.layer_tau.tolist()
                for i, at_max in self._held_at_max.items():
                    bound = highs[i] if at_max else lows[i]
                    held_before[i] = (count_quantile(bound, caps.numels[i]), previous[i], at_max)
            shared, counts, own = capped_threshold(weights, lows, highs, count, score_fn, group, hint, held_before)
            self.tau.copy_(shared)
        at_max = {i: self._held_at_max[i] for i, c in enumerate(counts) if c is None}  # proven held again
        at_max |= {i: c > highs[i] for i, c in enumerate(counts) if c is not None and not lows[i] <= c <= highs[i]}
        own = {i: tau for i, tau in own.items() if at_max.get(i) == self._held_at_max[i]}  # held on the same side
        qs = [0.0] * layers
        for i, side in at_max.items():
            if i not in own:
                qs[i] = count_quantile(highs[i] if side else lows[i], caps.numels[i])
        taus = torch.zeros(layers, dtype=torch.float32, device=device)
        if any(q > 0.0 for q in qs):
            hints = self._layer_hints(use_hints, [q > 0.0 for q in qs])
            taus = layer_quantiles(weights, qs, score_fn=score_fn, group=group, hints=hints).to(device)
        for i, tau in own.items():
            taus[i] = tau.to(device)
        if shared is not None:
            free = torch.tensor([i not in at_max for i in range(layers)], device=device)
            taus = torch.where(free, shared.to(device), taus)
        bound = {i: highs[i] if side else lows[i] for i, side in at_max.items()}
        self._held_prunes = [bound[i] > 0 if i in at_max else shared is not None for i in range(layers)]
        self._held_at_max = at_max
        return taus

    def _set_prunes(self) -> None:
        """Host flags of what the installed thresholds prune (no device sync)."""
        self.prunes = self.target_sparsity() > 0.0
        if isinstance(self.targets, GlobalCaps):  # what the last computation found (after a load: every layer)
            held = self._held_prunes
            self.layer_prunes = list(held) if held is not None else [self.prunes] * len(self.pool_paths)
        elif self.targets is not None:
            self.layer_prunes = [q > 0.0 for q in self.layer_sparsities()]

    def watch_chains_(self, chains: Mapping[int, SparseWeight]) -> None:
        """The pooled weights at these positions end a parametrization chain (weight_norm, a lifted weight
        standardization): rank the chain's value instead (``SparseWeight.chain_input``, computed only when
        tau is), and recompute when any tensor it depends on changes, not only the weight passed in."""
        self._chains = {index: _Reference(sparse_weight) for index, sparse_weight in chains.items()}

    # --- mixture-of-experts stacks: each expert's matrix is a layer of its own (fxsparse.layers) ----------
    def set_expert_stacks_(self, stacks: Mapping[int, int]) -> None:
        """The pooled weights at these positions are expert stacks (position -> the stored axis of each expert's
        outputs): every expert's (out, in) matrix is scored as a linear layer of that shape (ST-3-sigma's
        S_l = out + in, not the sum of the stack's three dims)."""
        self._stacks = dict(stacks)

    def layer_score_scale(self, index: int, weight: Tensor) -> float:
        """The method's per-layer score scale of pooled weight ``index`` (of one expert's matrix for a stack)."""
        axis = self._stacks.get(index)
        return self.method.score_scale(weight if axis is None else expert_matrices(weight, axis)[0])

    def layer_score(self, index: int, weight: Tensor) -> Tensor:
        """The method's scores of pooled weight ``index``, in its stored order (a stack: expert by expert)."""
        axis = self._stacks.get(index)
        if axis is None:
            return self.method.score(weight)
        matrices = expert_matrices(weight, axis).unbind(0)
        return torch.stack([self.method.score(matrix) for matrix in matrices]).movedim(1, axis)

    def pool_values(self, weights: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """What is ranked: each pooled weight, or for a chained one the value its chain computes."""
        chains = self._chains
        return tuple(chains[i].target.chain_input() if i in chains else w for i, w in enumerate(weights))

    def _key(self, weights: tuple[Tensor, ...]) -> tuple:
        """What tau depends on: the step, and the versions and storages of the pooled weights and of every
        tensor a chained weight is computed from."""
        watched = tuple(weights) + tuple(t for ref in self._chains.values() for t in ref.target.chain_sources())
        return self._step, tuple(w._version for w in watched), tuple(storage_key(w) for w in watched)

    def is_current(self, weights: tuple[Tensor, ...]) -> bool:
        """True when tau was computed for this step and these weights as autograd last saw them."""
        return self._computed_for == self._key(weights)

    @torch.compiler.disable  # eager under torch.compile: no guards on the step, tau reaches the graph as a buffer
    @torch.no_grad()
    def forward(self, *weights: Tensor) -> None:
        if self._frozen:
            return None
        key = self._key(weights)
        if key != self._computed_for:
            self.thresholds().copy_(self.compute_tau(self.pool_values(weights)))
            self._set_prunes()
            self._computed_for = key
        return None

    def invalidate_(self) -> None:
        """Force a recomputation at the next forward (after weights were replaced, not modified in place)."""
        self._computed_for = None

    # --- state ----------------------------------------------------------------------------------
    def _apply(self, fn, recurse: bool = True):
        """Module.to/half/cuda/to_empty: tau stays fp32, and step/frozen follow the host state.

        ``.half()`` or ``.to(torch.bfloat16)`` would round tau; ``to_empty`` (after a meta-device init)
        leaves every buffer uninitialised. The host mirrors of step and frozen are the truth; a tau
        materialised from the meta device is recomputed at the next forward.
        """
        kept = {name: getattr(self, name) for name in ("tau", "layer_tau") if hasattr(self, name)}
        super()._apply(fn, recurse)
        if self.tau.is_meta:
            return self
        self.step.fill_(self._step)
        self.frozen.fill_(self._frozen)
        for name, before in kept.items():
            now = getattr(self, name)
            if before.is_meta:  # nothing to keep: prune nothing until the next forward computes tau
                setattr(self, name, torch.zeros(before.shape, dtype=torch.float32, device=now.device))
                self.prunes = False
                self.layer_prunes = [False] * len(self.pool_paths)
            elif now.dtype != torch.float32:
                setattr(self, name, before.to(device=now.device, dtype=torch.float32))  # the fp32 value, not rounded
        self.invalidate_()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._step = int(self.step)
        self._frozen = bool(self.frozen)
        self._computed_for = None
        self._held_prunes, self._held_at_max = None, {}
        self._set_prunes()  # the loaded tau is in force until the next forward

    def extra_repr(self) -> str:
        return (
            f"method={self.method}, final_sparsity={self.final_sparsity}, distribution={self.distribution}, "
            f"schedule={self.schedule}, "
            f"pool_size={self.pool_size}, step={self._step}, runs_as={'pre-hook' if self.pre_hook else 'graph node'}"
        )
