"""The end of a run: fold the model, test it once, write what it measures next to the run, print the summary."""

from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING, Any

import torch
from tabulate import tabulate
from torch import nn

from ..atomic import atomic_write_text
from ..export import save_csr
from ..flops import flops
from ..fold import fold
from ..inference import measure_speedup
from ..pool import is_sparsified, realized_sparsity
from .loop import evaluate, log

SUMMARY_NAME = "summary.json"

if TYPE_CHECKING:  # a type only: job.py imports this module
    from .job import Training


def finish(training: Training) -> dict[str, Any]:
    """Fold, evaluate on the test set, measure the folded model, write summary.json and print the summary table."""
    config, model, run_dir = training.config, training.model, training.config.run_dir
    sparse = is_sparsified(model)
    realized = realized_sparsity(model) if sparse else 0.0
    folded = (fold(model) if sparse else model).eval()
    test = evaluate(folded, training.loaders["test"], progress=training.progress, desc="test")
    history = training.history
    summary: dict[str, Any] = {
        "run": config.run_name,
        "run_dir": str(run_dir),
        "model": config.model,
        "dataset": training.data.name,
        "method": config.method,
        "sparsity": config.sparsity,
        "realized_sparsity": realized,
        "test_acc": test["acc"],
        "test_loss": test["loss"],
        "val_acc": history[-1]["val_acc"] if history else None,
        "epochs": config.total_epochs,
        "train_time_s": training.train_time,
        "threads": torch.get_num_threads(),
        "dense_state_bytes": _state_bytes(folded),
        "config": config.to_dict(),
        "history": history,
    }
    if config.export:
        summary.update(measure_folded_model(folded, training))
    atomic_write_text(run_dir / SUMMARY_NAME, json.dumps(summary, indent=2))
    log("\n" + tabulate(summary_rows(summary), tablefmt="simple_outline"))
    summary["folded_model"] = folded
    return summary


def measure_folded_model(folded: nn.Module, training: Training) -> dict[str, Any]:
    """Figures of the folded model, each written next to the run and returned as summary keys.

    The one place for them: FLOPs, the CSR checkpoint and the measured CPU inference speed-up of
    fxsparse.accelerate (batch 1, this process's threads); a new figure is computed here, as keys of
    the returned dict, and gets its line in summary_rows().
    """
    run_dir, data = training.config.run_dir, training.data
    example = torch.zeros(
        1, data.in_channels, data.image_size, data.image_size, device=next(folded.parameters()).device
    )
    report = flops(folded, example)
    atomic_write_text(run_dir / "flops.json", report.to_json())
    atomic_write_text(run_dir / "flops.txt", report.table() + "\n")
    csr_path = run_dir / "model.csr.safetensors"
    save_csr(folded, csr_path)
    speed = measure_speedup(copy.deepcopy(folded).cpu(), example.cpu())
    atomic_write_text(run_dir / "inference.json", json.dumps(speed, indent=2))
    return {
        "dense_macs": int(report.dense_macs),
        "sparse_macs": int(report.sparse_macs),
        "flops_path": str(run_dir / "flops.json"),
        "csr_path": str(csr_path),
        "csr_bytes": csr_path.stat().st_size,
        "inference": {key: value for key, value in speed.items() if key != "plan"},
    }


def summary_rows(summary: dict[str, Any]) -> list[list[str]]:
    """The printed summary: one line per figure present in ``summary``."""
    rows = [
        ["test accuracy", f"{summary['test_acc']:.2f} %"],
        ["val accuracy (last epoch)", f"{summary['val_acc']:.2f} %" if summary["val_acc"] is not None else "-"],
        [
            "realised sparsity",
            f"{summary['realized_sparsity']:.4f}"
            + (f" (asked {summary['sparsity']})" if summary["method"] != "dense" else ""),
        ],
    ]
    if "dense_macs" in summary:
        share = 100 * summary["sparse_macs"] / summary["dense_macs"]
        rows += [
            ["dense MACs / image", f"{summary['dense_macs']:,}"],
            ["sparse MACs / image", f"{summary['sparse_macs']:,} ({share:.1f} % of dense)"],
        ]
    if "csr_bytes" in summary:
        rows.append(
            [
                "CSR checkpoint",
                f"{summary['csr_path']}  {human_bytes(summary['csr_bytes'])} "
                f"(dense fp32 state {human_bytes(summary['dense_state_bytes'])})",
            ]
        )
    if "inference" in summary:
        speed = summary["inference"]
        rows.append(
            [
                f"CPU inference, batch 1, {speed['threads']} thread(s)",
                f"{speed['speedup']:.2f}x with fxsparse.accelerate ({speed['dense_ms']:.2f} -> "
                f"{speed['accelerated_ms']:.2f} ms; {speed['sparse_layers']} of {speed['layers']} layers sparse)",
            ]
        )
    rows += [["train time", f"{summary['train_time_s'] / 60:.1f} min"], ["outputs", summary["run_dir"]]]
    return rows


def _state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
