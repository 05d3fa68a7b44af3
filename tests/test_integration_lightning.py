"""fxsparse.integrations.lightning.SparsifyCallback with a real lightning Trainer.fit on tiny models (CPU).

The reference for what the callback computes is the plain loop the README shows (sparsify_, step_ after
each optimizer step, fold_): a fit with the callback must give the same weights, bit for bit.
"""

import csv
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse

pl = pytest.importorskip("lightning.pytorch")
from fxsparse.integrations.common import schedule_step  # noqa: E402
from fxsparse.integrations.lightning import SparsifyCallback  # noqa: E402

BATCH, SAMPLES = 8, 64  # 8 batches per epoch


class TinyNet(pl.LightningModule):
    """conv -> linear (1224 pooled weights), trained with SGD and momentum; training_step calls self(x)."""

    def __init__(self, lr=0.1):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def dataset():
    g = torch.Generator().manual_seed(0)
    inputs, labels = torch.randn(SAMPLES, 1, 8, 8, generator=g), torch.randint(0, 4, (SAMPLES,), generator=g)
    return torch.utils.data.TensorDataset(inputs, labels)


def loader():
    return torch.utils.data.DataLoader(dataset(), batch_size=BATCH)


def trainer(callbacks, **kwargs):
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def fresh_net(cls=TinyNet):
    torch.manual_seed(0)
    return cls()


def pooled_zeros(module):
    weights = [module.net[0].weight, module.net[3].weight]
    return sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)


@pytest.fixture(autouse=True)
def _quiet_lightning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec|log_every_n_steps).*")
        yield


def test_fit_is_the_plain_loop_bit_for_bit_with_gradient_accumulation():
    """sparsify_ + SGD + step_ after each (accumulated) optimizer step + fold_, written by hand, vs Trainer.fit."""
    schedule, sparsity, epochs, accumulate = fxsparse.Cubic(begin=2, end=12), 0.8, 4, 2
    fitted = fresh_net()
    trainer(
        [SparsifyCallback("st3sigma", sparsity, schedule)], max_epochs=epochs, accumulate_grad_batches=accumulate
    ).fit(fitted, loader())

    reference = fresh_net()
    fxsparse.sparsify_(reference, "st3sigma", sparsity, schedule)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for _ in range(epochs):
        for i, (x, y) in enumerate(loader()):
            (F.cross_entropy(reference(x), y) / accumulate).backward()
            if (i + 1) % accumulate == 0:
                optimizer.step()
                fxsparse.step_(reference)
                optimizer.zero_grad()
    assert fxsparse.get_threshold(reference).target_sparsity() == sparsity  # the ramp ended within the run
    fxsparse.fold_(reference)

    assert not fxsparse.is_sparsified(fitted)
    got, want = fitted.state_dict(), reference.state_dict()
    assert sorted(got) == sorted(TinyNet().state_dict())  # the original keys
    assert all(torch.equal(got[k], want[k]) for k in want)
    zeros, total = pooled_zeros(fitted)
    assert abs(zeros - sparsity * total) <= 1  # the requested sparsity, to the weight


def test_paper_schedule_from_the_trainer_steps_and_logged_values(tmp_path):
    """schedule="paper" is placed over trainer.estimated_stepping_batches; the logger gets target, realised, tau."""
    sparsity, epochs = 0.8, 4
    callback = SparsifyCallback("feather", sparsity, schedule="paper")
    logger = pl.loggers.CSVLogger(str(tmp_path), name="run")
    fit = trainer([callback], max_epochs=epochs, logger=logger, log_every_n_steps=1)
    fit.fit(fresh_net(), loader())

    total = epochs * SAMPLES // BATCH
    ramp = fxsparse.paper_schedule("feather", total)
    assert callback._ramp.ramp == ramp
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["fxsparse/target_sparsity"]]
    assert [int(r["step"]) for r in rows] == list(range(total))
    for row in rows:  # each row holds the values of the forward that made that step's update
        target = ramp(int(row["step"]), sparsity)
        assert float(row["fxsparse/target_sparsity"]) == pytest.approx(target, abs=1e-6)
        assert float(row["fxsparse/realized_sparsity"]) == pytest.approx(target, abs=1.5 / 1224)
        assert (float(row["fxsparse/tau"]) > 0) == (target > 0)
    assert float(rows[-1]["fxsparse/realized_sparsity"]) == pytest.approx(sparsity, abs=1 / 1224)


def test_resume_mid_ramp_is_bit_exact(tmp_path):
    """An uninterrupted fit vs one resumed from the checkpoint it wrote mid-ramp (epoch 0 of 4, accumulation 2)."""

    def fit(directory, ckpt_path=None):
        module = fresh_net()
        checkpoints = pl.callbacks.ModelCheckpoint(
            dirpath=str(directory), every_n_epochs=1, save_top_k=-1, filename="{epoch}"
        )
        trainer(
            [SparsifyCallback("st3", 0.8, schedule="paper"), checkpoints],
            max_epochs=4,
            accumulate_grad_batches=2,
            enable_checkpointing=True,
        ).fit(module, loader(), ckpt_path=ckpt_path)
        return module

    uninterrupted = fit(tmp_path / "a")
    middle = str(tmp_path / "a" / "epoch=0.ckpt")
    checkpoint = torch.load(middle, weights_only=False)
    state = checkpoint["state_dict"]
    assert "net.3.parametrizations.weight.original" in state
    step = int(next(v for k, v in state.items() if k.endswith(".step")))
    assert step == checkpoint["global_step"] == 4
    assert 0 < fxsparse.paper_schedule("st3", 16)(step, 0.8) < 0.8  # mid-ramp
    assert checkpoint["callbacks"]["SparsifyCallback"] == {"method": "st3", "sparsity": 0.8}

    resumed = fit(tmp_path / "b", ckpt_path=middle)
    a, b = uninterrupted.state_dict(), resumed.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_options_is_refused(tmp_path):
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path), filename="last")
    first = trainer([SparsifyCallback("st3", 0.8), checkpoints], max_epochs=1, enable_checkpointing=True)
    first.fit(fresh_net(), loader())
    with pytest.raises(ValueError, match="sparsity=0.8.*sparsity=0.5"):
        trainer([SparsifyCallback("st3", 0.5)], max_epochs=2).fit(
            fresh_net(), loader(), ckpt_path=str(tmp_path / "last.ckpt")
        )


def test_a_sparse_checkpoint_loads_into_the_folded_module(tmp_path):
    """trainer.test(ckpt_path=...) after fit: the checkpoint's weights are folded on the way in."""
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=str(tmp_path), every_n_epochs=1, save_top_k=-1, filename="{epoch}"
    )
    module = fresh_net()
    fit = trainer(
        [SparsifyCallback("st3sigma", 0.8, schedule="paper"), checkpoints], max_epochs=3, enable_checkpointing=True
    )
    fit.fit(module, loader())
    middle = str(tmp_path / "epoch=0.ckpt")  # step 8 of 24: mid-ramp

    reference = fresh_net()  # the sparse model as it was at that checkpoint
    fxsparse.sparsify_(reference, "st3sigma", 0.8, fxsparse.paper_schedule("st3sigma", 24))
    reference.load_state_dict(torch.load(middle, weights_only=False)["state_dict"])
    x = dataset().tensors[0]
    with torch.no_grad():
        want = reference(x)

    fit.test(module, loader(), ckpt_path=middle, verbose=False)
    assert not fxsparse.is_sparsified(module)
    with torch.no_grad():
        assert torch.equal(module(x), want)
    zeros, total = pooled_zeros(module)
    assert 0 < zeros < 0.8 * total


class ThreeOptimizers(pl.LightningModule):
    """Manual optimization: a and b (sparsified) step on even batches, c (left dense) on every batch."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x)))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizers = self.optimizers()
        for optimizer in optimizers:
            optimizer.zero_grad()
        self.manual_backward(F.cross_entropy(self(x.flatten(1)[:, :8]), y))
        stepping = optimizers if batch_idx % 2 == 0 else optimizers[2:]
        for optimizer in stepping:
            optimizer.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(m.parameters(), lr=0.01) for m in (self.a, self.b, self.c)]


def test_several_optimizers_advance_the_schedule_once_per_batch_that_updates_sparse_weights():
    module = fresh_net(ThreeOptimizers)
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(schedule_step(pl_module))

    trainer([SparsifyCallback("ste", 0.5, exclude="c.*", fold_at_end=False), Spy()], max_epochs=1).fit(module, loader())
    assert seen == [1, 1, 2, 2, 3, 3, 4, 4]  # c's steps alone (odd batches) do not advance it


def test_bad_setups_get_clear_errors():
    with pytest.raises(ValueError, match="unknown sparsity method"):
        SparsifyCallback("st4")
    with pytest.raises(ValueError, match="schedule must be"):
        SparsifyCallback("st3", 0.9, schedule="cubic")
    already = fresh_net()
    fxsparse.sparsify_(already, "st3", 0.5)
    with pytest.raises(ValueError, match="already sparsified"):
        trainer([SparsifyCallback("st3", 0.5)], max_epochs=1).fit(already, loader())

    class BuiltInConfigureModel(TinyNet):
        def __init__(self):
            pl.LightningModule.__init__(self)
            self.lr = 0.1

        def configure_model(self):
            self.net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))

    with pytest.raises(ValueError, match="build the layers in __init__"):
        trainer([SparsifyCallback("st3", 0.5)], max_epochs=1).fit(BuiltInConfigureModel(), loader())
    with pytest.raises(ValueError, match="has no end"):
        endless = trainer([SparsifyCallback("st3", 0.5, schedule="paper")], max_epochs=-1, max_steps=-1)
        endless.fit(fresh_net(), loader())


class CallsTheSubmodule(TinyNet):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)  # not self(x): the LightningModule's forward never runs


def test_a_training_step_that_calls_a_submodule_trains_sparse():
    """The threshold runs before the LightningModule's forward; this training_step never calls it."""
    callback = SparsifyCallback("st3", 0.8, fold_at_end=False)
    seen = []

    class Spy(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(fxsparse.realized_sparsity(pl_module))

    trainer([callback, Spy()], max_epochs=1).fit(CallsTheSubmodule(), loader())
    assert all(s == pytest.approx(0.8, abs=1 / 1224) for s in seen)


def test_ddp_two_processes_on_cpu(tmp_path):
    """strategy="ddp", 2 processes over gloo, launched the way a user runs a script: both ranks end with the
    same folded weights at the requested sparsity."""
    script = os.path.join(os.path.dirname(__file__), "lightning_ddp_job.py")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, script, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2 and ranks[0]["backend"] == "gloo"
    assert ranks[0]["global_step"] == 12  # 3 epochs of 64 samples, 8 per batch, split over 2 ranks
    assert ranks[0]["taus"] == ranks[1]["taus"] and len(ranks[0]["taus"]) == 12
    for key, value in ranks[0]["state_dict"].items():
        assert torch.equal(value, ranks[1]["state_dict"][key]), key
    assert sorted(ranks[0]["state_dict"]) == sorted(TinyNet().state_dict())
    weights = [ranks[0]["state_dict"][k] for k in ("net.0.weight", "net.3.weight")]
    zeros, total = sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)
    assert abs(zeros - 0.8 * total) <= 1
    assert math.isclose(ranks[0]["target"], 0.8) and ranks[0]["tau"] == ranks[1]["tau"] > 0


class LogsLoss(TinyNet):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss


@pytest.mark.parametrize("finish_ramp", [False, True])
def test_early_stopping_mid_ramp_warns_or_finishes_the_ramp(finish_ramp):
    """Lightning's EarlyStopping ends the fit after epoch 0 of 4, inside the paper ramp (0.34 of the 0.9 asked
    was folded without a word)."""
    stop = pl.callbacks.EarlyStopping(monitor="train_loss", stopping_threshold=1e9, check_on_train_epoch_end=True)
    module = fresh_net(LogsLoss)
    fit = trainer(
        [SparsifyCallback("st3", 0.9, schedule="paper", **({"finish_ramp": True} if finish_ramp else {})), stop],
        max_epochs=4,
    )
    if finish_ramp:
        fit.fit(module, loader())
    else:
        with pytest.warns(UserWarning, match=r"ended at step 8.*final sparsity 0.9.*folded at sparsity 0\.\d+"):
            fit.fit(module, loader())
    assert fit.global_step == 8 and not fxsparse.is_sparsified(module)
    zeros, total = pooled_zeros(module)
    if finish_ramp:
        assert abs(zeros - 0.9 * total) <= 1
    else:
        assert 0 < zeros < 0.8 * total


def test_resuming_from_a_checkpoint_written_without_the_callback_is_one_clear_error(tmp_path):
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path), filename="dense")
    trainer([checkpoints], max_epochs=1, enable_checkpointing=True).fit(fresh_net(), loader())
    with pytest.raises(ValueError, match=r"dense weight 'net.0.weight'.*written by a run without SparsifyCallback"):
        trainer([SparsifyCallback("st3", 0.5)], max_epochs=2).fit(
            fresh_net(), loader(), ckpt_path=str(tmp_path / "dense.ckpt")
        )
