"""The training checkpoint: what `fxsparse train` writes after every epoch, reads on --resume, and
`fxsparse export | flops` read to rebuild the run's model.

It holds the sparsified model's state_dict (the schedule step, tau and ST-3's frozen masks are buffers),
the optimizer, the lr scheduler, every RNG state, the epoch, the history, the run's config and the shape
of its data. A checkpoint is untrusted input: it is loaded with ``weights_only=True`` and checked before
use, and whatever is wrong with it is one line of CheckpointError.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_write
from .config import NON_RESULT_KEYS, TrainConfig
from .errors import CheckpointError, first_line

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 1
# key -> what its value must be; "data" (the data's shape, for export) is absent from older checkpoints
CHECKPOINT_KEYS = {
    "version": int,
    "epoch": int,
    "model": Mapping,
    "optimizer": Mapping,
    "lr_scheduler": Mapping,
    "rng": Mapping,
    "config": Mapping,
    "history": list,
    "train_time": (int, float),
}


def rng_state() -> dict[str, Any]:
    state = np.random.get_state()
    out = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]) + [random.getstate()[0]],
        "numpy": {
            "keys": torch.from_numpy(state[1].astype(np.int64)),
            "pos": int(state[2]),
            "has_gauss": int(state[3]),
            "cached_gaussian": float(state[4]),
        },
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    python = state["python"]
    random.setstate((python[-1], tuple(python[:-1]), None))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """torch.save through fxsparse.atomic.atomic_write: never half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(dict(state), tmp))


def load_torch_file(path: str | os.PathLike) -> Any:
    """torch.load(weights_only=True) onto the CPU; an unreadable file is one line of CheckpointError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as error:  # unpickling, zip and storage errors come in many types
        raise CheckpointError(
            f"cannot read {os.fspath(path)}: it is corrupt, truncated or not a torch checkpoint ({first_line(error)})"
        ) from error


def is_training_checkpoint(obj: Any) -> bool:
    """Written by `fxsparse train`: the run's config beside the model's state_dict."""
    return isinstance(obj, Mapping) and isinstance(obj.get("config"), Mapping) and isinstance(obj.get("model"), Mapping)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A `fxsparse train` checkpoint, checked for everything --resume and export use."""
    saved = load_torch_file(path)
    if not isinstance(saved, Mapping) or not isinstance(saved.get("config"), Mapping):
        raise CheckpointError(f"{os.fspath(path)} holds no run config: it was not written by `fxsparse train`")
    for key, kind in CHECKPOINT_KEYS.items():
        value = saved.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(
                f"{os.fspath(path)} is incomplete: its {key!r} is "
                f"{'missing' if value is None else 'a ' + type(value).__name__}"
            )
    if saved["version"] > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{os.fspath(path)} is a version {saved['version']} checkpoint; this fxsparse reads up to "
            f"version {CHECKPOINT_VERSION} (upgrade fxsparse)"
        )
    if saved["epoch"] < 1 or len(saved["history"]) != saved["epoch"]:
        raise CheckpointError(
            f"{os.fspath(path)} is inconsistent: epoch {saved['epoch']} with {len(saved['history'])} epochs of history"
        )
    return dict(saved)


def check_resumable(saved: Mapping[str, Any], config: TrainConfig) -> None:
    """Refuse to resume with settings that would change the result; say which differ."""
    current = config.to_dict()
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, now {current[k]!r}"
        for k in current
        if k not in NON_RESULT_KEYS and _normal(saved.get(k)) != _normal(current[k])
    ]
    if diffs:
        raise ValueError(
            "--resume needs the settings of the interrupted run; these differ:\n  "
            + "\n  ".join(diffs)
            + "\nrun the original command again with --resume (or start a new run with --sname NEW)"
        )


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value
