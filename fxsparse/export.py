"""Sparse CSR checkpoints: save a folded model's state_dict as CSR components in a safetensors file.

Format (docs/FORMAT.md has the full description for other tools):
  * a safetensors file; its ``__metadata__`` holds one key, "fxsparse", a JSON document with the
    format name and version, library and torch versions, method, sparsity and one entry per tensor
    of the state_dict, in state_dict order.
  * a tensor stored sparse ("layout": "csr") is the CSR of the (outputs, inputs) matrix its op multiplies
    by (fxsparse.layers.MatrixLayout, recorded as "output_axis" and "groups"): a conv weight
    (O, I/g, kh, kw) as (O, I/g*kh*kw), a transposed conv's (I, O/g, *k) and transformers' Conv1D (in, out)
    with their output dim 1 as rows, a mixture-of-experts stack (E, out, in) or (E, in, out) as the
    (E*out, in) matrix whose rows e*out .. (e+1)*out - 1 are expert e's matrix ("experts": true: each
    expert's CSR is a row block of it); in three plain tensors "<name>::crow_indices", "<name>::col_indices",
    "<name>::values"; indices in the smallest of uint8, int16, int32, int64 that holds them; values in
    the tensor's own dtype (lossless).
  * every other tensor ("layout": "dense") is stored as is under its own name: biases, norms, buffers,
    and any weight whose CSR would not be smaller than its dense bytes.
  * a CRC32 of every stored tensor's bytes, so a corrupt file is refused naming the tensor.

Zeros are exact zeros (x != 0): a pruned -0.0 comes back as +0.0, which torch.equal treats as equal.
Files are written to a temporary file in the target directory and renamed, never half-written.
A file is untrusted input: every header and metadata field is checked against the file's own sizes
(and, in load_csr_into_, the model's shapes) before any tensor is read or allocated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .atomic import atomic_write
from .kernel_layer import kernel_layers, kernel_table_owner
from .layers import MatrixLayout, prunable_weight_names
from .parametrization import HOSTED_THRESHOLD_NAME
from .pool import THRESHOLD_NAME, distribution_record, get_threshold, is_sparsified

FORMAT_NAME = "fxsparse-csr"
FORMAT_VERSION = 3  # 2: CSR of the (outputs, inputs) matrix, "output_axis" and "groups" per CSR entry; 3: "experts"
READABLE_VERSIONS = (1, 2, 3)
METADATA_KEY = "fxsparse"
SEPARATOR = "::"
CSR_PARTS = ("crow_indices", "col_indices", "values")
PARAMETRIZED_KEY = ".parametrizations."

# the index dtypes tried, smallest first, with the largest value each holds
_INDEX_DTYPES = ((torch.uint8, 255), (torch.int16, 2**15 - 1), (torch.int32, 2**31 - 1), (torch.int64, 2**63 - 1))
_DTYPE_NAMES = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.int16: "int16",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.bool: "bool",
}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
for _name in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"):
    if hasattr(torch, _name):
        _DTYPE_NAMES[getattr(torch, _name)] = _name
        _DTYPES[_name] = getattr(torch, _name)
# safetensors' dtype codes, by torch name (the header's "dtype" of each stored tensor)
_SAFETENSORS_CODES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
}
_TORCH_NAMES = {code: name for name, code in _SAFETENSORS_CODES.items() if name in _DTYPES}
_INDEX_DTYPE_NAMES = ("uint8", "int16", "int32", "int64")


class CsrFormatError(ValueError):
    """The file is not a readable fxsparse CSR checkpoint (truncated, corrupt, other format or version)."""


class NoCsrMetadata(CsrFormatError):
    """A well-formed safetensors file without fxsparse metadata: plain safetensors, not a CSR checkpoint."""


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
            [
                e.name,
                e.layout,
                "x".join(map(str, e.shape)),
                e.dtype,
                f"{e.nnz:,}",
                f"{1 - e.nnz / e.numel:.4f}",
                f"{e.dense_bytes:,}",
                f"{e.stored_bytes:,}",
            ]
            for e in shown
        ]
        headers = ["tensor", "layout", "shape", "dtype", "nnz", "sparsity", "dense bytes", "stored bytes"]
        table = tabulate(
            rows,
            headers,
            tablefmt=tablefmt,
            disable_numparse=True,
            colalign=("left", "left", "left", "left", "right", "right", "right", "right"),
        )
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


ROW_MAJOR = MatrixLayout()  # the weight's 2-D view (shape[0], rest): a Linear or Conv weight


def to_csr(tensor: Tensor, layout: MatrixLayout = ROW_MAJOR) -> tuple[Tensor, Tensor, Tensor]:
    """(crow_indices, col_indices, values) of the (outputs, inputs) matrix of ``tensor`` under ``layout``
    (default: the 2-D view (shape[0], rest)), with the smallest index dtypes."""
    matrix = layout.to_matrix(tensor.detach())
    rows, cols = matrix.shape
    row_index, col_index = torch.nonzero(matrix, as_tuple=True)  # row-major order: CSR order
    values = matrix[row_index, col_index].contiguous()
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(torch.bincount(row_index, minlength=rows), 0)
    nnz = values.numel()
    return (crow.to(index_dtype(nnz)), col_index.to(index_dtype(max(cols - 1, 0))), values)


def csr_bytes(shape: tuple[int, ...], nnz: int, value_itemsize: int, layout: MatrixLayout = ROW_MAJOR) -> int:
    """Bytes of the CSR components to_csr would produce for a tensor of ``shape`` with ``nnz`` nonzeros."""
    rows, cols = layout.matrix_shape(shape)
    return (
        (rows + 1) * _itemsize(index_dtype(nnz)) + nnz * _itemsize(index_dtype(max(cols - 1, 0))) + nnz * value_itemsize
    )


def from_csr(
    crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, ...], layout: MatrixLayout = ROW_MAJOR
) -> Tensor:
    """The dense tensor of ``shape`` whose (outputs, inputs) matrix has these CSR components (no validation)."""
    row, col64 = _coordinates(crow, col)
    return _scatter(values, layout.flat_index(row, col64, shape), shape)


def _coordinates(crow: Tensor, col: Tensor) -> tuple[Tensor, Tensor]:
    """(row, column) of every stored value, int64 (crow must be non-decreasing)."""
    row = torch.repeat_interleave(torch.arange(crow.numel() - 1), crow.to(torch.int64).diff())
    return row, col.to(torch.int64)


def _scatter(values: Tensor, positions: Tensor, shape: tuple[int, ...]) -> Tensor:
    dense = torch.zeros(math.prod(shape), dtype=values.dtype)
    dense[positions] = values
    return dense.reshape(shape)


# ------------------------------------------------------------------------------------------------
# what to save
# ------------------------------------------------------------------------------------------------
SPARSITY_SCOPE = (
    "prunable weights (Linear, Conv, ConvTranspose, Conv1D, MultiheadAttention, mixture-of-experts stacks) and "
    "pooled weights"
)


def is_sparsified_key(key: str) -> bool:
    """A state_dict key that only a sparsified (unfolded) model has: the threshold's state, as a graph node or
    hosted by a parametrization (``.parametrizations.`` keys alone also come from a plain model's own
    weight_norm or spectral_norm)."""
    hosted = f".{HOSTED_THRESHOLD_NAME}."  # in place or module-walked: inside the first pooled parametrization
    return key.startswith(THRESHOLD_NAME + ".") or (".parametrizations." in f".{key}" and hosted in key)


def _folded_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, MatrixLayout], set[str], dict[str, Any]]:
    """(state_dict, layouts of its prunable weights, the names the sparsity is measured over, facts for the
    metadata) of a model ready to export; a sparsified model is folded on a copy."""
    facts: dict[str, Any] = {}
    pooled: set[str] = set()
    accelerated = kernel_layers(model)
    if accelerated:
        raise ValueError(
            f"save_csr: layer {next(iter(accelerated))!r} runs a sparse kernel (a model from fxsparse.accelerate holds "
            "the kernels' tables, not its weights): save the folded model it was built from"
        )
    if is_sparsified(model):
        from .fold import fold
        from .pool import unique_entries

        threshold = get_threshold(model)
        facts["method"], facts["target_sparsity"] = threshold.method.name, float(threshold.final_sparsity)
        facts["distribution"] = distribution_record(model)  # per-layer targets too (fxsparse.distribution)
        pooled = {entry.fqn for entry in unique_entries(model)}  # F.conv*/F.linear weights too
        model = fold(model)  # a folded copy: the caller's model stays as it is
        facts["folded_on_export"] = True
    layouts = prunable_weight_names(model)
    return model.state_dict(), layouts, set(layouts) | pooled, facts


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
    model: nn.Module | Mapping[str, Tensor],
    path: str | os.PathLike,
    *,
    method: str | None = None,
    architecture: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> CsrReport:
    """Write ``model`` (a folded or dense module, a sparsified module, or a folded state_dict) to ``path``.

    A sparsified model is folded into a copy first (the model itself is untouched). A module's prunable
    weights (fxsparse.layers) are stored as the CSR of their (outputs, inputs) matrix; a bare state_dict's
    tensors as that of their (shape[0], rest) view. ``method`` and ``architecture`` (e.g. the timm name) go
    into the metadata, as does ``metadata`` (JSON-serialisable) under "extra". Returns what was written;
    the file appears complete or not at all.
    """
    facts: dict[str, Any] = {}
    if isinstance(model, nn.Module):
        state_dict, layouts, scope_names, facts = _folded_state(model)
        scope = SPARSITY_SCOPE
    elif isinstance(model, Mapping):
        owner = kernel_table_owner(model.keys())
        if owner is not None:
            raise ValueError(
                f"save_csr: this state_dict is an accelerated model's ({owner!r} holds a sparse kernel's tables, not "
                "its weight): save the folded model it was built from, or its state_dict"
            )
        state_dict, layouts = dict(model), {}
        scope_names = {
            k for k, v in state_dict.items() if isinstance(v, Tensor) and v.is_floating_point() and v.dim() >= 2
        }
        scope = "floating-point tensors with 2 or more dims"
    else:
        raise TypeError(f"save_csr() takes an nn.Module or a state_dict, got {type(model).__name__}")
    _check_state_dict(state_dict)

    tensors: dict[str, Tensor] = {}
    entries: list[TensorEntry] = []
    described: OrderedDict[str, dict[str, Any]] = OrderedDict()
    seen_storages: set[int] = set()
    counted: set[tuple] = set()  # a tied weight counts once in the sparsity, as in the pool
    pool_nnz = pool_numel = 0
    for name, value in state_dict.items():
        value = value.detach().cpu()
        shape = tuple(int(s) for s in value.shape)
        dtype = _DTYPE_NAMES.get(value.dtype)
        if dtype is None:
            raise TypeError(f"tensor {name!r} has dtype {value.dtype}, which safetensors cannot store")
        floating = value.is_floating_point()
        nnz = int(torch.count_nonzero(value)) if floating else value.numel()
        identity = (value.data_ptr(), shape, value.stride())
        if name in scope_names and identity not in counted:
            counted.add(identity)
            pool_nnz += nnz
            pool_numel += value.numel()
        dense_bytes = value.numel() * value.element_size()
        layout = layouts.get(name, MatrixLayout())
        parts = None
        if floating and value.dim() >= 2 and value.numel():
            if csr_bytes(shape, nnz, value.element_size(), layout) < dense_bytes:
                parts = dict(zip(CSR_PARTS, to_csr(value, layout)))
        if parts is not None:
            for part, tensor in parts.items():
                tensors[f"{name}{SEPARATOR}{part}"] = tensor
            stored = sum(t.numel() * t.element_size() for t in parts.values())
            described[name] = {
                "layout": "csr",
                "shape": list(shape),
                "dtype": dtype,
                "nnz": nnz,
                "index_dtypes": [_DTYPE_NAMES[parts["crow_indices"].dtype], _DTYPE_NAMES[parts["col_indices"].dtype]],
                "output_axis": layout.output_axis,
                "groups": layout.groups,
                "experts": layout.experts,
            }
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
        "distribution": facts.get("distribution"),
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
# load: every field checked against the file's own sizes before anything is read or allocated
# ------------------------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(d) and d >= 0 for d in value)


def _is_fraction_or_null(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0)


def _is_str_or_null(value: Any) -> bool:
    return value is None or isinstance(value, str)


# every field of the fxsparse document besides "format" and "format_version": (check, what it must be)
_DOCUMENT_FIELDS = {
    "fxsparse_version": (lambda v: isinstance(v, str), "a string"),
    "torch_version": (lambda v: isinstance(v, str), "a string"),
    "architecture": (_is_str_or_null, "a string or null"),
    "method": (_is_str_or_null, "a string or null"),
    "target_sparsity": (_is_fraction_or_null, "a number in [0, 1] or null"),
    "sparsity": (_is_fraction_or_null, "a number in [0, 1] or null"),
    "sparsity_scope": (lambda v: isinstance(v, str), "a string"),
    "folded_on_export": (lambda v: isinstance(v, bool), "true or false"),
    "tensors": (lambda v: isinstance(v, dict), "an object"),
    "crc32": (lambda v: isinstance(v, dict), "an object"),
    "extra": (lambda v: isinstance(v, dict), "an object"),
}


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One "tensors" entry of a checked document: how one state_dict entry is stored (docs/FORMAT.md)."""

    name: str
    layout: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nnz: int
    matrix: MatrixLayout

    @property
    def keys(self) -> list[str]:
        return [f"{self.name}{SEPARATOR}{part}" for part in CSR_PARTS] if self.layout == "csr" else [self.name]

    @property
    def dense_bytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


@dataclasses.dataclass(frozen=True)
class _Checkpoint:
    """A CSR checkpoint's header, checked: the safetensors table, the fxsparse document, its tensors."""

    path: str
    table: dict[str, Any]
    document: dict[str, Any]
    tensors: list[StoredTensor]
    data_start: int  # file offset of the data section (the safetensors "data_offsets" count from there)


def _fail(path: str, message: str) -> None:
    raise CsrFormatError(f"{path!r}: {message}")


def _read_json_header(path: str) -> tuple[dict[str, Any], int, int]:
    """(the safetensors header, the file offset and the size of the data section), checking the header fits
    in the file."""
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise FileNotFoundError(f"cannot read CSR checkpoint {path!r}: {exc}") from exc
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            _fail(path, f"{size} bytes: too short to be a safetensors file (truncated?)")
        header_size = int.from_bytes(head, "little")
        if header_size > size - 8:
            _fail(
                path,
                f"truncated or not a safetensors file: its header claims {header_size:,} bytes but the "
                f"file has {size:,} bytes",
            )
        raw = handle.read(header_size)
    try:
        table = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CsrFormatError(
            f"{path!r}: the safetensors header is not valid JSON ({exc}); the file is corrupt"
        ) from exc
    if not isinstance(table, dict):
        _fail(path, "the safetensors header is not a JSON object; the file is corrupt")
    return table, 8 + header_size, size - 8 - header_size


def _check_table(path: str, table: dict[str, Any], data_bytes: int) -> None:
    """Every stored tensor: a known dtype, a shape, and offsets inside the data section matching its size."""
    for key, info in table.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (
            isinstance(info, dict)
            and info.get("dtype") in _TORCH_NAMES
            and _is_shape(info.get("shape"))
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            _fail(path, f"corrupt safetensors header entry for {key!r}: {info!r}")
    for key, info in sorted(table.items(), key=lambda item: item[1]["data_offsets"][1]):
        begin, end = info["data_offsets"]
        if end > data_bytes:
            _fail(
                path,
                f"truncated: tensor {key.split(SEPARATOR)[0]!r} ({key}) needs bytes up to {end:,} of the "
                f"data section but the file holds {data_bytes:,}; re-export or copy the file again",
            )
        expected = math.prod(info["shape"]) * _itemsize(_DTYPES[_TORCH_NAMES[info["dtype"]]])
        if end - begin != expected:
            _fail(
                path,
                f"corrupt: stored tensor {key!r} of shape {info['shape']} and dtype {info['dtype']} takes "
                f"{end - begin:,} bytes, not {expected:,}",
            )


def _check_document(path: str, document: Any) -> int:
    """The document's version, after checking its format and every field's type; raises CsrFormatError."""
    if not isinstance(document, dict):
        _fail(path, "the fxsparse metadata is not a JSON object; the file is corrupt")
    if document.get("format") != FORMAT_NAME:
        _fail(path, f"metadata format is {document.get('format')!r}, expected {FORMAT_NAME!r}")
    version = document.get("format_version")
    if not _is_int(version) or version not in READABLE_VERSIONS:
        advice = (
            "Upgrade fxsparse to read it."
            if _is_int(version) and version > FORMAT_VERSION
            else "Re-export the checkpoint with this fxsparse."
        )
        _fail(
            path,
            f"has CSR format version {version!r}; this fxsparse ({_version()}) reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}. {advice}",
        )
    for field, (check, what) in _DOCUMENT_FIELDS.items():
        if field not in document:
            _fail(path, f"the fxsparse metadata has no {field!r}; the file is corrupt or not written by fxsparse")
        if not check(document[field]):
            _fail(path, f"metadata field {field!r} must be {what}, got {document[field]!r}")
    if not isinstance(document.get("distribution"), (dict, type(None))):  # optional: absent in older files
        _fail(path, f"metadata field 'distribution' must be an object or null, got {document['distribution']!r}")
    for key, crc in document["crc32"].items():
        if not (_is_int(crc) and 0 <= crc < 2**32):
            _fail(path, f"the CRC32 of {key!r} must be an integer in [0, 2**32), got {crc!r}")
    return version


def _check_entry(path: str, name: str, entry: Any, version: int) -> StoredTensor:
    """One "tensors" entry, every field checked (types, ranges, consistency with its own shape)."""

    def fail(what: str) -> None:
        _fail(path, f"corrupt metadata for tensor {name!r}: {what}")

    if SEPARATOR in name:
        fail(f"the name contains {SEPARATOR!r}, which the format reserves")
    if not isinstance(entry, dict):
        fail(f"expected an object, got {entry!r}")
    for field in ("layout", "shape", "dtype", "nnz"):
        if field not in entry:
            fail(f"no {field!r}")
    layout, shape, dtype, nnz = entry["layout"], entry["shape"], entry["dtype"], entry["nnz"]
    if layout not in ("csr", "dense"):
        fail(f"layout must be 'csr' or 'dense', got {layout!r}")
    if not _is_shape(shape):
        fail(f"shape must be a list of non-negative integers, got {shape!r}")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        fail(f"unknown dtype {dtype!r}")
    numel = math.prod(shape)
    if numel * _itemsize(_DTYPES[dtype]) >= 2**63:
        fail(f"shape {shape} of {dtype} is larger than any tensor can be")
    if not (_is_int(nnz) and 0 <= nnz <= numel):
        fail(f"nnz must be an integer in [0, {numel}], got {nnz!r}")
    torch_dtype = _DTYPES[dtype]
    matrix = MatrixLayout()
    if layout == "csr":
        if not torch_dtype.is_floating_point or len(shape) < 2:
            fail(f"a CSR tensor must be floating-point with 2 or more dims, got {dtype} of shape {shape}")
        index_dtypes = entry.get("index_dtypes")
        if not (
            isinstance(index_dtypes, list)
            and len(index_dtypes) == 2
            and all(isinstance(d, str) and d in _INDEX_DTYPE_NAMES for d in index_dtypes)
        ):
            fail(f"index_dtypes must be two of {list(_INDEX_DTYPE_NAMES)}, got {index_dtypes!r}")
        experts = entry.get("experts") if version >= 3 else False
        if not isinstance(experts, bool):
            fail(f"experts must be true or false, got {experts!r}")
        if experts:  # a (E, out, in) or (E, in, out) stack of expert matrices
            axis, groups = entry.get("output_axis"), entry.get("groups")
            if len(shape) != 3:
                fail(f"an experts stack has 3 dims (experts, out, in), got shape {shape}")
            if axis not in (1, 2) or not _is_int(axis):
                fail(f"output_axis of an experts stack must be 1 or 2, got {axis!r}")
            if groups != 1 or not _is_int(groups):
                fail(f"groups of an experts stack must be 1, got {groups!r}")
            matrix = MatrixLayout(axis, 1, experts=True)
        elif version >= 2:
            axis, groups = entry.get("output_axis"), entry.get("groups")
            if axis not in (0, 1) or not _is_int(axis):
                fail(f"output_axis must be 0 or 1, got {axis!r}")
            if not (_is_int(groups) and groups >= 1 and (groups == 1 if axis == 0 else shape[0] % groups == 0)):
                fail(f"groups must be a positive integer dividing shape[0] (1 when output_axis is 0), got {groups!r}")
            matrix = MatrixLayout(axis, groups)
    elif not torch_dtype.is_floating_point and nnz != numel:
        fail(f"nnz of a non-floating tensor is its numel {numel}, got {nnz}")
    return StoredTensor(name, layout, tuple(shape), torch_dtype, nnz, matrix)


def _check_parts(path: str, tensor: StoredTensor, table: dict[str, Any], index_dtypes: list[str]) -> None:
    """The stored safetensors tensors of one entry exist with the dtypes and lengths its metadata implies."""
    if tensor.layout == "dense":
        expected = {tensor.name: (_DTYPE_NAMES[tensor.dtype], list(tensor.shape))}
    else:
        rows, _ = tensor.matrix.matrix_shape(tensor.shape)
        crow, col, values = tensor.keys
        expected = {
            crow: (index_dtypes[0], [rows + 1]),
            col: (index_dtypes[1], [tensor.nnz]),
            values: (_DTYPE_NAMES[tensor.dtype], [tensor.nnz]),
        }
    for key, (dtype, shape) in expected.items():
        info = table.get(key)
        if info is None:
            _fail(path, f"corrupt: tensor {tensor.name!r} has no stored part {key!r}")
        stored = (_TORCH_NAMES[info["dtype"]], info["shape"])
        if stored != (dtype, shape):
            _fail(
                path,
                f"corrupt: tensor {tensor.name!r}: {key!r} is stored as {stored[0]} of shape {stored[1]}, "
                f"its metadata implies {dtype} of shape {shape}",
            )


def _read_checkpoint(path: str) -> _Checkpoint:
    """The header of a CSR checkpoint, every field checked; nothing but the header is read."""
    table, data_start, data_bytes = _read_json_header(path)
    metadata = table.pop("__metadata__", None)
    raw = metadata.get(METADATA_KEY) if isinstance(metadata, dict) else None
    if raw is None:
        raise NoCsrMetadata(
            f"{path!r} is a safetensors file without fxsparse metadata, not a CSR checkpoint: "
            "read it with safetensors.torch.load_file"
        )
    if not isinstance(raw, str):
        _fail(path, "the fxsparse metadata is not a JSON string; the file is corrupt")
    try:
        document = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CsrFormatError(f"{path!r}: the fxsparse metadata is not valid JSON ({exc}); the file is corrupt") from exc
    version = _check_document(path, document)
    _check_table(path, table, data_bytes)
    tensors = [_check_entry(path, name, entry, version) for name, entry in document["tensors"].items()]
    claimed: set[str] = set()
    for tensor, entry in zip(tensors, document["tensors"].values()):
        _check_parts(path, tensor, table, entry.get("index_dtypes", []))
        claimed.update(tensor.keys)
    for key in table:
        if key not in claimed:
            _fail(path, f"corrupt: it stores {key!r}, which its metadata does not describe")
        if key not in document["crc32"]:
            _fail(path, f"corrupt: stored tensor {key!r} has no CRC32 in the metadata")
    for key in document["crc32"]:
        if key not in table:
            _fail(path, f"corrupt: the metadata has a CRC32 for {key!r}, which the file does not store")
    return _Checkpoint(path, table, document, tensors, data_start)


def read_csr_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The fxsparse JSON document of a CSR checkpoint (versions, method, sparsity, per-tensor entries), checked."""
    return _read_checkpoint(os.fspath(path)).document


@dataclasses.dataclass(frozen=True)
class CsrParts:
    """The checked CSR components of one stored tensor: ``crow`` (rows + 1 entries), ``col`` and ``values``
    (nnz each) of the (outputs, inputs) matrix that ``matrix`` reads off a tensor of ``shape``; the indices in
    their stored dtypes (uint8 to int64), the values in the tensor's dtype."""

    crow: Tensor
    col: Tensor
    values: Tensor
    shape: tuple[int, ...]
    matrix: MatrixLayout

    def dense(self) -> Tensor:
        """The tensor of ``shape`` these components describe."""
        return from_csr(self.crow, self.col, self.values, self.shape, self.matrix)

    def row_major(self) -> CsrParts:
        """The same tensor's components as the CSR of its (shape[0], rest) view, with the smallest index dtypes
        (what a Linear or Conv kernel takes), computed from the nonzeros alone: nothing of the dense size."""
        if self.matrix == ROW_MAJOR:
            return self
        row, col = _coordinates(self.crow, self.col)
        positions, order = self.matrix.flat_index(row, col, self.shape).sort()
        rows, cols = ROW_MAJOR.matrix_shape(self.shape)
        crow = torch.zeros(rows + 1, dtype=torch.int64)
        torch.cumsum(torch.bincount(positions // cols, minlength=rows), 0, out=crow[1:])
        nnz = positions.numel()
        return CsrParts(
            crow.to(index_dtype(nnz)),
            (positions % cols).to(index_dtype(max(cols - 1, 0))),
            self.values[order],
            self.shape,
            ROW_MAJOR,
        )


def _check_components(path: str, stored: StoredTensor, crow: Tensor, col: Tensor) -> None:
    """The CSR components (whose dtypes and lengths the header check fixed) describe ``stored``: crow runs from
    0 to nnz without decreasing, every column is in range and strictly increasing within its row. The
    temporaries are a few bytes per nonzero (no int64 copy of the columns)."""
    rows, cols = stored.matrix.matrix_shape(stored.shape)

    def fail(what: str) -> None:
        raise CsrFormatError(f"{path!r} is corrupt: tensor {stored.name!r} of shape {list(stored.shape)}: {what}")

    crow64 = crow.to(torch.int64)
    if int(crow64[0]) != 0 or int(crow64[-1]) != stored.nnz:
        fail(f"crow_indices runs {int(crow64[0])}..{int(crow64[-1])} for {stored.nnz} values")
    if bool((crow64.diff() < 0).any()):
        fail("crow_indices decreases")
    if not stored.nnz:
        return
    if int(col.min()) < 0 or int(col.max()) >= cols:
        fail(f"a column index is outside [0, {cols})")
    # columns now lie in [0, cols): their differences fit the stored dtype, except uint8's negative ones
    increasing = (col.to(torch.int16) if col.dtype == torch.uint8 else col).diff() > 0
    row_starts = crow64[1:-1]
    increasing[row_starts[(row_starts > 0) & (row_starts < stored.nnz)] - 1] = True  # a new row may go back
    if not bool(increasing.all()):
        fail("column indices are not strictly increasing within a row")


class CsrReader:
    """An open CSR checkpoint: the one reader of the format (load_csr, load_csr_into_ and
    fxsparse.accelerate_checkpoint use it).

    Creating it reads and checks the whole header (docs/FORMAT.md, "Reading untrusted files", steps 1-5) and
    nothing else. Inside ``with``, tensors are read one at a time with plain reads into buffers of their
    stored size (bounded by the file), CRC-32 checked, and, for CSR entries, their components checked before
    they are returned: ``csr(name)`` as CsrParts (never densified), ``tensor(name)`` as the state_dict tensor.

        with CsrReader(path) as reader:
            for name, entry in reader.entries.items():
                value = reader.csr(name) if entry.layout == "csr" else reader.tensor(name)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._checkpoint = _read_checkpoint(self.path)
        self.document: dict[str, Any] = self._checkpoint.document
        self.entries: dict[str, StoredTensor] = {t.name: t for t in self._checkpoint.tensors}  # state_dict order
        self._file = None

    def __enter__(self) -> CsrReader:
        self._file = open(self.path, "rb")  # closed by __exit__
        return self

    def __exit__(self, *exc_info) -> None:
        self._file.close()
        self._file = None

    def _read(self, key: str) -> Tensor:
        """The stored safetensors tensor ``key``, read from the file and CRC-32 checked."""
        if self._file is None:
            raise RuntimeError("CsrReader reads tensors inside `with CsrReader(path) as reader:`")
        info = self._checkpoint.table[key]
        begin, end = info["data_offsets"]
        raw = torch.empty(end - begin, dtype=torch.uint8)
        self._file.seek(self._checkpoint.data_start + begin)
        if self._file.readinto(raw.numpy()) != end - begin:
            _fail(self.path, f"truncated: tensor {key.split(SEPARATOR)[0]!r} ({key}) ends past the end of the file")
        if zlib.crc32(raw.numpy()) != self.document["crc32"][key]:
            raise CsrFormatError(
                f"{self.path!r} is corrupt: tensor {key.split(SEPARATOR)[0]!r} ({key}) fails its CRC32 check; "
                "re-export it"
            )
        dtype = _DTYPES[_TORCH_NAMES[info["dtype"]]]
        itemsize = _itemsize(dtype)
        if sys.byteorder == "big" and itemsize > 1:  # the format is little-endian
            raw = raw.view(-1, itemsize).flip(1).reshape(-1)
        return raw.view(dtype).reshape(info["shape"])

    def csr(self, name: str) -> CsrParts:
        """The checked CSR components of a tensor stored as CSR."""
        stored = self.entries[name]
        if stored.layout != "csr":
            raise ValueError(f"{name!r} is stored {stored.layout}, not as CSR: read it with tensor()")
        crow, col, values = (self._read(key) for key in stored.keys)
        _check_components(self.path, stored, crow, col)
        return CsrParts(crow, col, values, stored.shape, stored.matrix)

    def tensor(self, name: str) -> Tensor:
        """The state_dict tensor ``name``: a CSR entry densified, a dense one as stored (its nnz checked)."""
        stored = self.entries[name]
        if stored.layout == "csr":
            return self.csr(name).dense()
        tensor = self._read(name)
        if tensor.is_floating_point() and int(torch.count_nonzero(tensor)) != stored.nnz:
            _fail(
                self.path,
                f"corrupt metadata for tensor {name!r}: nnz {stored.nnz} but it holds "
                f"{int(torch.count_nonzero(tensor))} nonzeros",
            )
        return tensor


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX
        return None


def load_csr(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", max_bytes: int | None = None
) -> OrderedDict[str, Tensor]:
    """The state_dict (dense tensors, original order and dtypes) stored in a CSR checkpoint.

    It is bitwise equal to the folded model's state_dict (torch.equal), except that -0.0 in pruned
    places comes back as +0.0. Truncated or corrupt files, malformed metadata and other format versions
    raise CsrFormatError naming the field or tensor, before anything is allocated. A CSR tensor's dense size
    is only bounded by its declared shape: a file whose tensors would take more than ``max_bytes`` dense
    (default: this machine's physical memory) is refused; load_csr_into_ checks the shapes against the model.
    """
    return _load(os.fspath(path), device, max_bytes, None)


def _load(
    path: str,
    device: str | torch.device,
    max_bytes: int | None,
    check: Callable[[dict[str, tuple[int, ...]]], None] | None,
) -> OrderedDict[str, Tensor]:
    reader = CsrReader(path)
    if check is not None:
        check({name: stored.shape for name, stored in reader.entries.items()})
    limit = _physical_memory() if max_bytes is None else max_bytes
    declared = sum(stored.dense_bytes for stored in reader.entries.values())
    if limit is not None and declared > limit:
        _fail(
            path,
            f"its tensors would take {declared:,} bytes dense, more than the {limit:,} allowed "
            f"(max_bytes{'' if max_bytes is not None else ', default: physical memory'}); refused before "
            "allocating. Pass a larger max_bytes if you trust the file, or load it with load_csr_into_",
        )
    with reader:
        return OrderedDict((name, reader.tensor(name).to(device)) for name in reader.entries)


def load_csr_into_(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> None:
    """Load a CSR checkpoint into ``model`` (a plain, not sparsified, instance of the architecture), in place.

    Every tensor's declared shape is checked against the model before anything is read or allocated, and
    a mismatch names the tensor. strict=False ignores missing and unexpected keys, as
    nn.Module.load_state_dict does.
    """
    if is_sparsified(model):
        raise ValueError(
            "load_csr_into_ takes a plain model (e.g. timm.create_model(name)); this one is sparsified. A CSR "
            "checkpoint holds the folded weights: load it into the plain architecture, or into "
            "fxsparse.fold(model)"
        )
    path = os.fspath(path)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    state = _load(path, "cpu", None, lambda shapes: check_shapes(model, expected, shapes, path, strict))
    model.load_state_dict(state, strict=strict)


def check_shapes(
    model: nn.Module,
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
    source: str,
    strict: bool = True,
) -> None:
    """Raise a ValueError naming the tensor when a checkpoint's ``found`` shapes do not fit the model's
    ``expected`` ones (and, when strict, when keys are missing or unexpected)."""
    for name, shape in found.items():
        if name in expected and tuple(expected[name]) != tuple(shape):
            raise ValueError(
                f"tensor {name!r} has shape {list(shape)} in the checkpoint {source!r} but "
                f"{list(expected[name])} in the model; was the checkpoint made for another architecture "
                "(or another num_classes)?"
            )
    if strict:
        missing = [k for k in expected if k not in found]
        unexpected = [k for k in found if k not in expected]
        if missing or unexpected:
            raise ValueError(
                f"the checkpoint {source!r} does not match {type(model).__name__}: "
                f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; "
                "was it made for another architecture? (strict=False loads what matches)"
            )


def load_checked_(model: nn.Module, state: Mapping[str, Tensor], source: str, strict: bool = True) -> None:
    """model.load_state_dict(state) after checks whose errors name the tensor and the checkpoint."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    check_shapes(model, expected, {name: tuple(t.shape) for name, t in state.items()}, source, strict)
    model.load_state_dict(state, strict=strict)
