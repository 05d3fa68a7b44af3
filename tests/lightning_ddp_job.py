"""A user's Lightning script with SparsifyCallback under strategy="ddp" (2 CPU processes, gloo).

Run by tests/test_integration_lightning.py as `python lightning_ddp_job.py OUT_DIR`; Lightning starts the second
rank by running this script again. Each rank writes what it ended with to OUT_DIR/rank{N}.pt.
"""

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec|log_every_n_steps).*")

import lightning.pytorch as pl  # noqa: E402
import torch.distributed as dist  # noqa: E402

import fxsparse  # noqa: E402
from fxsparse.integrations.lightning import SparsifyCallback  # noqa: E402

from test_integration_lightning import dataset, fresh_net  # noqa: E402


class RecordThreshold(pl.Callback):
    """The schedule's target and tau after every training batch, and at the end of training (before the fold)."""

    def __init__(self):
        self.taus = []
        self.final = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.taus.append(float(fxsparse.get_threshold(pl_module).tau))

    def on_train_end(self, trainer, pl_module):
        threshold = fxsparse.get_threshold(pl_module)
        self.final = {
            "target": threshold.target_sparsity(),
            "tau": float(threshold.tau),
            "backend": dist.get_backend() if dist.is_initialized() else None,
        }


def main(out_dir):
    torch.set_num_threads(1)
    record = RecordThreshold()
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[SparsifyCallback("st3sigma", 0.8, schedule="paper"), record],
    )
    module = fresh_net()
    trainer.fit(module, torch.utils.data.DataLoader(dataset(), batch_size=8))
    result = {
        "state_dict": module.state_dict(),
        "global_step": trainer.global_step,
        "taus": record.taus,
        "world_size": trainer.world_size,
        **record.final,
    }
    torch.save(result, os.path.join(out_dir, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
