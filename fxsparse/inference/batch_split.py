"""A batch run a sample at a time, one sample per thread, so that its activations stay in the caches (issue 16).

A model run layer by layer over a batch streams every activation through memory. ResNet-50's 56x56 outputs are
3.2 MB a sample, so 51 MB at batch 16, far more than the caches hold (on the 2-core VM: 1 MiB of L2 a core,
32 MiB of shared L3, about 20-24 GB/s to DRAM). At batch 16 the sparse model was therefore slower per image
than at batch 1 (ResNet-50 90%, two threads: 21.5 against 15.5-19.5 ms an image). Run one sample through the
whole model instead and a layer reads the activation the layer before just wrote, still in the core's caches.
Run one sample on each of torch's threads, each worker's kernels on one thread, and the cores also stop waiting
for each other at the end of every layer. DeepSparse's "tensor columns" take the same idea further: tiles of one
image through several layers.

The split is only taken where nothing can tell the difference:
* the model must be batch-independent. accelerate() checks this on the example: the split output must equal
  the whole batch's (relative error at most ``TOLERANCE``), and changing sample 0 must change sample 0's output
  and no other sample's. Every input tensor and every output tensor must be batch-first.
* it must be faster. The whole model is timed both ways, and the split is kept only when it wins by
  accelerate()'s ``min_speedup``.
* the call itself must be a plain one. A call runs whole when any of these holds:
  - the batch has fewer than 2 samples, or a tensor is not a plain CPU tensor;
  - torch.compile, torch.export, jit or fx is tracing, or a torch function or dispatch mode is active
    (a FLOP counter, for one, would miss the workers' calls);
  - autocast is on;
  - a submodule has forward hooks, which would see chunks.
  The caller's grad and inference modes are carried into the workers.
The results match the whole batch's to float32 rounding, not bitwise: a layer's sums can be grouped differently
at another batch size.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.nn.modules import module as nn_module

from . import native, ops
from .timing import Timer, time_switch

TOLERANCE = 1e-5  # the largest relative difference from the whole batch's output (max |a - b| / max |b|)
WHOLE, SPLIT = "whole batch", "a sample a thread"


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """max |output - reference| / max |reference| (0 for two empty or all-zero tensors that are equal)."""
    if output.shape != reference.shape:
        return float("inf")
    if reference.numel() == 0:
        return 0.0
    output, reference = output.double(), reference.double()
    scale = reference.abs().max().item()
    difference = (output - reference).abs().max().item()
    return difference / scale if scale > 0 else (0.0 if difference == 0 else float("inf"))


def _batch_size(leaves: list[Any]) -> int | None:
    """The common leading size of the tensors among ``leaves`` (None when there is none, or they differ)."""
    sizes = {leaf.shape[0] if leaf.dim() else None for leaf in leaves if isinstance(leaf, torch.Tensor)}
    return sizes.pop() if len(sizes) == 1 else None


def _hooked(model: nn.Module) -> bool:
    """Whether a forward hook other than the root's would see the chunks (global hooks included)."""
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules() if m is not model)


def _plain_call(model: nn.Module, leaves: list[Any]) -> bool:
    """The call-time conditions of the module docstring."""
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    if not tensors or any(type(t) is not torch.Tensor or t.device.type != "cpu" for t in tensors):
        return False
    if torch.jit.is_tracing() or torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled():
        return False
    if torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack():
        return False
    return not _hooked(model)


def _join(outputs: list[Any]) -> Any:
    """The chunks' outputs joined along dim 0 (each leaf a tensor with a leading batch dim); None when they are
    not such a structure."""
    flat = [pytree.tree_flatten(out) for out in outputs]
    spec = flat[0][1]
    if any(s != spec for _, s in flat):
        return None
    columns = list(zip(*(leaves for leaves, _ in flat)))
    if not columns or any(not isinstance(t, torch.Tensor) or t.dim() == 0 for col in columns for t in col):
        return None
    return pytree.tree_unflatten([torch.cat(col) for col in columns], spec)


SPLIT_ATTRIBUTE = "fxsparse_split_batches"  # on the model: True while its batches are split
_WHOLE_FORWARD = "_fxsparse_whole_forward"  # on its class: the forward that runs the whole batch
_pools: dict[int, ThreadPoolExecutor] = {}  # the workers, shared by every split model, by their number
_pools_lock = threading.Lock()
_thread = threading.local()  # .in_worker: a worker's own calls run whole (a nested split would wait on itself)


def _split_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The forward of a split model's class: a plain call on a batch of at least 2 runs each sample through
    the model's own forward, on up to torch.get_num_threads() workers whose kernels run on one thread each
    (module docstring); any other call runs the whole batch."""
    if ops._is_compiling() or not getattr(self, SPLIT_ATTRIBUTE, False):
        # first, and no local holding the function: torch 2.5's export cannot trace that ("reconstruct")
        return getattr(type(self), _WHOLE_FORWARD)(self, *args, **kwargs)
    whole = getattr(type(self), _WHOLE_FORWARD)
    leaves, spec = pytree.tree_flatten((args, kwargs))
    n = _batch_size(leaves)
    if n is None or n < 2 or getattr(_thread, "in_worker", False) or not _plain_call(self, leaves):
        return whole(self, *args, **kwargs)
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def one(i: int) -> Any:
        sample = [leaf[i : i + 1] if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        sample_args, sample_kwargs = pytree.tree_unflatten(sample, spec)
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return whole(self, *sample_args, **sample_kwargs)

    workers = min(torch.get_num_threads(), n)
    outputs = list(map(one, range(n))) if workers == 1 else list(_pool(workers).map(one, range(n)))
    joined = _join(outputs)
    if joined is None:
        raise RuntimeError(
            "fxsparse: the model's output is not batch-first tensors, so its batch cannot be split; "
            f"set model.{SPLIT_ATTRIBUTE} = False"
        )
    return joined


def _pool(workers: int) -> ThreadPoolExecutor:
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(workers, "fxsparse-sample", initializer=_one_thread)
        return _pools[workers]


def _one_thread() -> None:
    """A worker's kernels (and torch's ops) on one intra-op thread."""
    _thread.in_worker = True
    kernels = native.kernels()
    if kernels is not None:
        kernels.set_thread_count(1)


def worker_threads() -> int:
    """The intra-op threads a worker thread gets after _one_thread() (1 where the build allows setting it)."""
    result = []
    thread = threading.Thread(target=lambda: (_one_thread(), result.append(torch.get_num_threads())))
    thread.start()
    thread.join()
    return result[0]


def _perturbed(leaves: list[Any]) -> list[Any] | None:
    """The inputs with sample 0 of the first floating (else integer) tensor changed; None if there is none."""
    tensors = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor) and leaf.numel()]
    chosen = [i for i in tensors if leaves[i].is_floating_point()] or [
        i for i in tensors if not leaves[i].is_floating_point() and not leaves[i].is_complex()
    ]
    if not chosen:
        return None
    changed = list(leaves)
    t = leaves[chosen[0]].clone()
    if t.is_floating_point():
        generator = torch.Generator().manual_seed(0)
        t[0] = torch.randn(t[0].shape, generator=generator, dtype=t.dtype) * (t.std() if t.numel() > 1 else 1) + 1
    else:
        t[0] = t[0].flatten().roll(1).view_as(t[0]) if t[0].numel() > 1 else t[0] + 1
    changed[chosen[0]] = t
    return changed


def _samples(output: Any) -> list[torch.Tensor] | None:
    leaves = [leaf for leaf in pytree.tree_flatten(output)[0] if isinstance(leaf, torch.Tensor)]
    return leaves or None


def _why_not_splittable(
    model: nn.Module, example_input: Any, call: Callable[[Any], Any]
) -> tuple[str, list[torch.Tensor] | None]:
    """("", the whole batch's output tensors) when the model's batch may be split a sample at a time (module
    docstring), else (why not, None). ``call(inputs)`` runs the model (its own forward) on an example-shaped
    input."""
    if native.kernels() is None:
        return "the compiled kernels are unavailable", None
    leaves, spec = pytree.tree_flatten(example_input)
    n = _batch_size(leaves)
    if n is None or n < 2:
        return "the example's tensors do not share a batch of 2 or more", None
    if _hooked(model):
        return "the model has forward hooks", None
    if worker_threads() != 1:
        return "this torch build cannot give a worker thread one intra-op thread", None
    with torch.no_grad():
        whole = _samples(call(example_input))
        changed_leaves = _perturbed(leaves)
        if whole is None or changed_leaves is None:
            return "the example's input or output has no tensors", None
        if any(t.dim() == 0 or t.shape[0] != n for t in whole):
            return "the output is not batch-first", None
        changed = _samples(call(pytree.tree_unflatten(changed_leaves, spec)))
        if changed is None or len(changed) != len(whole):
            return "the output's structure changed with the input", None
        others = max(relative_error(c[1:], w[1:]) for c, w in zip(changed, whole))
        first = max(relative_error(c[:1], w[:1]) for c, w in zip(changed, whole))
        if others > TOLERANCE:
            reason = f"changing sample 0 changed the others' outputs (relative error {others:.1e}): samples interact"
            return reason, None
        if first <= TOLERANCE:
            return "changing sample 0 did not change its output: independence could not be checked", None
    return "", whole


def install(model: fx.GraphModule) -> None:
    """Give the model's class (a GraphModule's own, made for this instance) the splitting forward, off until
    ``model.fxsparse_split_batches`` is True. A copy or a pickle of the model gets a new class: it runs whole."""
    cls = type(model)
    if cls.forward is not _split_forward:
        setattr(cls, _WHOLE_FORWARD, cls.forward)
        cls.forward = _split_forward
    setattr(model, SPLIT_ATTRIBUTE, False)


def is_split(model: nn.Module) -> bool:
    """Whether the model's batches are split (installed and on)."""
    return type(model).forward is _split_forward and bool(getattr(model, SPLIT_ATTRIBUTE, False))


def _set(model: nn.Module, split: bool) -> None:
    setattr(model, SPLIT_ATTRIBUTE, split)


def _install_checked(model: nn.Module, example_input: Any, call_model: Callable[[nn.Module, Any], Any]) -> str:
    """Install the split (off) when the model allows it (module docstring), and check that its split output on
    the example equals the whole batch's; "" then, else why not (the split is then not installed, or left off)."""
    if not isinstance(model, fx.GraphModule):
        return "not a traced model (torch.fx)"
    reason, whole = _why_not_splittable(model, example_input, lambda inputs: call_model(model, inputs))
    if reason:
        return reason
    install(model)
    with torch.no_grad():
        _set(model, True)
        split = _samples(call_model(model, example_input))
        _set(model, False)
    error = max(relative_error(s, w) for s, w in zip(split, whole)) if len(split) == len(whole) else float("inf")
    return f"the split output differs (relative error {error:.1e})" if error > TOLERANCE else ""


def split_batches_(
    model: nn.Module,
    example_input: Any,
    timer: Timer | None,
    min_speedup: float,
    call_model: Callable[[nn.Module, Any], Any],
    given: bool = False,
) -> dict[str, Any]:
    """Split the model's batches when it is allowed and wins end to end (module docstring), or, with no
    ``timer``, when it is allowed and ``given`` (a plan measured before chose it: accelerate's ``paths=``).
    Returns what was measured: {"chosen": bool, "reason": str, "workers": int, "ms": {WHOLE: .., SPLIT: ..}
    (when timed)}."""
    workers = torch.get_num_threads()
    if timer is None and not given:
        return {"chosen": False, "reason": "not timed, and the given plan did not split", "workers": workers}
    reason = _install_checked(model, example_input, call_model)
    if reason:
        return {"chosen": False, "reason": reason, "workers": workers}
    run = lambda: call_model(model, example_input)  # noqa: E731
    switch = lambda on: _set(model, on)  # noqa: E731
    record = time_switch(timer, switch, run, (WHOLE, SPLIT), min_speedup, "the whole batch's speed", given)
    return {**record, "workers": workers}


__all__ = ["split_batches_", "install", "is_split", "relative_error", "SPLIT_ATTRIBUTE"]
