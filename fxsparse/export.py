"""Sparse CSR checkpoints: save a folded model's state_dict as CSR components in a safetensors file.

Format (docs/FORMAT.md has the full description for other tools):
  * a safetensors file; its ``__metadata__`` holds one key, "fxsparse", a JSON document with the
    format name and version, library and torch versions, method, sparsity and one entry per tensor
    of the state_dict, in state_dict order.
  * a tensor stored sparse ("layout": "csr") is the CSR of its 2-D view (shape[0], prod(shape[1:])),
    e.g. a conv weight (O, I/g, kh, kw) as (O, I/g*kh*kw), in three plain tensors
    "<name>::crow_indices", "<name>::col_indices", "<name>::values"; indices in the smallest of
    uint8, int16, int32, int64 that holds them; values in the tensor's own dtype (lossless).
  * every other tensor ("layout": "dense") is stored as is under its own name: biases, norms, buffers,
    and any weight whose CSR would not be smaller than its dense bytes.
  * a CRC32 of every stored tensor's bytes, so a corrupt file is refused naming the tensor.

Zeros are exact zeros (x != 0): a pruned -0.0 comes back as +0.0, which torch.equal treats as equal.
Files are written to a temporary file in the target directory and renamed, never half-written.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import zlib
from collections import OrderedDict
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .atomic import atomic_write
from .pool import THRESHOLD_NAME, get_threshold, is_sparsified

FORMAT_NAME = "fxsparse-csr"
FORMAT_VERSION = 1
METADATA_KEY = "fxsparse"
SEPARATOR = "::"
CSR_PARTS = ("crow_indices", "col_indices", "values")
PARAMETRIZED_KEY = ".parametrizations."

# the index dtypes tried, smallest first, with the largest value each holds
_INDEX_DTYPES = ((torch.uint8, 255), (torch.int16, 2**15 - 1), (torch.int32, 2**31 - 1), (torch.int64, 2**63 - 1))
_DTYPE_NAMES = {
    torch.float64: "float64", torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
    torch.int64: "int64", torch.int32: "int32", torch.int16: "int16", torch.int8: "int8", torch.uint8: "uint8",
    torch.bool: "bool",
}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
for _name in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"):
    if hasattr(torch, _name):
        _DTYPE_NAMES[getattr(torch, _name)] = _name
        _DTYPES[_name] = getattr(torch, _name)


class CsrFormatError(ValueError):
    """The file is not a readable fxsparse CSR checkpoint (truncated, corrupt, other format or version)."""


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TensorEntry:
    name: str
    layout: str  # "csr" or "dense"
    shape: tuple[int, ...]
    dtype: str
    nnz: int  # nonzeros (for dense integer/bool tensors: numel)
    dense_bytes: int  # numel * itemsize
    stored_bytes: int  # bytes of the stored tensors (CSR: crow + col + values)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class CsrReport:
    """What save_csr wrote: one entry per tensor, the file size and the metadata."""

    path: str
    entries: list[TensorEntry]
    file_bytes: int
    metadata: dict[str, Any]

    @property
    def dense_bytes(self) -> int:
        return sum(e.dense_bytes for e in self.entries)

    @property
    def stored_bytes(self) -> int:
        return sum(e.stored_bytes for e in self.entries)

    @property
    def csr_entries(self) -> list[TensorEntry]:
        return [e for e in self.entries if e.layout == "csr"]

    def table(self, tablefmt: str = "simple", all_tensors: bool = False) -> str:
        """Per-layer lines (the CSR tensors, or all with all_tensors=True) and the totals."""
        from tabulate import tabulate

        shown = self.entries if all_tensors else self.csr_entries
        rows = [
            [e.name, e.layout, "x".join(map(str, e.shape)), e.dtype, f"{e.nnz:,}", f"{1 - e.nnz / e.numel:.4f}",
             f"{e.dense_bytes:,}", f"{e.stored_bytes:,}"]
            for e in shown
        ]
        headers = ["tensor", "layout", "shape", "dtype", "nnz", "sparsity", "dense bytes", "stored bytes"]
        table = tabulate(rows, headers, tablefmt=tablefmt, disable_numparse=True,
                         colalign=("left", "left", "left", "left", "right", "right", "right", "right"))
        dense_layout = len(self.entries) - len(self.csr_entries)
        sparsity = self.metadata.get("sparsity")
        summary = [
            f"wrote {self.path}: {len(self.entries)} tensors, {len(self.csr_entries)} as CSR, {dense_layout} dense",
            f"sparsity {sparsity:.4f} over {self.metadata.get('sparsity_scope')}" if sparsity is not None else "",
            f"tensor bytes: dense {self.dense_bytes:,}, stored {self.stored_bytes:,} "
            f"({self.stored_bytes / max(self.dense_bytes, 1):.4f}x); file {self.file_bytes:,} bytes",
        ]
        return table + "\n\n" + "\n".join(line for line in summary if line)


# ------------------------------------------------------------------------------------------------
# small pure helpers
# ------------------------------------------------------------------------------------------------
def index_dtype(max_value: int) -> torch.dtype:
    """The smallest of uint8, int16, int32, int64 that holds every value in [0, max_value]."""
    for dtype, limit in _INDEX_DTYPES:
        if max_value <= limit:
            return dtype
    raise ValueError(f"index {max_value} does not fit in int64")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _crc32(tensor: Tensor) -> int:
    """zlib CRC-32 of the tensor's raw bytes (C order)."""
    if not tensor.numel():
        return zlib.crc32(b"")
    return zlib.crc32(tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy())


def _view_2d(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def to_csr(tensor: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(crow_indices, col_indices, values) of the 2-D view (shape[0], rest) with the smallest index dtypes."""
    rows, cols = _view_2d(tuple(tensor.shape))
    flat = tensor.detach().reshape(rows, cols)
    row_index, col_index = torch.nonzero(flat, as_tuple=True)  # row-major order: CSR order
    values = flat[row_index, col_index].contiguous()
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(torch.bincount(row_index, minlength=rows), 0)
    nnz = values.numel()
    return (crow.to(index_dtype(nnz)), col_index.to(index_dtype(max(cols - 1, 0))), values)


def csr_bytes(shape: tuple[int, ...], nnz: int, value_itemsize: int) -> int:
    """Bytes of the CSR components to_csr would produce for a tensor of ``shape`` with ``nnz`` nonzeros."""
    rows, cols = _view_2d(shape)
    return ((rows + 1) * _itemsize(index_dtype(nnz)) + nnz * _itemsize(index_dtype(max(cols - 1, 0)))
            + nnz * value_itemsize)


def from_csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The dense tensor of ``shape`` whose 2-D view has these CSR components (no validation)."""
    return _scatter(values, _flat_positions(crow, col, _view_2d(shape)[1]), shape)


def _flat_positions(crow: Tensor, col: Tensor, cols: int) -> Tensor:
    """Row-major flat index of every stored value (crow must be non-decreasing)."""
    row_index = torch.repeat_interleave(torch.arange(crow.numel() - 1), crow.to(torch.int64).diff())
    return row_index * cols + col.to(torch.int64)


def _scatter(values: Tensor, positions: Tensor, shape: tuple[int, ...]) -> Tensor:
    dense = torch.zeros(math.prod(shape), dtype=values.dtype)
    dense[positions] = values
    return dense.reshape(shape)


# ------------------------------------------------------------------------------------------------
# what to save
# ------------------------------------------------------------------------------------------------
def is_sparsified_key(key: str) -> bool:
    """A state_dict key that only a sparsified (unfolded) model has: the threshold's state (``.parametrizations.``
    keys alone also come from a plain model's own weight_norm or spectral_norm)."""
    return key.startswith(THRESHOLD_NAME + ".")


def _folded_state(model: nn.Module) -> tuple[dict[str, Tensor], Optional[list[str]], dict[str, Any]]:
    """(state_dict, the conv/linear weight names, facts for the metadata) of a model ready to export."""
    facts: dict[str, Any] = {}
    if is_sparsified(model):
        threshold = get_threshold(model)
        facts["method"], facts["target_sparsity"] = threshold.method.name, float(threshold.final_sparsity)
        try:
            from .fold import fold
        except ImportError as exc:  # pragma: no cover - fold ships with fxsparse
            raise ValueError(
                "this model is still sparsified (it has parametrizations); fold it first: "
                "folded = fxsparse.fold(model); fxsparse.save_csr(folded, path)"
            ) from exc
        model = fold(model)  # a folded copy: the caller's model stays as it is
        facts["folded_on_export"] = True
    weights = [
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and isinstance(module.weight, Tensor)
    ]
    return model.state_dict(), weights, facts


def _check_state_dict(state_dict: Mapping[str, Any]) -> None:
    for key, value in state_dict.items():
        if is_sparsified_key(key):
            raise ValueError(
                f"state_dict key {key!r} belongs to a sparsified (unfolded) model: its raw weights are not the "
                "sparse ones. Rebuild the sparsified model, load this state_dict into it and pass the model "
                "(save_csr folds a copy), or call fxsparse.fold(model) first; tools/export.py does this with "
                "--method"
            )
        if SEPARATOR in key:
            raise ValueError(f"state_dict key {key!r} contains {SEPARATOR!r}, which the CSR format reserves")
        if not isinstance(value, Tensor):
            raise TypeError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("fxsparse")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        return "unknown"


# ------------------------------------------------------------------------------------------------
# save
# ------------------------------------------------------------------------------------------------
def save_csr(
    model: Union[nn.Module, Mapping[str, Tensor]],
    path: Union[str, os.PathLike],
    *,
    method: Optional[str] = None,
    architecture: Optional[str] = None,
    metadata: Optional[Mapping[str, Any]] = None,
) -> CsrReport:
    """Write ``model`` (a folded or dense module, a sparsified module, or a folded state_dict) to ``path``.

    A sparsified model is folded into a copy first (the model itself is untouched). ``method`` and
    ``architecture`` (e.g. the timm name) go into the metadata, as does ``metadata`` (JSON-serialisable)
    under "extra". Returns what was written; the file appears complete or not at all.
    """
    facts: dict[str, Any] = {}
    if isinstance(model, nn.Module):
        state_dict, weight_names, facts = _folded_state(model)
        scope = "conv/linear weights"
    elif isinstance(model, Mapping):
        state_dict, weight_names = dict(model), None
        scope = "floating-point tensors with 2 or more dims"
    else:
        raise TypeError(f"save_csr() takes an nn.Module or a state_dict, got {type(model).__name__}")
    _check_state_dict(state_dict)

    tensors: dict[str, Tensor] = {}
    entries: list[TensorEntry] = []
    described: "OrderedDict[str, dict[str, Any]]" = OrderedDict()
    seen_storages: set[int] = set()
    pool_nnz = pool_numel = 0
    for name, value in state_dict.items():
        value = value.detach().cpu()
        shape = tuple(int(s) for s in value.shape)
        dtype = _DTYPE_NAMES.get(value.dtype)
        if dtype is None:
            raise TypeError(f"tensor {name!r} has dtype {value.dtype}, which safetensors cannot store")
        floating = value.is_floating_point()
        nnz = int(torch.count_nonzero(value)) if floating else value.numel()
        in_scope = name in weight_names if weight_names is not None else (floating and value.dim() >= 2)
        if in_scope:
            pool_nnz += nnz
            pool_numel += value.numel()
        dense_bytes = value.numel() * value.element_size()
        parts = None
        if floating and value.dim() >= 2 and value.numel():
            if csr_bytes(shape, nnz, value.element_size()) < dense_bytes:
                parts = dict(zip(CSR_PARTS, to_csr(value)))
        if parts is not None:
            for part, tensor in parts.items():
                tensors[f"{name}{SEPARATOR}{part}"] = tensor
            stored = sum(t.numel() * t.element_size() for t in parts.values())
            described[name] = {"layout": "csr", "shape": list(shape), "dtype": dtype, "nnz": nnz,
                               "index_dtypes": [_DTYPE_NAMES[parts["crow_indices"].dtype],
                                                _DTYPE_NAMES[parts["col_indices"].dtype]]}
        else:
            value = value.contiguous()
            storage = value.untyped_storage().data_ptr()
            if value.numel() and storage in seen_storages:  # tied tensors: safetensors refuses shared storage
                value = value.clone()
            seen_storages.add(storage)
            tensors[name] = value
            stored = dense_bytes
            described[name] = {"layout": "dense", "shape": list(shape), "dtype": dtype, "nnz": nnz}
        entries.append(TensorEntry(name, described[name]["layout"], shape, dtype, nnz, dense_bytes, stored))

    document: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "fxsparse_version": _version(),
        "torch_version": torch.__version__,
        "architecture": architecture,
        "method": method if method is not None else facts.get("method"),
        "target_sparsity": facts.get("target_sparsity"),
        "sparsity": (1.0 - pool_nnz / pool_numel) if pool_numel else None,
        "sparsity_scope": scope,
        "folded_on_export": facts.get("folded_on_export", False),
        "tensors": described,
        "crc32": {key: _crc32(t) for key, t in tensors.items()},
        "extra": dict(metadata) if metadata else {},
    }
    try:
        header = json.dumps(document)
    except TypeError as exc:
        raise TypeError(f"metadata must be JSON-serialisable: {exc}") from exc
    path = os.fspath(path)
    _atomic_save(tensors, {METADATA_KEY: header}, path)
    return CsrReport(path, entries, os.path.getsize(path), document)


def _atomic_save(tensors: dict[str, Tensor], metadata: dict[str, str], path: str) -> None:
    """safetensors.save_file through fxsparse.atomic.atomic_write (never half a checkpoint)."""
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


# ------------------------------------------------------------------------------------------------
# load
# ------------------------------------------------------------------------------------------------
def _read_header(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensor table, fxsparse document) from the safetensors header, checking that every tensor's bytes
    are in the file, so a truncated file is refused naming the first tensor it cut."""
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise FileNotFoundError(f"cannot read CSR checkpoint {path!r}: {exc}") from exc
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise CsrFormatError(f"{path!r} has {size} bytes: too short to be a safetensors file (truncated?)")
        header_size = int.from_bytes(head, "little")
        if header_size > size - 8:
            raise CsrFormatError(
                f"{path!r} is truncated or not a safetensors file: its header claims {header_size:,} bytes "
                f"but the file has {size:,} bytes"
            )
        try:
            table = json.loads(handle.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CsrFormatError(f"{path!r}: the safetensors header is not valid JSON ({exc}); the file is corrupt") from exc
    if not isinstance(table, dict):
        raise CsrFormatError(f"{path!r}: the safetensors header is not a JSON object; the file is corrupt")
    raw = (table.pop("__metadata__", None) or {}).get(METADATA_KEY)
    if raw is None:
        raise CsrFormatError(
            f"{path!r} is a safetensors file without fxsparse metadata, not a CSR checkpoint: "
            "read it with safetensors.torch.load_file"
        )
    try:
        document = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CsrFormatError(f"{path!r}: the fxsparse metadata is not valid JSON ({exc}); the file is corrupt") from exc
    if document.get("format") != FORMAT_NAME:
        raise CsrFormatError(f"{path!r}: metadata format is {document.get('format')!r}, expected {FORMAT_NAME!r}")
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        raise CsrFormatError(
            f"{path!r} has CSR format version {version!r}; this fxsparse ({_version()}) reads version "
            f"{FORMAT_VERSION}. " + ("Upgrade fxsparse to read it." if isinstance(version, int) and version > FORMAT_VERSION
                                     else "Re-export the checkpoint with this fxsparse.")
        )
    data_bytes = size - 8 - header_size
    for key, info in sorted(table.items(), key=lambda item: item[1].get("data_offsets", [0, 0])[1]):
        end = info.get("data_offsets", [0, 0])[1]
        if end > data_bytes:
            owner = key.split(SEPARATOR)[0]
            raise CsrFormatError(
                f"{path!r} is truncated: tensor {owner!r} ({key}) needs bytes up to {end:,} of the data section "
                f"but the file holds {data_bytes:,}; re-export or copy the file again"
            )
    return table, document


def read_csr_metadata(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """The fxsparse JSON document of a CSR checkpoint (versions, method, sparsity, per-tensor entries)."""
    return _read_header(os.fspath(path))[1]


def _check_crc(path: str, key: str, tensor: Tensor, document: dict[str, Any]) -> None:
    expected = document.get("crc32", {}).get(key)
    if expected is not None and _crc32(tensor) != expected:
        raise CsrFormatError(
            f"{path!r} is corrupt: tensor {key.split(SEPARATOR)[0]!r} ({key}) fails its CRC32 check; re-export it"
        )


def _validated_positions(path: str, name: str, crow: Tensor, col: Tensor, values: Tensor,
                         shape: tuple[int, ...]) -> Tensor:
    """_flat_positions of CSR components read from ``path``, after checking they describe ``shape``."""
    rows, cols = _view_2d(shape)

    def fail(what: str) -> None:
        raise CsrFormatError(f"{path!r} is corrupt: tensor {name!r} of shape {list(shape)}: {what}")

    for part, tensor in (("crow_indices", crow), ("col_indices", col)):
        if tensor.is_floating_point() or tensor.dtype == torch.bool or tensor.dim() != 1:
            fail(f"{part} must be a 1-D integer tensor, got {tensor.dtype} of shape {list(tensor.shape)}")
    if values.dim() != 1:
        fail(f"values must be 1-D, got shape {list(values.shape)}")
    if crow.numel() != rows + 1:
        fail(f"crow_indices has {crow.numel()} entries, expected rows + 1 = {rows + 1}")
    crow64, col64 = crow.to(torch.int64), col.to(torch.int64)
    nnz = values.numel()
    if col.numel() != nnz or int(crow64[0]) != 0 or int(crow64[-1]) != nnz:
        fail(f"crow_indices runs {int(crow64[0])}..{int(crow64[-1])} for {col.numel()} columns and {nnz} values")
    if bool((crow64.diff() < 0).any()):
        fail("crow_indices decreases")
    if nnz and (int(col64.min()) < 0 or int(col64.max()) >= cols):
        fail(f"a column index is outside [0, {cols})")
    positions = _flat_positions(crow64, col64, cols)
    if bool((positions.diff() <= 0).any()):
        fail("column indices are not strictly increasing within a row")
    return positions


def load_csr(path: Union[str, os.PathLike], *, device: Union[str, torch.device] = "cpu") -> "OrderedDict[str, Tensor]":
    """The state_dict (dense tensors, original order and dtypes) stored in a CSR checkpoint.

    It is bitwise equal to the folded model's state_dict (torch.equal), except that -0.0 in pruned
    places comes back as +0.0. Truncated or corrupt files, and other format versions, raise
    CsrFormatError naming the tensor.
    """
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    table, document = _read_header(path)
    state: "OrderedDict[str, Tensor]" = OrderedDict()
    try:
        handle_context = safe_open(path, framework="pt", device="cpu")
    except SafetensorError as exc:
        raise CsrFormatError(f"{path!r} cannot be opened as safetensors ({exc}); the file is corrupt") from exc
    with handle_context as handle:
        def read(key: str, name: str) -> Tensor:
            if key not in table:
                raise CsrFormatError(f"{path!r} is corrupt: tensor {name!r} has no stored part {key!r}")
            try:
                tensor = handle.get_tensor(key)
            except SafetensorError as exc:
                raise CsrFormatError(f"{path!r}: tensor {name!r} ({key}) cannot be read ({exc})") from exc
            _check_crc(path, key, tensor, document)
            return tensor

        for name, entry in document.get("tensors", {}).items():
            shape = tuple(int(s) for s in entry["shape"])
            dtype = _DTYPES.get(entry.get("dtype"))
            if entry.get("layout") == "csr":
                crow, col, values = (read(f"{name}{SEPARATOR}{part}", name) for part in CSR_PARTS)
                tensor = _scatter(values, _validated_positions(path, name, crow, col, values, shape), shape)
            elif entry.get("layout") == "dense":
                tensor = read(name, name)
                if tuple(tensor.shape) != shape:
                    raise CsrFormatError(
                        f"{path!r} is corrupt: tensor {name!r} is stored with shape {list(tensor.shape)}, "
                        f"its metadata says {list(shape)}"
                    )
            else:
                raise CsrFormatError(f"{path!r}: tensor {name!r} has unknown layout {entry.get('layout')!r}")
            if tensor.dtype != dtype:
                raise CsrFormatError(
                    f"{path!r} is corrupt: tensor {name!r} holds {tensor.dtype}, its metadata says {entry.get('dtype')!r}"
                )
            state[name] = tensor.to(device)
    return state


def load_csr_into_(model: nn.Module, path: Union[str, os.PathLike], *, strict: bool = True) -> None:
    """Load a CSR checkpoint into ``model`` (a plain, not sparsified, instance of the architecture), in place.

    Every tensor's shape is checked first, and a mismatch names the tensor. strict=False ignores
    missing and unexpected keys, as nn.Module.load_state_dict does.
    """
    if is_sparsified(model):
        raise ValueError(
            "load_csr_into_ takes a plain model (e.g. timm.create_model(name)); this one is sparsified. A CSR "
            "checkpoint holds the folded weights: load it into the plain architecture, or into "
            "fxsparse.fold(model)"
        )
    load_checked_(model, load_csr(path), os.fspath(path), strict)


def load_checked_(model: nn.Module, state: Mapping[str, Tensor], source: str, strict: bool = True) -> None:
    """model.load_state_dict(state) after checks whose errors name the tensor and the checkpoint."""
    expected = model.state_dict()
    for name, tensor in state.items():
        if name in expected and tuple(expected[name].shape) != tuple(tensor.shape):
            raise ValueError(
                f"tensor {name!r} has shape {list(tensor.shape)} in the checkpoint {source!r} but "
                f"{list(expected[name].shape)} in the model; was the checkpoint made for another architecture "
                "(or another num_classes)?"
            )
    if strict:
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if missing or unexpected:
            raise ValueError(
                f"the checkpoint {source!r} does not match {type(model).__name__}: "
                f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; "
                "was it made for another architecture? (strict=False loads what matches)"
            )
    model.load_state_dict(state, strict=strict)


# ------------------------------------------------------------------------------------------------
# model building for the command-line tools (tools/export.py, tools/flops.py)
# ------------------------------------------------------------------------------------------------
