"""Transformer attention on the compiled AVX-512 kernel, when it wins end to end (issue 16).

Once a transformer's linears are sparse, its dense attention is a large share of what is left: BERT-base at
128 tokens spent about 8 of its 45 ms (one thread, AMD EPYC Zen 5) in torch's CPU attention, whose two products
run in MKL at about 50 GMAC/s there (MKL takes its AVX2 path on AMD processors). The kernel
(csrc/attention_avx512.h) computes the same softmax(scale q k^T + mask) v in AVX-512 tiles, 2.4x faster on
BERT-base's shapes, and writes (B, Sq, H, D), the layout the output projection reads.

Hugging Face models reach it through transformers' attention interface: accelerate() registers
``IMPLEMENTATION`` (attention function: :func:`transformers_attention`; masks built as for ``"sdpa"``) and
switches the accelerated copy's configs from ``"sdpa"`` to it, then times the whole model both ways and keeps
the switch only when it wins. A call runs torch's own sdpa path unchanged unless it is plain: no dropout, no
causal flag, no grouped key/value heads, no softcap, position bias or sinks, no attention weights asked for,
float32 outside autograd, a head dimension that is a multiple of 16, and a CPU with AVX-512 and the compiled
kernels. The op ``fxsparse::native_attention`` has a fake kernel, and its reference path is torch's attention.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
from .ops import _LIBRARY, _is_compiling

IMPLEMENTATION = "fxsparse_native"  # the name registered with transformers' attention interfaces
TORCH, NATIVE = "torch attention", "native attention"

_LIBRARY.define("native_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor")

# keyword arguments that change what attention computes, which the kernel does not do: torch's path runs them
_UNSUPPORTED = ("softcap", "position_bias", "s_aux", "sinks", "sliding_window", "output_attentions")


def reference_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """softmax(scale q k^T + mask) v for q (B, H, Sq, D), k and v (B, H, Sk, D), as (B, Sq, H, D): torch's own."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2).contiguous()


def _native_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    module = kernels()
    if module is None or q.dtype != torch.float32 or q.shape[-1] % 16:
        return reference_attention(q, k, v, mask, scale)
    return module.attention(q, k, v, mask, scale)


def _native_attention_fake(q, k, v, mask, scale):
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1], v.shape[-1]))


_LIBRARY.impl("native_attention", _native_attention, "CPU")
torch.library.register_fake("fxsparse::native_attention", _native_attention_fake, lib=_LIBRARY)


def kernels():
    """The compiled kernels when they can run attention (AVX-512), else None."""
    module = native.kernels()
    return module if module is not None and module.isa() == "avx512" else None


def native_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """fxsparse::native_attention, called straight on the kernel in a plain eager call."""
    if not _is_compiling() and type(q) is torch.Tensor and not torch.jit.is_tracing():
        module = kernels()
        if module is not None:
            return module.attention(q, k, v, mask, scale)
    return torch.ops.fxsparse.native_attention(q, k, v, mask, scale)


def _plain_call(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask, dropout, is_causal, kwargs) -> bool:
    """Whether transformers' sdpa path would compute plain softmax(scale q k^T + mask) v (module docstring)."""
    if any(kwargs.get(name) for name in _UNSUPPORTED):
        return False
    if (dropout and module.training) or getattr(module, "num_key_value_groups", 1) > 1:
        return False
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if query.shape[2] > 1 and mask is None and causal:  # sdpa's own causal flag (transformers' rule)
        return False
    if mask is not None and mask.dtype not in (torch.bool, torch.float32):
        return False
    tensors = (query, key, value)
    return (
        all(type(t) is torch.Tensor and t.dtype == torch.float32 and t.dim() == 4 for t in tensors)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and query.shape[-1] % 16 == 0
        and query.shape[-1] == key.shape[-1] == value.shape[-1]
        and query.shape[:2] == key.shape[:2] == value.shape[:2]
        and kernels() is not None
    )


def transformers_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention function for ``IMPLEMENTATION``: the kernel for a plain call, else sdpa's."""
    if not _plain_call(module, query, key, value, attention_mask, dropout, is_causal, kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    mask = attention_mask
    if mask is not None and mask.dtype == torch.bool:  # True: attend
        mask = torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, float("-inf"))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return native_attention(query, key, value, mask, scale), None


def _register() -> str | None:
    """Register IMPLEMENTATION with transformers (once); returns why it cannot be, or None."""
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        from transformers.modeling_utils import AttentionInterface
    except ImportError:
        return "transformers has no attention interface here"
    if IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(IMPLEMENTATION, transformers_attention)
        AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    return None


def _sdpa_configs(model: nn.Module) -> list[Any]:
    """The distinct transformers configs in the model that select the "sdpa" attention."""
    configs: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) in ("sdpa", IMPLEMENTATION):
            configs[id(config)] = config
    return list(configs.values())


def _set(configs: list[Any], use_native: bool) -> None:
    for config in configs:
        config._attn_implementation_internal = IMPLEMENTATION if use_native else "sdpa"


def switch_attention_(
    model: nn.Module,
    example_input: Any,
    timer: Callable | None,
    min_speedup: float,
    call_model: Callable[[nn.Module, Any], Any],
    given: bool = False,
) -> dict[str, Any] | None:
    """Run the model's attention on the kernel when it wins end to end by ``min_speedup`` (module docstring), or,
    with no ``timer``, when ``given`` (a plan measured before chose it). Returns what was measured, {"chosen",
    "reason", "ms": {TORCH: .., NATIVE: ..}}, or None for a model without transformers' sdpa attention."""
    configs = _sdpa_configs(model)
    if not configs:
        return None
    why_not = _register() or (None if kernels() is not None else "the compiled kernels need AVX-512 for attention")
    if why_not:
        _set(configs, False)
        return {"chosen": False, "reason": why_not}
    if timer is None:
        _set(configs, given)
        return {"chosen": given, "reason": "as the given plan chose (not timed)"}

    def run(use_native: bool) -> Callable[[], Any]:
        def call() -> Any:
            _set(configs, use_native)
            return call_model(model, example_input)

        return call

    with torch.no_grad():
        times = dict(timer({TORCH: run(False), NATIVE: run(True)}))
    speedup = times[TORCH] / times[NATIVE]
    chosen = speedup >= min_speedup
    _set(configs, chosen)
    relation = ">=" if chosen else "<"
    return {
        "chosen": chosen,
        "reason": f"{speedup:.2f}x of torch's attention end to end ({relation} {min_speedup})",
        "ms": {k: 1e3 * v for k, v in times.items()},
    }


__all__ = ["switch_attention_", "transformers_attention", "reference_attention", "native_attention", "IMPLEMENTATION"]
