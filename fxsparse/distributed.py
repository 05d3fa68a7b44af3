"""Training a sparsified model on many processes (torch.distributed).

Data parallel (DistributedDataParallel): nothing to do. Every rank holds every weight, the
gradients are averaged before the optimizer step, so every rank computes the same tau and the same
masks from identical weights.

Sharded (FSDP2 ``fully_shard``, or any model whose pooled weights are DTensors): each rank holds a
shard of each weight. The threshold node then passes only the rank's local shards to
`fxsparse.threshold.global_quantile` with a process group, whose per-bin counts are summed across
ranks: every rank gets the exact global tau of the union, bit-identical to a single process holding
the whole model, and never gathers a weight. This happens automatically when the threshold node sees
DTensor weights; `shard_pool_` sets the group explicitly (for a 2-D mesh with more than one sharded
dimension, or to check a model ahead of time).

A weight that is not sharded while others are (e.g. the root module's weights, unsharded by FSDP2
before the threshold node runs) is held whole by every rank: it is counted once, by rank 0 of the
group, so the union is still exactly the pool.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from torch import Tensor, nn

ScoreFn = Callable[[int, Tensor], Tensor]


def _dtensor_type():
    """DTensor, if torch.distributed.tensor was imported (no DTensor can exist otherwise; importing it costs ~1 s)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_sharded(tensor: Tensor) -> bool:
    """True for a DTensor (an FSDP2 sharded parameter, or a tensor-parallel weight)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def any_sharded(tensors: Sequence[Tensor]) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(t, dtensor) for t in tensors)


def shard_group(tensor: Tensor):
    """The process group over which ``tensor`` (a DTensor) is sharded.

    A 1-D mesh (FSDP2) gives its one group; a 2-D mesh (HSDP: replicate x shard) the group of the one
    sharded dimension, so that each replica group computes the same tau on its own.
    """
    from torch.distributed.tensor import Shard

    mesh = tensor.device_mesh
    sharded_dims = [d for d, p in enumerate(tensor.placements) if isinstance(p, Shard)]
    if mesh.ndim == 1:
        return mesh.get_group()
    if len(sharded_dims) == 1:
        return mesh.get_group(sharded_dims[0])
    raise ValueError(
        f"cannot infer the threshold's process group from a DTensor with placements {tensor.placements} on a "
        f"{mesh.ndim}-D mesh; pass it explicitly: fxsparse.distributed.shard_pool_(model, group)"
    )


def local_pool(
    weights: Sequence[Tensor], score: Callable[[int, Tensor], Tensor], group: object | None
) -> tuple[list[Tensor], ScoreFn, object]:
    """The rank's part of a sharded pool, a score function that sees each weight's global shape, and the group.

    ``score(index, weight)`` is the method's score of pooled weight ``index`` (it may depend on the weight's
    shape, as ST-3-sigma's does; GlobalThreshold.layer_score): it is
    evaluated on the DTensor, whose pointwise ops run on the local shard without communication, so a
    shard is scored exactly as the same entries of the whole weight are.
    """
    import torch.distributed as dist

    if group is None:
        sharded = [w for w in weights if is_sharded(w)]
        if not sharded:
            raise ValueError("local_pool needs a process group or DTensor weights")
        group = shard_group(sharded[0])
    first_rank = dist.get_rank(group) == 0
    originals = list(weights)
    tensors: list[Tensor] = []
    for w in originals:
        if is_sharded(w):
            tensors.append(w.to_local())
        elif first_rank:
            tensors.append(w)  # whole on every rank: counted once
        else:
            tensors.append(w.new_empty((0,)))

    def score_fn(index: int, tensor: Tensor) -> Tensor:
        if tensor.numel() == 0:
            return tensor.detach().float()
        original = originals[index]
        scores = score(index, original.detach())
        return scores.to_local() if is_sharded(scores) else scores

    return tensors, score_fn, group


def storage_key(tensor: Tensor):
    """What identifies a weight's storage for the threshold's recompute check (DTensors have no data_ptr)."""
    if is_sharded(tensor):
        tensor = tensor.to_local()
    return tensor.data_ptr()


def shard_pool_(model: nn.Module, group: object | None = None) -> None:
    """Make the model's threshold reduce its counts over ``group`` (each rank holds a shard of the pool).

    Call it after sharding (``fully_shard``). ``group=None`` infers the group from the model's DTensor
    weights; a model whose pooled weights are all plain tensors needs an explicit group.
    """
    from .pool import get_threshold

    threshold = get_threshold(model)
    _check_sharded_modules_are_called(model)
    if group is None:
        sharded = [p for p in (model.get_parameter(path) for path in threshold.pool_paths) if is_sharded(p)]
        if not sharded:
            raise ValueError(
                "none of the pooled weights is sharded (no DTensor parameter): call shard_pool_ after "
                "fully_shard(...), or pass the process group explicitly"
            )
        group = shard_group(sharded[0])
    threshold.process_group = group
    threshold.invalidate_()


def _check_sharded_modules_are_called(model: nn.Module) -> None:
    """FSDP2 gathers a module's weights in its forward hooks; a torch.fx graph calls only its leaf modules.

    A block that the traced graph inlines (its children are called directly) never runs its hooks,
    and the forward then fails deep inside a convolution with "mixed torch.Tensor and DTensor".
    """
    import torch.fx as fx

    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return
    if not isinstance(model, fx.GraphModule):
        return  # a module-walked (untraceable) model calls its submodules as written
    called = {node.target for node in model.graph.nodes if node.op == "call_module"}
    never_called = [
        name
        for name, module in model.named_modules()
        if name
        and isinstance(module, FSDPModule)
        and not any(name == target or name.startswith(target + ".") for target in called)
    ]
    if never_called:
        raise ValueError(
            f"fully_shard was applied to {never_called}, which the traced model never calls: torch.fx inlines "
            "their forward and calls their children directly, so FSDP2 never gathers their weights. Keep such "
            "blocks whole in the graph with fxsparse.sparsify(model, ..., leaf_modules=(YourBlock,)), or apply "
            "fully_shard to modules the graph calls (print(model.code) lists them)"
        )
