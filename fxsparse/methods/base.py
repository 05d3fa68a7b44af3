"""The Method protocol, one autograd function shared by all methods, and the method registry.

A method says three things about one weight tensor w given the global threshold tau:
  score(w)              what is ranked globally (fp32); tau is a quantile of the pooled scores
  effective(w, tau)     the forward weight (no autograd); entries with score <= tau are exactly zero
  scale_gradient(g, w, tau) dL/dw from g = dL/dw_eff, when ``scales_gradient`` (else identity: STE)
effective() is only called with tau > 0: before the ramp (tau <= 0, "prune nothing") the
parametrization returns w itself, decided on the host without touching the weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator adding a Method to the registry under ``name``; a duplicate name raises."""

    def decorate(cls: type) -> type:
        if name in METHODS:
            raise ValueError(f"a sparsity method named {name!r} is already registered ({METHODS[name].__qualname__})")
        cls.name = name
        METHODS[name] = cls
        return cls

    return decorate


def get_method(method: str | Method) -> Method:
    """Resolve a method name or instance; unknown names list what is available."""
    if isinstance(method, Method):
        return method
    if isinstance(method, str) and method.lower() in METHODS:
        return METHODS[method.lower()]()
    available = ", ".join(sorted(METHODS))
    raise ValueError(f"unknown sparsity method {method!r}; available methods: {available} (or pass a Method instance)")


class _SparseWeightFunction(torch.autograd.Function):
    """Forward: method.effective(w, tau). Backward: dL/dw = dL/dw_eff * method.gradient_scale(w, tau)."""

    @staticmethod
    def forward(ctx, weight: Tensor, tau: Tensor, method: Method) -> Tensor:
        ctx.method = method
        if method.scales_gradient:
            ctx.save_for_backward(weight, tau)
        return method.effective(weight, tau)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if not ctx.method.scales_gradient:
            return grad_output, None, None
        weight, tau = ctx.saved_tensors
        return ctx.method.scale_gradient(grad_output, weight, tau), None, None


@dataclasses.dataclass(frozen=True)
class Method:
    """Base of every sparsity method: |w| scores, hard-mask forward, identity gradient."""

    name: ClassVar[str] = "base"

    @property
    def scales_gradient(self) -> bool:
        """False when the backward is the plain identity (then nothing is saved for it)."""
        return False

    def score_scale(self, weight: Tensor) -> float:
        """Per-layer factor c on |w| in the global ranking (1; ST-3-sigma: sqrt of the shape sum)."""
        return 1.0

    def score(self, weight: Tensor) -> Tensor:
        """What is ranked globally: |w| * score_scale(w), in fp32."""
        magnitude = weight.detach().abs().float()
        scale = self.score_scale(weight)
        return magnitude if scale == 1.0 else magnitude * scale

    def layer_threshold(self, weight: Tensor, tau: Tensor) -> Tensor:
        """The threshold t on raw |w| with  |w| > t  <=>  score > tau  (strict, as both papers mask)."""
        scale = self.score_scale(weight)
        return tau if scale == 1.0 else magnitude_threshold(tau, scale)

    def keep_mask(self, weight: Tensor, tau: Tensor) -> Tensor:
        """Entries that survive: score > tau."""
        return weight.detach().abs().float() > self.layer_threshold(weight, tau)

    def effective(self, weight: Tensor, tau: Tensor) -> Tensor:
        raise NotImplementedError

    def scale_gradient(self, grad: Tensor, weight: Tensor, tau: Tensor) -> Tensor:
        """dL/dw from dL/dw_eff; only called when ``scales_gradient``."""
        return grad

    def resolve(self, final_sparsity: float) -> Method:
        """Fill in settings that depend on the run (e.g. Feather's theta); default: unchanged."""
        return self

    def apply(self, weight: Tensor, tau: Tensor) -> Tensor:
        return _SparseWeightFunction.apply(weight, tau, self)


def magnitude_threshold(tau: Tensor, scale: float) -> Tensor:
    """The largest fp32 t with fl(t * scale) <= tau, so that |w| > t exactly when fl(|w| * scale) > tau.

    fl(x * scale) is non-decreasing in x, so the scaled-score mask is a plain magnitude mask; tau / scale
    lands within an ulp or two of t, and a few scalar steps make it exact (no host sync).
    """
    tau = tau.float()
    t = tau / scale
    for _ in range(2):
        t = torch.where(t * scale > tau, torch.nextafter(t, torch.full_like(t, -float("inf"))), t)
    for _ in range(2):
        up = torch.nextafter(t, torch.full_like(t, float("inf")))
        t = torch.where(up * scale <= tau, up, t)
    return t
