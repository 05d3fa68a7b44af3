"""Feather (Glentis Georgoulakis, Retsinas & Maragos, BMVC 2023, arXiv:2310.02448).

Forward (docs/METHODS.md sec. 2, p = 3): w_eff = sign(w) (|w|^p - T^p)^(1/p) where |w| > T, else 0,
computed in fp32 outside autograd. Backward: dL/dw = dL/dw_eff * (1 where |w| > T, theta elsewhere),
theta = 0.5 when the final sparsity exceeds 0.95, else 1 (then the backward is the plain identity).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .base import Method, register_method


@register_method("feather")
@dataclasses.dataclass(frozen=True)
class Feather(Method):
    """Feather's p-norm thresholding with a theta-scaled straight-through gradient."""

    theta: float | None = None  # None: the paper's rule, resolved from the final sparsity
    p: float = 3.0

    def resolve(self, final_sparsity: float) -> Feather:
        if self.theta is not None:
            return self
        return dataclasses.replace(self, theta=0.5 if final_sparsity > 0.95 else 1.0)

    @property
    def scales_gradient(self) -> bool:
        return self.theta is not None and self.theta != 1.0

    def effective(self, weight: Tensor, tau: Tensor) -> Tensor:
        # In the contiguous order whatever the weight's memory format: pow's vectorised and scalar loops
        # differ in the last bit, and which elements take which loop depends on their order in memory, so
        # a channels_last weight would otherwise differ by one ulp on a few elements.
        w = weight.detach().float().contiguous()
        # |w|^p - T^p, clamped at 0 before the root: a negative base would give NaN (and the pruned
        # entries become exactly 0, since 0^(1/p) = 0). One allocation, in-place passes.
        shrunk = w.abs().pow_(self.p).sub_(tau.float().pow(self.p)).clamp_min_(0).pow_(1.0 / self.p)
        shrunk.copysign_(w)
        if weight.is_contiguous():
            return shrunk.to(weight.dtype)
        return torch.empty_like(weight).copy_(shrunk)  # back to the weight's own layout (the conv keeps it)

    def scale_gradient(self, grad: Tensor, weight: Tensor, tau: Tensor) -> Tensor:
        return torch.where(weight.detach().float().abs() > tau, grad, grad * self.theta)
