"""The Method protocol, one autograd function shared by all methods, and the method registry.

A method says three things about one weight tensor w given the global threshold tau:
  score(w)              what is ranked globally (fp32); tau is a quantile of the pooled scores
  effective(w, tau)     the forward weight (no autograd); entries with score <= tau are exactly zero
  gradient_scale(w, tau) the factor on dL/dw_eff that gives dL/dw, or None for the plain identity (STE)
tau <= 0 means "prune nothing": effective(w, tau) returns w unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, Optional

import torch
from torch import Tensor

METHODS: dict[str, type["Method"]] = {}


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator adding a Method to the registry under ``name``; a duplicate name raises."""

    def decorate(cls: type) -> type:
        if name in METHODS:
            raise ValueError(f"a sparsity method named {name!r} is already registered ({METHODS[name].__qualname__})")
        cls.name = name
        METHODS[name] = cls
        return cls

    return decorate


def get_method(method: "str | Method") -> "Method":
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
    def forward(ctx, weight: Tensor, tau: Tensor, method: "Method") -> Tensor:
        ctx.method = method
        if method.scales_gradient:
            ctx.save_for_backward(weight, tau)
        return method.effective(weight, tau)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if not ctx.method.scales_gradient:
            return grad_output, None, None
        weight, tau = ctx.saved_tensors
        scale = ctx.method.gradient_scale(weight, tau)
        return grad_output * scale.to(grad_output.dtype), None, None


@dataclasses.dataclass(frozen=True)
class Method:
    """Base of every sparsity method: |w| scores, hard-mask forward, identity gradient."""

    name: ClassVar[str] = "base"
    scales_gradient: ClassVar[bool] = False  # True when gradient_scale is not the identity

    def score(self, weight: Tensor) -> Tensor:
        return weight.detach().abs().float()

    def keep_mask(self, weight: Tensor, tau: Tensor) -> Tensor:
        """Entries that survive: score > tau (strict), as both papers define the mask."""
        return self.score(weight) > tau

    def effective(self, weight: Tensor, tau: Tensor) -> Tensor:
        raise NotImplementedError

    def gradient_scale(self, weight: Tensor, tau: Tensor) -> Optional[Tensor]:
        return None

    def resolve(self, final_sparsity: float) -> "Method":
        """Fill in settings that depend on the run (e.g. Feather's theta); default: unchanged."""
        return self

    def apply(self, weight: Tensor, tau: Tensor) -> Tensor:
        return _SparseWeightFunction.apply(weight, tau, self)


def unless_dense(tau: Tensor, weight: Tensor, effective: Tensor) -> Tensor:
    """``effective`` where tau > 0, else ``weight`` itself (no host sync, bitwise identity before the ramp)."""
    return torch.where(tau > 0, effective, weight)
