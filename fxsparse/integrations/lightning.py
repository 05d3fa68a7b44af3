"""fxsparse in a Lightning run: a Callback that sparsifies the LightningModule and drives its schedule.

    trainer = lightning.Trainer(max_epochs=30, callbacks=[SparsifyCallback("st3sigma", 0.9, schedule="paper")])
    trainer.fit(module)     # afterwards the module is folded: plain weights with their zeros

Order of events in ``Trainer.fit`` and what the callback does at each:
  setup("fit")        sparsify the module in place (``fxsparse.sparsify_``), before configure_model, before a
                      checkpoint is restored (it finds the parametrized keys and the threshold's state) and before
                      configure_optimizers (Parameter objects are kept in any case);
  on_fit_start        place the "paper" ramp from ``trainer.estimated_stepping_batches``; hook every optimizer
                      that updates a sparsified weight;
  each batch start    bring tau up to date (the step and the weights changed), also when training_step calls a
                      submodule rather than the module's forward;
  optimizer.step()    the first step of each training batch advances the schedule by one (gradient
                      accumulation: only batches that step; several optimizers: once per batch);
  on_train_batch_end  log target sparsity, realised sparsity and tau at the logger's cadence;
  checkpoints         the model's state_dict holds the schedule step, tau and masks; the callback's state holds
                      the method and sparsity, and a resume with other ones is refused;
  on_fit_end          fold (``fxsparse.fold_``): plain weights, the original state_dict keys; a fit that ends
                      before the ramp does (early stopping) is said in a warning, or finish_ramp=True ends the ramp.
A checkpoint to resume from that holds dense weights for the sparsified layers (written without the callback) is
refused with one line, before torch's list of missing keys.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from typing import Any

import lightning.pytorch as pl
from torch import nn

from .. import fold_, is_sparsified, step_
from ..pool import refresh_threshold_
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


class SparsifyCallback(pl.Callback):
    """Sparse training of the LightningModule it is given, from ``trainer.fit`` to a folded module.

    method, sparsity, exclude, min_numel, distribution, min_layer_sparsity, max_layer_sparsity: as for
        ``fxsparse.sparsify_``.
    schedule: None (the final sparsity from the first step), "paper" (the ramp placed as in the method's
        paper over this run's optimizer steps) or a callable (step, final_sparsity) -> sparsity, in steps.
    fold_at_end: fold the module when fit ends. A checkpoint written during training still loads into the
        folded module (``trainer.test(ckpt_path="best")``): its weights are folded as they load.
    finish_ramp: when fit ends before the schedule reaches ``sparsity`` (early stopping, max_steps), jump it to
        its end before folding, so the folded module has ``sparsity``; otherwise it is folded as it is, with a
        warning.
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
        self._module: weakref.ref | None = None  # the module this callback sparsified
        self._hooks: list = []
        self._stepped_this_batch = False
        self._steps = 0  # the model's schedule step, mirrored on the host for the logging cadence
        self._metrics: dict[str, float] | None = None
        self._fold_on_load = None  # handle of the FoldSparseCheckpoints hook left on the folded module
        self._refuse_dense = None  # handle of the sparse module's hook that refuses a dense checkpoint

    # --- sparsify --------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._owns(pl_module):  # owned: still sparse from an earlier fit (fold_at_end=False)
            return
        if is_sparsified(pl_module):
            raise ValueError(
                f"{type(pl_module).__name__} is already sparsified; SparsifyCallback sparsifies the dense module "
                "itself: pass the dense module, or drop the callback and call fxsparse.step_ yourself"
            )
        if next(pl_module.parameters(), None) is None:
            raise ValueError(
                f"{type(pl_module).__name__} has no parameters when SparsifyCallback.setup runs: Lightning calls the "
                "callbacks' setup before LightningModule.setup and configure_model, so build the layers in __init__"
            )
        if self._fold_on_load is not None:  # the module folded by an earlier fit is trained sparse again
            self._fold_on_load.remove()
            self._fold_on_load = None
        self._ramp = self.options.sparsify_(pl_module)
        self._module = weakref.ref(pl_module)
        self._refuse_dense = pl_module.register_load_state_dict_pre_hook(_refuse_dense_checkpoint)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._ramp is not None and self._ramp.ramp is None:
            self._ramp.place(trainer.estimated_stepping_batches)
        sparse = {id(p) for name, p in pl_module.named_parameters() if ".parametrizations." in f".{name}"}
        for optimizer in trainer.optimizers:
            if any(id(p) in sparse for group in optimizer.param_groups for p in group["params"]):
                self._hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        if not self._hooks:
            warnings.warn(
                "SparsifyCallback: no optimizer of this run updates the sparsified weights, so the sparsity "
                "schedule will not advance",
                stacklevel=2,
            )

    # --- schedule and logs -----------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._steps = schedule_step(pl_module)  # after a checkpoint was restored

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        self._stepped_this_batch = False
        self._refresh(pl_module)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._refresh(pl_module)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._refresh(pl_module)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._refresh(pl_module)

    def _refresh(self, pl_module: nn.Module) -> None:
        """tau for the weights and step as they are now (a no-op when current). The threshold also runs before
        the module's forward, but a training_step may call a submodule (``self.net(x)``) and never run it."""
        if self._owns(pl_module):
            refresh_threshold_(pl_module)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        """The weights and tau are those of this batch's forward: what is logged is what trained."""
        every = trainer.log_every_n_steps
        if not self._stepped_this_batch and self._metrics is None and every > 0 and (self._steps + 1) % every == 0:
            self._metrics = sparsity_metrics(pl_module)

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        module = self._module() if self._module is not None else None
        if module is not None and not self._stepped_this_batch:
            self._stepped_this_batch = True
            step_(module)
            self._steps += 1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        if self._metrics is not None:
            for name, value in self._metrics.items():
                pl_module.log(name, value, on_step=True, on_epoch=False)
            self._metrics = None

    # --- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self.options.identity()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.options.check_resumed(state_dict)

    # --- end -------------------------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        if self.fold_at_end and self._owns(pl_module):
            self._refuse_dense.remove()
            fold_at_end_(pl_module, self.finish_ramp)
            self._module = None
            self._fold_on_load = pl_module.register_load_state_dict_pre_hook(
                FoldSparseCheckpoints(self.options, self._ramp)
            )

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _owns(self, pl_module: nn.Module) -> bool:
        return self._module is not None and self._module() is pl_module and is_sparsified(pl_module)


def _refuse_dense_checkpoint(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook of the module the callback sparsified: a state_dict with the plain weight of a
    sparsified layer and not its sparse state (a checkpoint of a run without the callback) is refused in one
    line, instead of torch's list of missing and unexpected keys."""
    found = dense_keys_of_sparse_layers(module, state_dict, prefix)
    dense = [key for key, beside_sparse_state in found.items() if not beside_sparse_state]
    if dense:
        raise ValueError(
            f"the checkpoint holds the dense weight {dense[0]!r} of a layer SparsifyCallback sparsified: it was "
            "written by a run without SparsifyCallback. To train sparse from its weights, load them into the "
            "module before fit (module.load_state_dict(torch.load(path)['state_dict'])) and fit without ckpt_path"
        )


class FoldSparseCheckpoints:
    """load_state_dict pre-hook of a folded module: a state_dict written while it trained sparse (parametrized
    keys, threshold state) is folded on the way in, into the plain keys the module has now.

    The state is loaded into a sparsified copy of the module and folded there: the weights loaded are the ones
    the sparse model computed with. Any other state_dict passes through untouched.
    """

    def __init__(self, options: SparsifyOptions, ramp: PaperRamp | None):
        self.options = options
        self.ramp = ramp  # the run's placed paper ramp: the loaded step must give the target it trained with

    def __call__(self, module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
        if prefix or is_sparsified(module):
            return
        probe = copy.deepcopy(module)
        self.options.sparsify_(probe, self.ramp)
        if set(probe.state_dict()) != set(state_dict):
            return
        probe.load_state_dict(state_dict)
        fold_(probe)
        state_dict.clear()
        state_dict.update(probe.state_dict())
