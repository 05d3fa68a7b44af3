"""Baselines in the same harness (docs/METHODS.md sec. 3).

gmp: gradual magnitude pruning (Zhu & Gupta, arXiv:1710.01878): w_eff = w * m, pruned weights get no gradient.
ste: hard-threshold straight-through estimator: w_eff = w * m, identity gradient to every weight.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from .base import Method, register_method


@register_method("ste")
@dataclasses.dataclass(frozen=True)
class Ste(Method):
    """Hard mask forward, identity gradient (the "no soft threshold" ablation)."""

    def effective(self, weight: Tensor, tau: Tensor) -> Tensor:
        # w * m in one allocation: |w| > t written as 1.0/0.0 in place, then times w
        w = weight.detach()
        return w.abs().float().gt_(self.layer_threshold(weight, tau)).to(w.dtype).mul_(w)


@register_method("gmp")
@dataclasses.dataclass(frozen=True)
class Gmp(Ste):
    """Hard mask forward, and the mask's own gradient: dL/dw = dL/dw_eff * m."""

    @property
    def scales_gradient(self) -> bool:
        return True

    def scale_gradient(self, grad: Tensor, weight: Tensor, tau: Tensor) -> Tensor:
        return grad * self.keep_mask(weight, tau)
