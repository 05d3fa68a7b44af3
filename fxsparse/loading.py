"""Rebuild a model from a name and a checkpoint, for the command-line tools (tools/export.py, tools/flops.py).

A timm model name or an importable ``module:callable``, plus a state_dict of a plain, folded or
sparsified model (a sparsified one is rebuilt with fxsparse.sparsify and folded).
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .export import NoCsrMetadata, is_sparsified_key, load_checked_, load_csr, load_csr_into_


def create_model(spec: str, num_classes: Optional[int] = None) -> nn.Module:
    """A timm model name ("resnet50") or "package.module:callable" (called with no arguments)."""
    if ":" in spec:
        module_name, _, attribute = spec.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"cannot import {module_name!r} for model {spec!r}: {exc}") from exc
        for part in attribute.split("."):
            if not hasattr(target, part):
                raise ValueError(f"{module_name!r} has no attribute {attribute!r} (model {spec!r})")
            target = getattr(target, part)
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        model = target if isinstance(target, nn.Module) else target(**kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"{spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
        return model
    import timm

    if not timm.is_model(spec):
        raise ValueError(
            f"unknown model {spec!r}: not a timm model name (timm.list_models('*{spec}*') lists close ones) "
            "and not 'package.module:callable'"
        )
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    return timm.create_model(spec, pretrained=False, **kwargs)


def _is_safetensors(path: str) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(16)
    return path.endswith(".safetensors") or (len(head) >= 9 and head[8:9] == b"{")


def read_state_dict(path: Union[str, os.PathLike]) -> dict[str, Tensor]:
    """A state_dict from a CSR checkpoint, a plain safetensors file or a torch checkpoint (.pt/.pth);
    a torch checkpoint may wrap it under "state_dict", "model" or "model_state_dict"."""
    path = os.fspath(path)
    if _is_safetensors(path):
        try:
            return load_csr(path)
        except NoCsrMetadata:
            pass
        from safetensors.torch import load_file

        return load_file(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path!r} holds a {type(checkpoint).__name__}, not a state_dict")
    state = dict(checkpoint)
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_model(
    spec: str,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    *,
    method: Optional[str] = None,
    sparsity: Optional[float] = None,
    num_classes: Optional[int] = None,
) -> tuple[nn.Module, Optional[str]]:
    """(plain model with the checkpoint's weights, the method when the checkpoint was sparsified).

    A checkpoint of a sparsified model (keys like "conv1.parametrizations.weight.original") is loaded
    into fxsparse.sparsify(model, method, sparsity) and folded, so the result is always a plain model.
    """
    model = create_model(spec, num_classes)
    if checkpoint is None:
        return model.eval(), None
    if _is_safetensors(os.fspath(checkpoint)):
        try:  # a CSR checkpoint: its declared shapes are checked against the model before anything is allocated
            load_csr_into_(model, checkpoint)
            return model.eval(), None
        except NoCsrMetadata:
            pass
    state = read_state_dict(checkpoint)
    sparsified_keys = [k for k in state if is_sparsified_key(k)]
    if sparsified_keys:
        if method is None:
            raise ValueError(
                f"{os.fspath(checkpoint)!r} holds a sparsified model (keys like "
                f"{sparsified_keys[0]!r}); "
                "say which method it was trained with (--method st3sigma, or method=...) so it can be "
                "rebuilt and folded"
            )
        from .api import sparsify
        from .fold import fold

        kwargs = {} if sparsity is None else {"sparsity": sparsity}
        sparse = sparsify(model, method=method, **kwargs)
        sparse.load_state_dict(state)
        return fold(sparse).eval(), method
    load_checked_(model, state, os.fspath(checkpoint))
    return model.eval(), None
