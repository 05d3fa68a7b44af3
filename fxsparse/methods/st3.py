"""ST-3 and ST-3-sigma (Vanderschueren & De Vleeschouwer, WACV 2023, arXiv:2212.01076).

Forward (METHODS.md sec. 1): soft threshold u = sign(w) max(|w| - tau, 0) of the kept entries
(m = |w| > tau), rescaled per output channel c by s_c = 1.01 / (r_c + 0.01) with
r_c = (mean_j |w_cj| m_cj + 1e-6) / (mean_j |w_cj| + 1e-6). Backward: plain straight-through.
ST-3-sigma ranks |w| sqrt(S_l), S_l the sum of the weight's shape dims, and thresholds layer l at
tau / sqrt(S_l) on raw |w|.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import Tensor

from .base import Method, register_method


def soft_threshold_rescaled(weight: Tensor, layer_tau: Tensor, keep: Optional[Tensor] = None) -> Tensor:
    """ST-3's effective weight for a threshold on raw |w| (fp32 maths, few passes over the weight).

    ``keep`` overrides the mask |w| > layer_tau (ST-3-sigma ranks scaled scores globally).
    """
    w = weight.detach().float()
    magnitude = w.abs()
    shrunk = (magnitude - layer_tau).clamp_min_(0)  # zero exactly where |w| <= layer_tau
    if keep is None:
        keep = magnitude > layer_tau
    else:
        shrunk.mul_(keep)
    rows = weight.shape[0] if weight.dim() > 1 else 1
    per_row = magnitude.view(rows, -1)
    kept_mean = torch.where(keep.view(rows, -1), per_row, 0.0).mean(dim=1)
    ratio = (kept_mean + 1e-6) / (per_row.mean(dim=1) + 1e-6)
    scale = (1.01 / (ratio + 0.01)).view(-1, *([1] * (weight.dim() - 1))) if weight.dim() > 1 else 1.01 / (ratio + 0.01)
    return torch.copysign(shrunk, w).mul_(scale).to(weight.dtype)


@register_method("st3")
@dataclasses.dataclass(frozen=True)
class St3(Method):
    """ST-3: soft threshold + per-channel rescale forward, identity gradient."""

    def effective(self, weight: Tensor, tau: Tensor) -> Tensor:
        return soft_threshold_rescaled(weight, tau)


def shape_sum(weight: Tensor) -> int:
    """S_l of ST-3-sigma: the SUM of the weight tensor's shape dims (not its fan-in)."""
    return int(sum(weight.shape))


@register_method("st3sigma")
@dataclasses.dataclass(frozen=True)
class St3Sigma(St3):
    """ST-3-sigma: scores |w| sqrt(S_l); layer l thresholds raw |w| at tau / sqrt(S_l)."""

    def score_scale(self, weight: Tensor) -> float:
        return math.sqrt(shape_sum(weight))

    def effective(self, weight: Tensor, tau: Tensor) -> Tensor:
        keep = self.keep_mask(weight, tau)  # ranked on the scaled score: exact global sparsity
        return soft_threshold_rescaled(weight, tau / self.score_scale(weight), keep)
