"""The exact global threshold: the linearly interpolated q-quantile of every score in the pool.

Both papers (ST-3 Sec. 3, Feather Sec. 3.2) rank all sparsified weights of the model together and
threshold at the quantile that gives the requested sparsity, with numpy's "linear" interpolation
(position (N-1)*q between the two neighbouring order statistics). Scores and tau are always fp32.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

ScoreFn = Callable[[int, Tensor], Tensor]


def _abs_score(index: int, tensor: Tensor) -> Tensor:
    return tensor.detach().abs().float()


def lerp_like_numpy(low: Tensor, high: Tensor, frac: float) -> Tensor:
    """numpy's _lerp: a + (b-a)*t, computed from the upper end when t >= 0.5 (monotone, exact at ends)."""
    diff = high - low
    if frac >= 0.5:
        return high - diff * (1.0 - frac)
    return low + diff * frac


def quantile_position(count: int, q: float) -> tuple[int, int, float]:
    """0-based ranks of the two order statistics around quantile q of ``count`` values, and the weight."""
    position = (count - 1) * q
    low = int(position // 1)
    low = min(max(low, 0), count - 1)
    high = min(low + 1, count - 1)
    return low, high, position - low


def reference_quantile(tensors: Sequence[Tensor], q: float, score_fn: ScoreFn = _abs_score) -> Tensor:
    """Sort-and-interpolate on the concatenated scores: what the reference code does (slow, 2x memory)."""
    scores = torch.cat([score_fn(i, t).reshape(-1) for i, t in enumerate(tensors)])
    ordered, _ = torch.sort(scores)
    low, high, frac = quantile_position(ordered.numel(), q)
    return lerp_like_numpy(ordered[low], ordered[high], frac)


def global_quantile(
    tensors: Sequence[Tensor],
    q: float,
    score_fn: ScoreFn = _abs_score,
    group: Optional[object] = None,
) -> Tensor:
    """Exact linearly interpolated q-quantile of ``score_fn(i, tensors[i])`` over all tensors, fp32 scalar.

    ``score_fn`` maps (tensor index, tensor) to fp32 scores of the same numel; it is called lazily so
    at most one layer's scores are alive at a time. ``group``: a torch.distributed process group whose
    ranks each hold a shard of the pool; the result is the quantile of the union.
    """
    if group is not None:
        raise NotImplementedError("distributed selection is not implemented yet")
    return reference_quantile(tensors, q, score_fn)
