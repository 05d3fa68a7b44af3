"""Transformer attention on the compiled AVX-512 or AVX2 kernel, when it wins end to end (issue 16).

Once a transformer's linears are sparse, its dense attention is a large share of what is left: BERT-base at
128 tokens spent about 8 of its 45 ms (one thread, AMD EPYC Zen 5) in torch's CPU attention, whose two products
run in MKL at about 50 GMAC/s there (MKL takes its AVX2 path on AMD processors). The kernel
(csrc/attention_simd.h) computes the same softmax(scale q k^T + mask) v in AVX-512 tiles, 2.4x faster on
BERT-base's shapes (AVX2 tiles where AVX-512 is missing: 1.24-1.27x on AMD EPYC Zen 3), and writes (B, Sq, H,
D), the layout the output projection reads.

Two kinds of model reach it, and accelerate() times the whole model with and without it and keeps it only
when it wins:
* Hugging Face models, through transformers' attention interface: ``IMPLEMENTATION`` is registered (attention
  function: :func:`transformers_attention`; masks built as for ``"sdpa"``) and the accelerated copy's configs
  are switched from ``"sdpa"`` to it.
* other models: each ``F.scaled_dot_product_attention`` call in the accelerated torch.fx graph becomes a
  :class:`ScaledDotProductAttention` module, and a submodule whose own forward calls it (timm's ViT
  ``Attention``, a leaf of the whole model's graph as it branches on ``self.training``) is wrapped in
  :class:`AttentionOnKernel`, which runs it unchanged under a torch function mode that sends its
  ``F.scaled_dot_product_attention`` calls to the kernel (nothing is traced, so its control flow is its own).
A call runs torch's attention unchanged unless it is plain: no dropout, no causal flag, no grouped key/value
heads, no softcap, position bias or sinks, no attention weights asked for, float32 outside autograd, a head
dimension that is a multiple of 16, and a CPU with AVX-512 or AVX2 and the compiled kernels. The op
``fxsparse::native_attention`` has a fake kernel, and its reference path is torch's attention.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from . import native
from .ops import _LIBRARY, _is_compiling
from .timing import Timer, time_switch

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
    takes = q.dtype == torch.float32 and q.shape[-1] % 16 == 0 and (mask is None or mask.dtype == torch.float32)
    if module is None or not takes:
        return reference_attention(q, k, v, mask, scale)
    return module.attention(q, k, v, mask, scale)


def _native_attention_fake(q, k, v, mask, scale):
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1], v.shape[-1]))


_LIBRARY.impl("native_attention", _native_attention, "CPU")
torch.library.register_fake("fxsparse::native_attention", _native_attention_fake, lib=_LIBRARY)


def kernels():
    """The compiled kernels when they can run attention (AVX-512 or AVX2), else None."""
    module = native.kernels()
    return module if module is not None and module.isa() in ("avx512", "avx2") else None


def native_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """fxsparse::native_attention, called straight on the kernel in a plain eager call."""
    if not _is_compiling() and type(q) is torch.Tensor and not torch.jit.is_tracing():
        module = kernels()
        if module is not None:
            return module.attention(q, k, v, mask, scale)
    return torch.ops.fxsparse.native_attention(q, k, v, mask, scale)


def _kernel_takes(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> bool:
    """Whether the kernel computes this attention: float32 (B, H, S, D) tensors outside autograd, one key/value
    head per query head, D a multiple of 16, a bool or float32 mask, and the kernel at hand."""
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


def _kernel_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float | None) -> Tensor:
    """The kernel's (B, Sq, H, D) attention, a boolean mask (True: attend) made additive first."""
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, float("-inf"))
    return native_attention(query, key, value, mask, scale if scale is not None else query.shape[-1] ** -0.5)


def _plain_call(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask, dropout, is_causal, kwargs) -> bool:
    """Whether transformers' sdpa path would compute plain softmax(scale q k^T + mask) v (module docstring)."""
    if any(kwargs.get(name) is not None and kwargs.get(name) is not False for name in _UNSUPPORTED):
        return False
    if (dropout and module.training) or getattr(module, "num_key_value_groups", 1) > 1:
        return False
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if query.shape[2] > 1 and mask is None and causal:  # sdpa's own causal flag (transformers' rule)
        return False
    return _kernel_takes(query, key, value, mask)


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
    return _kernel_attention(query, key, value, attention_mask, scaling), None


def _sdpa_on_kernel(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """F.scaled_dot_product_attention on the kernel for a plain call (module docstring), torch's otherwise; the
    kernel's (B, Sq, H, D) result is returned as the (B, H, Sq, D) view torch's has, so a following
    transpose(1, 2).reshape (a ViT's) copies nothing."""
    if not dropout_p and not is_causal and not kwargs.get("enable_gqa") and _kernel_takes(query, key, value, attn_mask):
        return _kernel_attention(query, key, value, attn_mask, scale).transpose(1, 2)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs
    )


def _plain_eager() -> bool:
    return not (_is_compiling() or torch.jit.is_tracing() or fx._symbolic_trace.is_fx_tracing())


class ScaledDotProductAttention(nn.Module):
    """F.scaled_dot_product_attention in an accelerated torch.fx graph: on the kernel when ``native`` is set and
    the call is plain, torch's otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.native = False

    def forward(self, *args, **kwargs):
        if self.native and _plain_eager():
            return _sdpa_on_kernel(*args, **kwargs)
        return F.scaled_dot_product_attention(*args, **kwargs)


class _SdpaOnKernel(TorchFunctionMode):
    """Sends F.scaled_dot_product_attention to _sdpa_on_kernel (thread-local, as torch's modes are)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return _sdpa_on_kernel(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class AttentionOnKernel(nn.Module):
    """A submodule whose forward calls F.scaled_dot_product_attention, run as it is, but with those calls on the
    kernel when ``native`` is set (a torch function mode around its forward, in plain eager calls only)."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.native = False
        self.train(original.training)

    def __getattr__(self, name: str) -> Any:  # the wrapped module's attributes, which its parent may read
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "original":
                raise
            return getattr(self.original, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not (self.native and _plain_eager()):
            return self.original(*args, **kwargs)
        with _SdpaOnKernel():
            return self.original(*args, **kwargs)


def _calls_sdpa(module: nn.Module) -> bool:
    """Whether the module's own forward names F.scaled_dot_product_attention (and no hook watches it)."""
    code = getattr(getattr(type(module), "forward", None), "__code__", None)
    hooked = module._forward_hooks or module._forward_pre_hooks
    return code is not None and "scaled_dot_product_attention" in code.co_names and not hooked


def _graph_attention_modules_(model: nn.Module) -> list[nn.Module]:
    """The model's F.scaled_dot_product_attention calls made switchable (module docstring; once: a model already
    rewritten keeps its modules); returns the switches, ScaledDotProductAttention and AttentionOnKernel modules."""
    if isinstance(model, fx.GraphModule):
        calls = [n for n in model.graph.nodes if n.op == "call_function" and n.target is F.scaled_dot_product_attention]
        for i, node in enumerate(calls):
            name = f"fxsparse_attention_{i}"
            while hasattr(model, name):
                name += "_"
            model.add_submodule(name, ScaledDotProductAttention())
            with model.graph.inserting_after(node):
                replacement = model.graph.call_module(name, node.args, node.kwargs)
            node.replace_all_uses_with(replacement)
            model.graph.erase_node(node)
        if calls:
            model.recompile()
    wrapped = {id(m.original) for m in model.modules() if isinstance(m, AttentionOnKernel)}
    for name, module in list(model.named_modules()):
        ours = isinstance(module, (AttentionOnKernel, ScaledDotProductAttention))
        if name and id(module) not in wrapped and not ours and _calls_sdpa(module):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, AttentionOnKernel(module))
    return [m for m in model.modules() if isinstance(m, (ScaledDotProductAttention, AttentionOnKernel))]


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


def _set(switches: list[Any], use_native: bool) -> None:
    """Point the transformers configs and the graph's attention modules at the kernel, or back at torch."""
    for switch in switches:
        if isinstance(switch, (ScaledDotProductAttention, AttentionOnKernel)):
            switch.native = use_native
        else:
            switch._attn_implementation_internal = IMPLEMENTATION if use_native else "sdpa"


def switch_attention_(
    model: nn.Module,
    example_input: Any,
    timer: Timer | None,
    min_speedup: float,
    call_model: Callable[[nn.Module, Any], Any],
    given: bool = False,
) -> dict[str, Any] | None:
    """Run the model's attention on the kernel when it wins end to end by ``min_speedup`` (module docstring), or,
    with no ``timer``, when ``given`` (a plan measured before chose it). Returns what was measured, {"chosen",
    "reason", "ms": {TORCH: .., NATIVE: ..}}, or None for a model with neither transformers' sdpa attention
    nor F.scaled_dot_product_attention in its graph."""
    configs = _sdpa_configs(model)
    why_not = (_register() if configs else None) or (
        None if kernels() is not None else "the compiled kernels need AVX-512 or AVX2 for attention"
    )
    switches = configs + (_graph_attention_modules_(model) if not why_not else [])
    if not switches:
        return None
    if why_not:
        _set(switches, False)
        return {"chosen": False, "reason": why_not}
    run = lambda: call_model(model, example_input)  # noqa: E731
    relative_to = "torch's attention end to end"
    return time_switch(timer, lambda on: _set(switches, on), run, (TORCH, NATIVE), min_speedup, relative_to, given)


__all__ = [
    "switch_attention_",
    "transformers_attention",
    "ScaledDotProductAttention",
    "AttentionOnKernel",
    "reference_attention",
    "native_attention",
    "IMPLEMENTATION",
]
