"""Fold each eval BatchNorm2d that directly follows a conv into that conv (zeros stay zeros).

w' = w * s[o], b' = b * s + (beta - mean * s) with s = gamma / sqrt(var + eps): the standard conv-BN
fusion, done on the torch.fx graph so that only a conv whose single user is the BatchNorm is touched.
timm's BatchNormAct2d (a BatchNorm2d followed by its dropout and activation) is folded too: its module
becomes its dropout and activation. A folded plain BatchNorm2d becomes nn.Identity, so that the model's own
methods that call the modules directly (timm's forward_features) still compute the folded model.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..trace import trace
from .layers import SparseConv2d, SparseLinear


def batchnorm_scale_shift(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """(s, t) such that bn(y) = s[c] * y + t[c] in eval mode."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale.detach(), shift.detach()


def _fold_into_conv_(conv: nn.Conv2d, scale: Tensor, shift: Tensor) -> None:
    """New weight and bias tensors: the old ones may be shared with another conv (tied weights), which folds
    its own BatchNorm into them."""
    with torch.no_grad():
        weight = conv.weight * scale.view(-1, 1, 1, 1).to(conv.weight.dtype)
        bias = shift if conv.bias is None else conv.bias * scale + shift
        conv.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)


def _foldable(module: nn.Module | None) -> bool:
    return type(module) is nn.Conv2d or isinstance(module, SparseConv2d)


def _timm_batchnorm_act() -> type | None:
    """timm's BatchNormAct2d when timm is imported (a model holding one has imported it)."""
    return getattr(sys.modules.get("timm.layers.norm_act"), "BatchNormAct2d", None)


def _is_batchnorm(module: nn.Module) -> bool:
    """torch's BatchNorm2d, or timm's BatchNormAct2d (the same normalization, then its drop and act)."""
    return type(module) is nn.BatchNorm2d or type(module) is _timm_batchnorm_act()


def _after_normalization(bn: nn.Module) -> nn.Module:
    """What ``bn`` computes after its affine normalization: nothing, or BatchNormAct2d's dropout and activation."""
    return nn.Identity() if type(bn) is nn.BatchNorm2d else nn.Sequential(bn.drop, bn.act)


def fold_batchnorms_(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """(the model with its conv-BN pairs fused, the names of the convs that absorbed one).

    The returned model is a torch.fx GraphModule sharing the modules of ``model`` when there was a
    BatchNorm2d to fold, else ``model`` itself. A model torch.fx cannot trace keeps its BatchNorms (with
    a warning): it stays correct, only slower.
    """
    if not any(_is_batchnorm(m) for m in model.modules()):
        return model, []
    if isinstance(model, fx.GraphModule):
        graph_module = model
    else:
        traced = trace(model, extra_leaf_types=(SparseConv2d, SparseLinear))
        if traced.graph_module is None:
            warnings.warn(
                f"fxsparse.accelerate: the model cannot be traced by torch.fx ({traced.error}); its "
                "BatchNorms are not folded into the convs (outputs are unchanged, the model is slower)",
                stacklevel=3,
            )
            return model, []
        graph_module = traced.graph_module
    graph = graph_module.graph
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    fused = []
    for node in list(graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
            continue
        bn = graph_module.get_submodule(node.target)
        source = node.args[0]
        if not _is_batchnorm(bn) or bn.training or bn.running_mean is None or calls[node.target] != 1:
            continue
        if source.op != "call_module" or len(source.users) != 1 or calls[source.target] != 1:
            continue
        conv = graph_module.get_submodule(source.target)
        if not _foldable(conv):
            continue
        scale, shift = batchnorm_scale_shift(bn)
        if isinstance(conv, SparseConv2d):
            conv.fold_batchnorm_(scale, shift)
        else:
            _fold_into_conv_(conv, scale, shift)
        rest = _after_normalization(bn)
        parent, _, child = node.target.rpartition(".")
        setattr(graph_module.get_submodule(parent) if parent else graph_module, child, rest)
        if isinstance(rest, nn.Identity):  # the graph no longer calls it
            node.replace_all_uses_with(source)
            graph.erase_node(node)
        fused.append(str(source.target))
    graph.lint()
    graph_module.recompile()
    return graph_module, fused
