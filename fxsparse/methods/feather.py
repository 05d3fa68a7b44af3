"""Feather (Glentis Georgoulakis, Retsinas & Maragos, BMVC 2023, arXiv:2310.02448).

Forward (METHODS.md sec. 2, p = 3): w_eff = sign(w) (|w|^p - T^p)^(1/p) where |w| > T, else 0,
computed in fp32 outside autograd. Backward: dL/dw = dL/dw_eff * (1 where |w| > T, theta elsewhere),
theta = 0.5 when the final sparsity exceeds 0.95, else 1.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from .base import Method, register_method, unless_dense


@register_method("feather")
@dataclasses.dataclass(frozen=True)
class Feather(Method):
    """Feather's p-norm thresholding with a theta-scaled straight-through gradient."""

    theta: Optional[float] = None  # None: the paper's rule, resolved from the final sparsity
    p: float = 3.0

    scales_gradient = True

    def resolve(self, final_sparsity: float) -> "Feather":
        if self.theta is not None:
            return self
        return dataclasses.replace(self, theta=0.5 if final_sparsity > 0.95 else 1.0)

    def effective(self, weight: Tensor, tau: Tensor) -> Tensor:
        magnitude = weight.detach().float().abs()
        keep = magnitude > tau
        # clamp before the root: the discarded branch would otherwise hold NaN (negative ** (1/p))
        shrunk = (magnitude.pow(self.p) - tau.float().pow(self.p)).clamp_min(0).pow(1.0 / self.p)
        out = torch.where(keep, torch.sign(weight.detach().float()) * shrunk, torch.zeros_like(shrunk))
        return unless_dense(tau, weight, out.to(weight.dtype))

    def gradient_scale(self, weight: Tensor, tau: Tensor) -> Tensor:
        theta = 1.0 if self.theta is None else self.theta
        pruned = (weight.detach().float().abs() <= tau) & (tau > 0)
        return torch.where(pruned, theta, 1.0)
