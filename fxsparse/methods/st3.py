"""ST-3 and ST-3-sigma (Vanderschueren & De Vleeschouwer, WACV 2023, arXiv:2212.01076).

Forward (docs/METHODS.md sec. 1): soft threshold u = sign(w) max(|w| - tau, 0) of the kept entries
(m = |w| > tau), rescaled per output channel c by s_c = 1.01 / (r_c + 0.01) with
r_c = (mean_j |w_cj| m_cj + 1e-6) / (mean_j |w_cj| + 1e-6). Backward: plain straight-through.
ST-3-sigma ranks |w| sqrt(S_l), S_l the sum of the weight's shape dims, and thresholds layer l at
tau / sqrt(S_l) on raw |w| (made exact: see Method.layer_threshold).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from .base import Method, register_method


def soft_threshold_rescaled(weight: Tensor, layer_tau: Tensor) -> Tensor:
    """ST-3's effective weight for the threshold ``layer_tau`` on raw |w| (fp32 maths), in w's memory format.

    One allocation and a handful of passes: the kept share of each channel's l1 mass is
    sum_kept |w| = sum max(|w| - t, 0) + t * (number kept), all read off the shrunk tensor. The
    per-channel sums run over a contiguous copy whatever the layout (channels_last included), so every
    memory format gives the same values, bit for bit.
    """
    w = weight.detach().float().contiguous()
    rows = w.shape[0] if w.dim() > 1 else 1
    shrunk = w.abs()
    per_row = shrunk.view(rows, -1)
    mean_magnitude = per_row.mean(dim=1)
    shrunk.sub_(layer_tau).clamp_min_(0)  # > 0 exactly where |w| > t: the mask is implied
    kept_count = torch.count_nonzero(per_row, dim=1)
    kept_mean = (per_row.sum(dim=1) + layer_tau * kept_count) / per_row.shape[1]
    ratio = (kept_mean + 1e-6) / (mean_magnitude + 1e-6)
    scale = 1.01 / (ratio + 0.01)
    shrunk.copysign_(w).view(rows, -1).mul_(scale.view(-1, 1))
    if weight.is_contiguous():
        return shrunk.to(weight.dtype)
    return torch.empty_like(weight).copy_(shrunk)  # back to the weight's layout (empty_like keeps it)


@register_method("st3")
@dataclasses.dataclass(frozen=True)
class St3(Method):
    """ST-3: soft threshold + per-channel rescale forward, identity gradient."""

    def effective(self, weight: Tensor, tau: Tensor) -> Tensor:
        return soft_threshold_rescaled(weight, self.layer_threshold(weight, tau))


def shape_sum(weight: Tensor | tuple[int, ...]) -> int:
    """S_l of ST-3-sigma: the SUM of the weight tensor's shape dims (not its fan-in); a tensor or its shape."""
    return int(sum(weight.shape if isinstance(weight, Tensor) else weight))


@register_method("st3sigma")
@dataclasses.dataclass(frozen=True)
class St3Sigma(St3):
    """ST-3-sigma: scores |w| sqrt(S_l); layer l thresholds raw |w| at tau / sqrt(S_l)."""

    def score_scale(self, weight: Tensor) -> float:
        return math.sqrt(shape_sum(weight))
