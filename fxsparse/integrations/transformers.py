"""fxsparse in a Hugging Face ``Trainer`` run: a TrainerCallback that sparsifies the model and drives its schedule.

    trainer = Trainer(model, args, train_dataset=data, callbacks=[SparsifyCallback("st3sigma", 0.9, schedule="paper")])
    trainer.train()
    trainer.save_model("out")     # plain weights with their zeros; from_pretrained("out") reloads them

Order of events (transformers 5) and what the callback does at each:
  Trainer.__init__ ends (on_init_end)   sparsify the model in place (``fxsparse.sparsify_``): before train()
                                        loads a checkpoint to resume (it finds the parametrized keys and the
                                        threshold's state) and before the optimizer is created;
  train() builds the optimizer          (sparsify_ keeps the Parameter objects, so an optimizer passed to
                                        Trainer(optimizers=...) is valid as well)
  on_train_begin                        place the "paper" ramp from ``state.max_steps``; a model that was not
                                        sparsified yet (model_init, or a callback added after __init__) is
                                        sparsified here, and a resume into it is refused;
  on_pre_optimizer_step                 read target sparsity, realised sparsity and tau when this step is logged;
  on_step_end                           advance the schedule (once per optimizer step, after accumulation);
  on_log                                add the values read to that log record;
  on_train_end                          fold (``fxsparse.fold_``), after load_best_model_at_end; a run that ends
                                        before the ramp does (early stopping) is said in a warning.
Saving: while the model is sparse (a checkpoint, or save_model after evaluate() alone or after a train() that
raised), its state_dict holds the sparse state (parametrized weights, schedule step, tau, masks) and beside it
each sparsified weight's effective value under the layer's own key: ``from_pretrained`` loads those (the model's
weights, never re-initialised ones), and a resume loads the sparse state and drops them.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerState, TrainingArguments
from transformers.trainer_utils import IntervalStrategy

from .. import is_sparsified, step_
from ..pool import refresh_threshold_, sparse_entries
from .common import (
    ExcludeSpec,
    PaperRamp,
    ScheduleSpec,
    SparsifyOptions,
    dense_keys_of_sparse_layers,
    fold_at_end_,
    schedule_step,
    sparsity_metrics,
)

_SPARSIFIED_BY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the SparsifyCallback that did


class SparsifyCallback(TrainerCallback):
    """Sparse training of the Trainer's model, from ``Trainer(...)`` to a folded model.

    method, sparsity, exclude, min_numel, distribution, min_layer_sparsity, max_layer_sparsity: as for
        ``fxsparse.sparsify_``.
    schedule: None (the final sparsity from the first step), "paper" (the ramp placed as in the method's
        paper over ``state.max_steps``) or a callable (step, final_sparsity) -> sparsity, in optimizer steps.
    fold_at_end: fold the model when training ends, so that save_pretrained writes plain weights.
    finish_ramp: when training ends before the schedule reaches ``sparsity`` (early stopping), jump it to its end
        before folding, so the folded model has ``sparsity``; otherwise it is folded as it is, with a warning.
    Logged (at the Trainer's logging steps, in each log record): fxsparse/target_sparsity,
    fxsparse/realized_sparsity, fxsparse/tau. Pass it in ``Trainer(callbacks=[...])``.
    """

    def __init__(
        self,
        method: Any = "st3sigma",
        sparsity: float = 0.9,
        schedule: ScheduleSpec = None,
        *,
        exclude: ExcludeSpec = None,
        min_numel: int = 0,
        fold_at_end: bool = True,
        finish_ramp: bool = False,
        distribution: Any = "global",
        min_layer_sparsity: float | None = None,
        max_layer_sparsity: float | None = None,
    ):
        self.options = SparsifyOptions(
            method, sparsity, schedule, exclude, min_numel, distribution, min_layer_sparsity, max_layer_sparsity
        )
        self.fold_at_end = fold_at_end
        self.finish_ramp = finish_ramp
        self._ramp: PaperRamp | None = None
        self._model: weakref.ref | None = None  # the model this callback sparsified
        self._hooks: list = []  # the save and load hooks on that model
        self._metrics: dict[str, float] | None = None
        self._metrics_step = -1

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            if self._owns(model):
                raise ValueError(
                    "this SparsifyCallback is listed twice in the Trainer's callbacks: list it once "
                    "(one SparsifyCallback sparsifies the whole model)"
                )
            self._sparsify(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self._owns(model):
            self._sparsify(model)
        if state.global_step > 0 and schedule_step(model) != state.global_step:
            raise ValueError(
                f"resuming at global step {state.global_step}, but the model's sparsity schedule is at step "
                f"{schedule_step(model)}: the checkpoint was not written by a run with SparsifyCallback, or it was "
                "loaded before the model was sparsified (pass the callback to Trainer(callbacks=[...]) and do not "
                "use model_init)"
            )
        if self._ramp is not None and self._ramp.ramp is None:
            self._ramp.place(state.max_steps)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        """The weights and tau are those of this step's forward: what is logged is what trained."""
        if self._owns(model) and _logs_after_next_step(args, state):
            self._metrics, self._metrics_step = sparsity_metrics(model), state.global_step + 1

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._owns(model):
            step_(model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._metrics is None or self._metrics_step != state.global_step or logs is None:
            return
        logs.update(self._metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._metrics)  # Trainer.log appended a copy of logs before on_log
        self._metrics = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.fold_at_end and self._owns(model):
            for handle in self._hooks:
                handle.remove()
            self._hooks.clear()
            fold_at_end_(model, self.finish_ramp)
            self._model = None

    def _sparsify(self, model: nn.Module) -> None:
        if is_sparsified(model):
            other = _SPARSIFIED_BY.get(model)
            if other is not None and other is not self and other._owns(model):
                raise ValueError(
                    f"{type(model).__name__} was sparsified by another SparsifyCallback: a Trainer takes one "
                    "SparsifyCallback (two are listed in its callbacks, or an earlier Trainer's callback with "
                    "fold_at_end=False left this model sparse); keep one"
                )
            raise ValueError(
                f"{type(model).__name__} is already sparsified; SparsifyCallback sparsifies the dense model itself: "
                "pass the dense model, or drop the callback and call fxsparse.step_ yourself"
            )
        self._ramp = self.options.sparsify_(model, trace_model=False)
        self._model = weakref.ref(model)
        _SPARSIFIED_BY[model] = self
        self._hooks = [
            model._register_state_dict_hook(_add_effective_weights),  # public (as a post-hook) only from torch 2.6
            model.register_load_state_dict_pre_hook(_drop_effective_weights),
        ]

    def _owns(self, model: nn.Module | None) -> bool:
        return model is not None and self._model is not None and self._model() is model and is_sparsified(model)


@torch.no_grad()
def _add_effective_weights(model: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict hook of a model the callback sparsified: each sparsified weight's effective value (what fold_
    would bake) under the layer's own key, beside the sparse state. A loader that knows only the plain
    architecture (``from_pretrained``) gets the weights the model computes with."""
    if not is_sparsified(model):
        return
    refresh_threshold_(model)
    for entry in sparse_entries(model):
        state_dict[prefix + entry.fqn] = getattr(entry.module, entry.name).detach().clone()


def _drop_effective_weights(model: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: the effective weights a sparse state_dict carries (``_add_effective_weights``)
    are not loaded into the sparse model, which loads the parametrized weights beside them. A plain weight
    without its sparse state (a dense run's checkpoint) is left in place for torch to report."""
    for key, beside_sparse_state in dense_keys_of_sparse_layers(model, state_dict, prefix).items():
        if beside_sparse_state:
            del state_dict[key]


def _logs_after_next_step(args: TrainingArguments, state: TrainerState) -> bool:
    """Whether the Trainer logs after the optimizer step about to be taken (DefaultFlowCallback's rule)."""
    step = state.global_step + 1
    if args.logging_first_step and step == 1:
        return True
    if args.logging_strategy == IntervalStrategy.STEPS:
        return state.logging_steps > 0 and step % state.logging_steps == 0
    return args.logging_strategy == IntervalStrategy.EPOCH  # the epoch's last step is not known here: read at each
