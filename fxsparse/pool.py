"""The pool: every weight a sparsified model thresholds globally, and what can be read off it."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .parametrization import SparseWeight

THRESHOLD_NAME = "fxsparse_threshold"


@dataclasses.dataclass
class SparseEntry:
    fqn: str  # e.g. "layer1.0.conv1.weight"
    module: nn.Module
    name: str  # the parametrized attribute, e.g. "weight"
    parametrization: SparseWeight

    @property
    def original(self) -> nn.Parameter:
        return self.module.parametrizations[self.name].original


def sparse_entries(model: nn.Module) -> list[SparseEntry]:
    """Every (module, attribute) carrying a SparseWeight, in module order (tied weights appear once each use)."""
    entries = []
    for module_fqn, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for name, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, SparseWeight):
                    fqn = f"{module_fqn}.{name}" if module_fqn else name
                    entries.append(SparseEntry(fqn, module, name, p))
    return entries


def unique_entries(model: nn.Module) -> list[SparseEntry]:
    """One entry per distinct raw parameter (a tied weight is pooled once)."""
    seen, unique = set(), []
    for entry in sparse_entries(model):
        if id(entry.original) not in seen:
            seen.add(id(entry.original))
            unique.append(entry)
    return unique


def is_sparsified(model: nn.Module) -> bool:
    return any(True for _ in sparse_entries(model)) or hasattr(model, THRESHOLD_NAME)


def get_threshold(model: nn.Module):
    """The model's GlobalThreshold module; a clear error for a model sparsify() did not produce."""
    threshold: Optional[nn.Module] = getattr(model, THRESHOLD_NAME, None)
    inner = getattr(model, "module", None)  # DistributedDataParallel / DataParallel wrap the model
    if threshold is None and isinstance(inner, nn.Module):
        threshold = getattr(inner, THRESHOLD_NAME, None)
    if threshold is None:
        raise ValueError(
            f"{type(model).__name__} has no {THRESHOLD_NAME!r}: it is not a sparsified model "
            "(call fxsparse.sparsify(model, ...) first, or it was already folded)"
        )
    return threshold


@torch.no_grad()
def refresh_threshold_(model: nn.Module) -> None:
    """Bring a sparsified model's tau up to date with its current weights and step (no-op if current)."""
    get_threshold(model)(*[entry.original for entry in unique_entries(model)])


@torch.no_grad()
def layer_densities(model: nn.Module) -> dict[str, tuple[int, int]]:
    """fqn -> (nonzeros, numel) of each pooled weight as the forward sees it (effective weight)."""
    out = {}
    for entry in unique_entries(model):
        weight: Tensor = getattr(entry.module, entry.name)
        out[entry.fqn] = (int(torch.count_nonzero(weight)), weight.numel())
    return out


def realized_sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over the pool, in the effective weights."""
    counts = layer_densities(model).values()
    total = sum(n for _, n in counts)
    return 1.0 - sum(nz for nz, _ in counts) / total if total else 0.0
