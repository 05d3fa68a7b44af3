"""A CSR checkpoint is untrusted input: every malformed header or metadata field is a CsrFormatError, raised
before anything the file declares is allocated (docs/FORMAT.md, "Reading untrusted files"), by each of the
readers: load_csr, load_csr_into_ and fxsparse.accelerate_checkpoint."""

import json
import tracemalloc
import zlib

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fxsparse
from fxsparse.export import CsrFormatError, load_csr, load_csr_into_, read_csr_metadata, save_csr
from fxsparse.inference import skeleton
from fxsparse.train.loading import load_model

from models import TinyCNN


class _Missing:
    def __repr__(self) -> str:
        return "missing"


class Change:
    """A relative edit of a field (e.g. nnz + 1), named for the test id."""

    def __init__(self, label: str, apply):
        self.label, self.apply = label, apply

    def __repr__(self) -> str:
        return self.label


MISSING = _Missing()
HUGE = 2**70


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    """A valid checkpoint of a pruned TinyCNN: conv2.weight is CSR, bn1.* and fc.bias dense."""
    torch.manual_seed(0)
    model = TinyCNN()
    with torch.no_grad():
        for module in (model.conv1, model.conv2, model.fc):
            module.weight.mul_(torch.rand_like(module.weight) < 0.2)
    path = tmp_path_factory.mktemp("good") / "tiny.safetensors"
    save_csr(model, path)
    return path.read_bytes()


def split(data: bytes) -> tuple[dict, dict, bytes]:
    """(safetensors header without __metadata__, fxsparse document, data section) of a file's bytes."""
    size = int.from_bytes(data[:8], "little")
    table = json.loads(data[8 : 8 + size])
    document = json.loads(table.pop("__metadata__")["fxsparse"])
    return table, document, data[8 + size :]


def join(table: dict, document, data: bytes, metadata=MISSING) -> bytes:
    header = dict(table)
    header["__metadata__"] = {"fxsparse": json.dumps(document)} if metadata is MISSING else metadata
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def edit(container: dict, key, value) -> None:
    if value is MISSING:
        container.pop(key, None)
    else:
        container[key] = value.apply(container[key]) if isinstance(value, Change) else value


def field_cases():
    """(id, where, key, value): every metadata field missing, of the wrong type, a bool for an int,
    negative and huge, and inconsistent with the file's own sizes."""
    document = {
        "format": [MISSING, 1, "other"],
        "format_version": [MISSING, "2", True, -1, HUGE, 2.0, None],
        "fxsparse_version": [MISSING, 1, None],
        "torch_version": [MISSING, 2.1, None],
        "architecture": [MISSING, 1, ["resnet"]],
        "method": [MISSING, 1, True],
        "target_sparsity": [MISSING, "0.9", True, -0.5, 1e300],
        "sparsity": [MISSING, "0.9", True, -0.5, 1e300],
        "sparsity_scope": [MISSING, 1, None],
        "folded_on_export": [MISSING, 1, "yes", None],
        "tensors": [MISSING, [], "x", None],
        "crc32": [MISSING, [], None],
        "extra": [MISSING, [], None],
    }
    csr_entry = {  # conv2.weight: (16, 4, 3, 3), CSR of its (16, 36) matrix
        None: ["x", None, []],
        "layout": [MISSING, "coo", 1, "dense"],
        "shape": [
            MISSING,
            "16x36",
            16,
            [16, 4, 3, True],
            [16, -4, 3, 3],
            [16, 4, 3, HUGE],
            [16.0, 4, 3, 3],
            [17, 4, 3, 3],
        ],  # (a reshape with other columns, e.g. [16, 36, 1, 2], is caught against the model)
        "dtype": [MISSING, 3, "float33", "int64", "float16", True],
        "nnz": [MISSING, "9", True, -1, HUGE, Change("nnz+1", lambda n: n + 1), Change("nnz-1", lambda n: n - 1), 1.5],
        "index_dtypes": [
            MISSING,
            "uint8",
            ["uint8"],
            ["float32", "uint8"],
            ["int16", "uint8"],
            [True, "uint8"],
            ["uint8", "uint8", "uint8"],
        ],
        "output_axis": [MISSING, True, -1, 2, "0", 1, HUGE],
        "groups": [MISSING, True, 0, -1, 2, HUGE, "1"],
    }
    dense_entry = {  # bn1.running_mean: float32 (8,)
        None: ["x", None],
        "layout": [MISSING, "csr", "sparse"],
        "shape": [MISSING, [8, 1], [7], [HUGE], [-8], [True]],
        "dtype": [MISSING, "float64", "int32", 7],
        "nnz": [MISSING, -1, True, HUGE, Change("nnz-1", lambda n: n - 1), Change("nnz+1", lambda n: n + 1), "8"],
    }
    integer_entry = {"nnz": [Change("numel-1", lambda n: n - 1)]}  # bn1.num_batches_tracked: an integer's nnz is numel
    crc = {
        "conv2.weight::values": [MISSING, "1", True, -1, 2**32, HUGE, Change("other crc", lambda c: c ^ 1)],
        "ghost::values": [123],
    }
    stored = {  # the safetensors header entry of conv2.weight::values
        None: ["x", None],
        "dtype": [MISSING, "F33", 5, "F64", "I32"],
        "shape": [MISSING, [-1], [True], [2**40], "9", Change("length+1", lambda s: [s[0] + 1])],
        "data_offsets": [
            MISSING,
            [0],
            Change("reversed", lambda o: [o[1], o[0]] if o[1] > o[0] else [1, 0]),
            [-4, 0],
            [0, 2**62],
            Change("str begin", lambda o: [str(o[0]), o[1]]),
            Change("end+4", lambda o: [o[0], o[1] + 4]),
            [True, 4],
            Change("float begin", lambda o: [o[0] + 0.0, o[1]]),
        ],
    }
    for key, values in document.items():
        for value in values:
            yield f"document.{key}={value!r:.20}", ("document",), key, value
    for where, fields in (
        ("conv2.weight", csr_entry),
        ("bn1.running_mean", dense_entry),
        ("bn1.num_batches_tracked", integer_entry),
    ):
        for key, values in fields.items():
            for value in values:
                yield f"{where}.{key}={value!r:.20}", ("document", "tensors", where), key, value
    for key, values in crc.items():
        for value in values:
            yield f"crc32.{key}={value!r:.20}", ("document", "crc32"), key, value
    for key, values in stored.items():
        for value in values:
            yield f"table.values.{key}={value!r:.20}", ("table", "conv2.weight::values"), key, value


CASES = list(field_cases())


def refused_by_every_reader(path, match: str | None = None) -> None:
    """load_csr, load_csr_into_ and accelerate_checkpoint each raise a CsrFormatError, allocating nothing larger
    than TinyCNN's own tensors (what a malformed file declares is never allocated)."""
    with skeleton():
        skeleton_model = TinyCNN()
    readers = {
        "load_csr": lambda: load_csr(path),
        "load_csr_into_": lambda: load_csr_into_(TinyCNN(), path),
        "accelerate_checkpoint": lambda: fxsparse.accelerate_checkpoint(path, skeleton_model, torch.randn(1, 1, 8, 8)),
    }
    for name, read in readers.items():
        guard = AllocationGuard(limit=1 << 16)
        with guard, pytest.raises(CsrFormatError, match=match):
            read()
        assert guard.largest <= 1 << 16, name


@pytest.mark.parametrize("where, key, value", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_every_malformed_field_is_a_csr_format_error(good_file, tmp_path, where, key, value):
    table, document, data = split(good_file)
    container = {"document": document, "table": table}[where[0]]
    for step in where[1:]:
        container = container[step]
    if key is None:  # the whole entry replaced
        parent = {"document": document, "table": table}[where[0]]
        for step in where[1:-1]:
            parent = parent[step]
        parent[where[-1]] = value
    else:
        edit(container, key, value)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(join(table, document, data))
    refused_by_every_reader(path)


def changed_components(good_file: bytes, change) -> bytes:
    """The file with conv2.weight's CSR components edited by ``change(crow, col)`` (in place) and their CRC32s
    updated: a file whose header is right and whose components only reading them shows wrong."""
    table, document, data = split(good_file)
    keys = {part: f"conv2.weight::{part}" for part in ("crow_indices", "col_indices")}
    parts = {}
    for part, key in keys.items():
        begin, end = table[key]["data_offsets"]
        assert table[key]["dtype"] == "U8"  # 16 rows, 36 columns, under 256 nonzeros
        parts[part] = torch.frombuffer(bytearray(data[begin:end]), dtype=torch.uint8)
    change(parts["crow_indices"], parts["col_indices"])
    for part, key in keys.items():
        begin, end = table[key]["data_offsets"]
        raw = parts[part].numpy().tobytes()
        data = data[:begin] + raw + data[end:]
        document["crc32"][key] = zlib.crc32(raw)
    return join(table, document, data)


def _first_pair_of_a_row(crow) -> int:
    """The position of the first of two nonzeros in one row."""
    return int(crow[next(r for r in range(len(crow) - 1) if crow[r + 1] - crow[r] >= 2)])


def _swap_in_a_row(crow, col) -> None:
    first = _first_pair_of_a_row(crow)
    col[first], col[first + 1] = int(col[first + 1]), int(col[first])


def _repeat_in_a_row(crow, col) -> None:
    first = _first_pair_of_a_row(crow)
    col[first + 1] = int(col[first])


COMPONENT_CASES = {
    "column out of range": lambda crow, col: col.__setitem__(-1, 36),
    "columns decreasing in a row": _swap_in_a_row,
    "column repeated in a row": _repeat_in_a_row,
    "crow not from 0": lambda crow, col: crow.__setitem__(0, 1),
    "crow not to nnz": lambda crow, col: crow.__setitem__(-1, int(crow[-1]) - 1),
    "crow decreasing": lambda crow, col: crow.__setitem__(1, int(crow[-1])),
}


@pytest.mark.parametrize("change", COMPONENT_CASES.values(), ids=COMPONENT_CASES.keys())
def test_inconsistent_csr_components_are_refused(good_file, tmp_path, change):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(changed_components(good_file, change))
    refused_by_every_reader(path, match="tensor 'conv2.weight'")


def test_the_rewriting_helper_keeps_a_good_file_good(good_file, tmp_path):
    path = tmp_path / "same.safetensors"
    path.write_bytes(join(*split(good_file)))
    load_csr_into_(TinyCNN(), path)


@pytest.mark.parametrize(
    "metadata", [None, [], {"fxsparse": 5}, {"fxsparse": "[1, 2]"}, {"fxsparse": "{"}, {"other": "x"}]
)
def test_malformed_metadata_container(good_file, tmp_path, metadata):
    table, document, data = split(good_file)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(join(table, document, data, metadata=metadata))
    refused_by_every_reader(path)


def test_a_stored_tensor_the_metadata_does_not_describe_is_refused(good_file, tmp_path):
    table, document, data = split(good_file)
    table["ghost"] = dict(table["fc.bias"])
    document["crc32"]["ghost"] = document["crc32"]["fc.bias"]
    path = tmp_path / "ghost.safetensors"
    path.write_bytes(join(table, document, data))
    refused_by_every_reader(path, match="'ghost', which its metadata does not describe")


def test_a_missing_crc_is_refused(good_file, tmp_path):
    table, document, data = split(good_file)
    del document["crc32"]["fc.bias"]
    path = tmp_path / "nocrc.safetensors"
    path.write_bytes(join(table, document, data))
    refused_by_every_reader(path, match="'fc.bias' has no CRC32")


def test_format_version_true_is_refused(good_file, tmp_path):
    table, document, data = split(good_file)
    document["format_version"] = True  # == 1 in Python: accepted before
    path = tmp_path / "bool.safetensors"
    path.write_bytes(join(table, document, data))
    refused_by_every_reader(path, match="format version True")


def test_version_1_files_are_read(good_file, tmp_path):
    """Version 1 had no output_axis/groups: every CSR tensor is the (shape[0], rest) view."""
    table, document, data = split(good_file)
    document["format_version"] = 1
    for entry in document["tensors"].values():
        entry.pop("output_axis", None)
        entry.pop("groups", None)
    path = tmp_path / "v1.safetensors"
    path.write_bytes(join(table, document, data))
    for key, value in load_csr(path).items():
        assert torch.equal(value, load_csr_from_bytes(good_file, tmp_path)[key])


def load_csr_from_bytes(data: bytes, tmp_path):
    path = tmp_path / "copy.safetensors"
    path.write_bytes(data)
    return load_csr(path)


# ------------------------------------------------------------------------------------------------
# declared sizes: refused before allocating
# ------------------------------------------------------------------------------------------------
def declaring(tmp_path, shape) -> str:
    """A file of under 1 KB, consistent with itself, declaring one all-zero CSR weight of ``shape``."""
    parts = {
        "w::crow_indices": torch.zeros(shape[0] + 1, dtype=torch.uint8),
        "w::col_indices": torch.zeros(0, dtype=torch.uint8),
        "w::values": torch.zeros(0),
    }
    document = {
        "format": "fxsparse-csr",
        "format_version": 2,
        "fxsparse_version": "0",
        "torch_version": "0",
        "architecture": None,
        "method": None,
        "target_sparsity": None,
        "sparsity": 1.0,
        "sparsity_scope": "",
        "folded_on_export": False,
        "extra": {},
        "tensors": {
            "w": {
                "layout": "csr",
                "shape": list(shape),
                "dtype": "float32",
                "nnz": 0,
                "index_dtypes": ["uint8", "uint8"],
                "output_axis": 0,
                "groups": 1,
            }
        },
        "crc32": {key: zlib.crc32(t.numpy().tobytes()) for key, t in parts.items()},
    }
    path = tmp_path / "bomb.safetensors"
    save_file(parts, str(path), metadata={"fxsparse": json.dumps(document)})
    return str(path)


class AllocationGuard(TorchDispatchMode):
    """Fails any torch factory call asking for more than ``limit`` bytes, before it allocates."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.largest = limit, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in (
            torch.ops.aten.zeros,
            torch.ops.aten.empty,
            torch.ops.aten.full,
            torch.ops.aten.new_zeros,
            torch.ops.aten.new_empty,
        ):
            size = args[1] if func.overloadpacket in (torch.ops.aten.new_zeros, torch.ops.aten.new_empty) else args[0]
            dtype = kwargs.get("dtype") or torch.get_default_dtype()
            requested = torch.Size(size).numel() * torch.empty((), dtype=dtype).element_size()
            self.largest = max(self.largest, requested)
            assert requested <= self.limit, f"allocation of {requested:,} bytes attempted"
        return func(*args, **kwargs)


class OneRow(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1, 16))


@pytest.mark.parametrize("load", ["into_model", "max_bytes", "default", "tools", "accelerate_checkpoint"])
def test_a_small_file_declaring_a_huge_weight_is_refused_without_allocating(tmp_path, load):
    shape = (1, 2**40) if load == "default" else (1, 2**30)  # default: 4 TiB, more than this machine has
    path = declaring(tmp_path, shape)
    assert len(open(path, "rb").read()) < 1024
    with skeleton():
        one_row = OneRow()
    guard = AllocationGuard(limit=1 << 20)
    tracemalloc.start()
    try:
        with guard, pytest.raises(ValueError) as error:
            if load == "into_model":
                load_csr_into_(OneRow(), path)
            elif load == "tools":  # tools/export.py and tools/flops.py rebuild the model, then load
                load_model("test_untrusted_csr:OneRow", path)
            elif load == "accelerate_checkpoint":
                fxsparse.accelerate_checkpoint(path, one_row, torch.zeros(1, 16))
            elif load == "max_bytes":
                load_csr(path, max_bytes=1 << 20)
            else:
                load_csr(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "allocation of" not in str(error.value)
    in_model = load in ("into_model", "tools", "accelerate_checkpoint")
    expected = "[1, 16] in the model" if in_model else "refused before allocating"
    assert expected in str(error.value)
    assert guard.largest <= 1 << 20 and peak < 1 << 20, (guard.largest, peak)


def test_metadata_reader_checks_too(tmp_path):
    path = declaring(tmp_path, (1, 8))
    assert read_csr_metadata(path)["tensors"]["w"]["shape"] == [1, 8]
    assert torch.equal(load_csr(path)["w"], torch.zeros(1, 8))
