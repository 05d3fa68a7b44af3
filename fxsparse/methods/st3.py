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

import torch
from torch import Tensor

from .base import Method, register_method, unless_dense


def soft_threshold_rescaled(weight: Tensor, layer_tau: Tensor, keep: Tensor) -> Tensor:
    """ST-3's effective weight for a per-layer threshold on raw |w| and a given keep mask (fp32 maths)."""
    magnitude = weight.detach().float().abs()
    shrunk = torch.sign(weight.detach().float()) * (magnitude - layer_tau).clamp_min(0) * keep
    per_channel = magnitude.flatten(1) if magnitude.dim() > 1 else magnitude.view(1, -1)
    kept = (magnitude * keep).flatten(1) if magnitude.dim() > 1 else (magnitude * keep).view(1, -1)
    ratio = (kept.mean(dim=1) + 1e-6) / (per_channel.mean(dim=1) + 1e-6)
    scale = 1.01 / (ratio + 0.01)
    scale = scale.view(-1, *([1] * (weight.dim() - 1))) if weight.dim() > 1 else scale
    return (shrunk * scale).to(weight.dtype)


@register_method("st3")
@dataclasses.dataclass(frozen=True)
class St3(Method):
    """ST-3: soft threshold + per-channel rescale forward, identity gradient."""

    def effective(self, weight: Tensor, tau: Tensor) -> Tensor:
        keep = self.keep_mask(weight, tau)
        return unless_dense(tau, weight, soft_threshold_rescaled(weight, tau, keep))


def shape_sum(weight: Tensor) -> int:
    """S_l of ST-3-sigma: the SUM of the weight tensor's shape dims (not its fan-in)."""
    return int(sum(weight.shape))


@register_method("st3sigma")
@dataclasses.dataclass(frozen=True)
class St3Sigma(St3):
    """ST-3-sigma: scores |w| sqrt(S_l); layer l thresholds raw |w| at tau / sqrt(S_l)."""

    def score(self, weight: Tensor) -> Tensor:
        return weight.detach().abs().float() * math.sqrt(shape_sum(weight))

    def effective(self, weight: Tensor, tau: Tensor) -> Tensor:
        keep = self.keep_mask(weight, tau)
        layer_tau = tau / math.sqrt(shape_sum(weight))
        return unless_dense(tau, weight, soft_threshold_rescaled(weight, layer_tau, keep))
