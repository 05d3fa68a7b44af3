"""What the Lightning and Hugging Face callbacks share: the sparsify options, the paper ramp placed from the
trainer's own step count, the values they log, the fold at the end of training, and how a state_dict's dense
weights are found next to the sparse ones."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from .. import Constant, Cubic, Method, fold_, get_method, get_threshold, paper_schedule, realized_sparsity, sparsify_
from ..distribution import check_spec
from ..fqn import join
from ..pool import sparse_entries

PAPER = "paper"
TARGET_SPARSITY = "fxsparse/target_sparsity"
REALIZED_SPARSITY = "fxsparse/realized_sparsity"
TAU = "fxsparse/tau"

ScheduleSpec = None | str | Callable[[int, float], float]
ExcludeSpec = Any  # as fxsparse.sparsify_ takes it: glob pattern(s) or a callable (fqn, param) -> bool


class PaperRamp:
    """``fxsparse.paper_schedule(method, total_steps)``, placed once the trainer has counted its optimizer steps.

    The model is sparsified before the trainer knows how long it will train (before the optimizer is built
    and before a checkpoint is loaded); ``place`` is called when it does, before the first training forward.
    Until then the target is 0, which is what every paper ramp gives at step 0.
    """

    def __init__(self, method_name: str):
        self.method_name = method_name
        self.ramp: Cubic | None = None

    def place(self, total_steps: float) -> None:
        if not math.isfinite(total_steps):
            raise ValueError(
                "schedule='paper' places the ramp from the trainer's total number of optimizer steps, and this run "
                "has no end: set max_steps or max_epochs, or pass schedule=fxsparse.Cubic(begin, end)"
            )
        self.ramp = paper_schedule(self.method_name, int(total_steps))

    def __call__(self, step: int, final_sparsity: float) -> float:
        return 0.0 if self.ramp is None else self.ramp(step, final_sparsity)

    def __repr__(self) -> str:
        return f"PaperRamp({self.method_name!r}, {self.ramp if self.ramp is not None else 'not placed yet'})"


@dataclasses.dataclass(frozen=True)
class SparsifyOptions:
    """The arguments of ``fxsparse.sparsify_`` as a callback holds them; ``schedule`` may also be "paper"."""

    method: str | Method
    sparsity: float
    schedule: ScheduleSpec
    exclude: ExcludeSpec
    min_numel: int
    distribution: Any = "global"  # as sparsify_'s distribution= (issue 18)
    min_layer_sparsity: float | None = None
    max_layer_sparsity: float | None = None

    def __post_init__(self):
        check_spec(self.distribution, self.min_layer_sparsity, self.max_layer_sparsity)
        get_method(self.method)  # an unknown name fails when the callback is built, not when training starts
        if not (self.schedule is None or self.schedule == PAPER or callable(self.schedule)):
            raise ValueError(
                f"schedule must be None (the final sparsity from the first step), 'paper' (the ramp placed as in "
                f"the method's paper) or a callable (step, final_sparsity) -> sparsity; got {self.schedule!r}"
            )

    @property
    def method_name(self) -> str:
        return get_method(self.method).name

    def sparsify_(
        self, model: nn.Module, ramp: PaperRamp | None = None, *, trace_model: bool = True
    ) -> PaperRamp | None:
        """Sparsify ``model`` in place; returns the ramp to place when the schedule is "paper" (a new one, or
        ``ramp``, already placed, for a second model trained in the same run). ``trace_model=False`` skips
        the torch.fx attempt (transformers >= 5 models cannot be traced: their weights are found by walking)."""
        if self.schedule == PAPER:
            ramp = ramp if ramp is not None else PaperRamp(self.method_name)
        else:
            ramp = None
        schedule = ramp if ramp is not None else self.schedule
        sparsify_(
            model,
            self.method,
            self.sparsity,
            schedule,
            exclude=self.exclude,
            min_numel=self.min_numel,
            trace_model=trace_model,
            distribution=self.distribution,
            min_layer_sparsity=self.min_layer_sparsity,
            max_layer_sparsity=self.max_layer_sparsity,
        )
        return ramp

    def identity(self) -> dict[str, Any]:
        """What a checkpoint records, so that a resume with other options is refused."""
        identity = {"method": self.method_name, "sparsity": float(self.sparsity)}
        if self.distribution != "global":  # older checkpoints, all global, have no such key
            identity["distribution"] = self.distribution
        for key in ("min_layer_sparsity", "max_layer_sparsity"):  # recorded only when set, as the distribution
            if getattr(self, key) is not None:
                identity[key] = getattr(self, key)
        return identity

    def check_resumed(self, saved: dict[str, Any]) -> None:
        mine = self.identity()
        for key, value in mine.items():
            if key in saved and saved[key] != value:
                raise ValueError(
                    f"the checkpoint was trained with {key}={saved[key]!r} and this SparsifyCallback has "
                    f"{key}={value!r}; resume with the checkpoint's options or start a new run"
                )


def sparsity_metrics(model: nn.Module) -> dict[str, float]:
    """Target sparsity, tau and the realised fraction of zeros of the weights the forward uses now."""
    threshold = get_threshold(model)
    return {
        TARGET_SPARSITY: threshold.target_sparsity(),
        REALIZED_SPARSITY: realized_sparsity(model),
        TAU: float(threshold.tau),
    }


def schedule_step(model: nn.Module) -> int:
    """The sparsified model's own count of optimizer steps (restored with its state_dict)."""
    return int(get_threshold(model).step)


def fold_at_end_(model: nn.Module, finish_ramp: bool) -> None:
    """``fold_`` when training ends. A run that ends before its schedule reaches the final sparsity (early
    stopping, max_steps) is folded at the sparsity it reached, with a warning that says so; with
    ``finish_ramp`` the schedule jumps to its end first, so the folded model has the final sparsity (the
    rest of the ramp pruned in one step, without the training the ramp would have given it)."""
    threshold = get_threshold(model)
    target, final = threshold.target_sparsity(), threshold.final_sparsity
    if target < final:
        if finish_ramp:
            threshold.schedule = Constant()
            threshold.invalidate_()
        else:
            warnings.warn(
                f"SparsifyCallback: training ended at step {threshold.current_step}, before the sparsity schedule "
                f"reached the final sparsity {final:g}: the model is folded at sparsity {realized_sparsity(model):.4f} "
                f"(the schedule's target at this step: {target:.4f}). Train to the end of the ramp (early stopping "
                "ended this run early), end the ramp sooner (schedule=fxsparse.Cubic(begin, end)), pass "
                f"finish_ramp=True to prune to {final:g} in one step before folding, or fold_at_end=False to keep "
                "the model sparse and train on",
                stacklevel=3,
            )
    fold_(model)


def dense_keys_of_sparse_layers(model: nn.Module, state_dict: Mapping[str, Any], prefix: str) -> dict[str, bool]:
    """The keys of ``state_dict`` that hold the plain weight of a layer ``model`` holds sparsified (such as
    "net.0.weight" where the model has "net.0.parametrizations.weight.original"), each mapped to whether
    ``state_dict`` also holds that layer's sparse state."""
    found = {}
    for entry in sparse_entries(model):
        key = prefix + entry.fqn
        if key in state_dict:
            module_fqn, _, name = entry.fqn.rpartition(".")
            sparse = prefix + join(module_fqn, f"parametrizations.{name}.")
            found[key] = any(k.startswith(sparse) for k in state_dict)
    return found
