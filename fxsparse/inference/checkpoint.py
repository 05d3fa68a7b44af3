"""Read a CSR checkpoint (docs/FORMAT.md) tensor by tensor, without densifying its sparse weights.

fxsparse.load_csr returns dense tensors; building an accelerated model needs the CSR parts themselves.
The header is read and checked by fxsparse.read_csr_metadata; each part read here is checked again
(CRC-32, dtype, lengths, index ranges and order) before it is used, since a checkpoint is untrusted input.
Also ``skeleton()``: build a model with its parameters on the meta device (no memory) and real buffers.
"""

from __future__ import annotations

import contextlib
import math
import os
import zlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..export import CSR_PARTS, SEPARATOR, CsrFormatError, read_csr_metadata


@contextlib.contextmanager
def skeleton() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no init cost) and keep real
    buffers (e.g. transformers' position_ids), ready for fxsparse.accelerate_checkpoint to fill.

        with fxsparse.inference.skeleton():
            model = timm.create_model("resnet50")
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param) -> None:
        if isinstance(param, nn.Parameter) and type(param) is nn.Parameter and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _crc32(tensor: Tensor) -> int:
    """zlib CRC-32 of the tensor's raw bytes, as docs/FORMAT.md defines the "crc32" entries."""
    if not tensor.numel():
        return zlib.crc32(b"")
    return zlib.crc32(tensor.reshape(-1).contiguous().view(torch.uint8).numpy())


class CsrCheckpoint:
    """An open CSR checkpoint: its metadata document, and its tensors read one at a time, checked."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.document: dict[str, Any] = read_csr_metadata(self.path)
        self.entries: dict[str, dict[str, Any]] = self.document.get("tensors", {})
        self._handle = None

    def __enter__(self) -> CsrCheckpoint:
        from safetensors import SafetensorError, safe_open

        try:
            self._context = safe_open(self.path, framework="pt", device="cpu")
            self._handle = self._context.__enter__()
        except SafetensorError as exc:
            raise CsrFormatError(f"{self.path!r} cannot be opened as safetensors ({exc}); the file is corrupt") from exc
        self._keys = set(self._handle.keys())
        return self

    def __exit__(self, *exc_info) -> None:
        self._context.__exit__(*exc_info)
        self._handle = None

    def _fail(self, name: str, what: str) -> None:
        raise CsrFormatError(f"{self.path!r} is corrupt: tensor {name!r}: {what}; re-export it")

    def _read(self, key: str, name: str) -> Tensor:
        if key not in self._keys:
            self._fail(name, f"its stored part {key!r} is missing")
        tensor = self._handle.get_tensor(key)
        expected = self.document.get("crc32", {}).get(key)
        if expected is not None and _crc32(tensor) != expected:
            self._fail(name, f"{key} fails its CRC32 check")
        return tensor

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self.entries[name]["shape"])

    def is_csr(self, name: str) -> bool:
        return self.entries.get(name, {}).get("layout") == "csr"

    def dense(self, name: str) -> Tensor:
        """A tensor stored dense, checked against its metadata."""
        entry = self.entries[name]
        if entry.get("layout") != "dense":
            raise ValueError(f"{name!r} is stored as {entry.get('layout')!r}, not dense")
        tensor = self._read(name, name)
        if tuple(tensor.shape) != self.shape(name) or str(tensor.dtype).removeprefix("torch.") != entry.get("dtype"):
            self._fail(
                name,
                f"stored as {tensor.dtype} {list(tensor.shape)}, its metadata says "
                f"{entry.get('dtype')} {list(self.shape(name))}",
            )
        return tensor

    def csr(self, name: str) -> tuple[Tensor, Tensor, Tensor]:
        """(crow, col, values) of a CSR weight's 2-D view, as stored, checked to describe its shape."""
        entry = self.entries[name]
        shape = self.shape(name)
        rows, cols = shape[0], math.prod(shape[1:])
        crow, col, values = (self._read(f"{name}{SEPARATOR}{part}", name) for part in CSR_PARTS)
        for part, tensor in (("crow_indices", crow), ("col_indices", col)):
            if tensor.is_floating_point() or tensor.dtype == torch.bool or tensor.dim() != 1:
                self._fail(name, f"{part} must be a 1-D integer tensor, got {tensor.dtype} {list(tensor.shape)}")
        if values.dim() != 1 or str(values.dtype).removeprefix("torch.") != entry.get("dtype"):
            self._fail(name, f"values are {values.dtype} {list(values.shape)}, expected 1-D {entry.get('dtype')}")
        stored = crow, col
        crow, col = crow.to(torch.int64), col.to(torch.int64)
        nnz = values.numel()
        if crow.numel() != rows + 1 or col.numel() != nnz or int(crow[0]) != 0 or int(crow[-1]) != nnz:
            self._fail(
                name,
                f"crow_indices ({crow.numel()} entries, {int(crow[0])}..{int(crow[-1])}) do not fit "
                f"{rows} rows and {nnz} values ({col.numel()} columns)",
            )
        if bool((crow.diff() < 0).any()):
            self._fail(name, "crow_indices decrease")
        if nnz and (int(col.min()) < 0 or int(col.max()) >= cols):
            self._fail(name, f"a column index is outside [0, {cols})")
        row = torch.repeat_interleave(torch.arange(rows), crow.diff())
        if bool(((row.diff() == 0) & (col.diff() <= 0)).any()):
            self._fail(name, "column indices are not strictly increasing within a row")
        return stored[0], stored[1], values
