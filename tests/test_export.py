"""CSR checkpoints: lossless round trip, size, atomic writes and the errors a user meets."""

import json
import os
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from fxsparse.export import (
    FORMAT_VERSION,
    SPARSITY_SCOPE,
    CsrFormatError,
    CsrParts,
    CsrReader,
    from_csr,
    index_dtype,
    load_csr,
    load_csr_into_,
    read_csr_metadata,
    save_csr,
    to_csr,
)
from fxsparse.layers import MatrixLayout
from fxsparse.train.loading import load_model

from models import TiedLinear, TinyCNN


def prune_(model: nn.Module, sparsity: float) -> None:
    """Zero the smallest-magnitude conv/linear weights globally by hand: what a folded model looks like."""
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    scores = torch.cat([w.detach().abs().flatten() for w in weights])
    tau = scores.kthvalue(max(1, int(sparsity * scores.numel()))).values
    with torch.no_grad():
        for w in weights:
            w.mul_(w.abs() > tau)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


@pytest.fixture
def tiny(tmp_path):
    """A pruned TinyCNN with trained-looking BN statistics, and its CSR file."""
    model = TinyCNN()
    with torch.no_grad():
        model.bn1.running_mean.uniform_()
        model.bn1.num_batches_tracked.fill_(7)
    prune_(model, 0.8)
    path = tmp_path / "tiny.safetensors"
    report = save_csr(model, path, architecture="models:TinyCNN")
    return model.eval(), path, report


# ------------------------------------------------------------------------------------------------
# round trip
# ------------------------------------------------------------------------------------------------
def test_round_trip_is_bitwise_and_loads_into_a_fresh_model(tiny):
    model, path, report = tiny
    assert_bitwise_equal(load_csr(path), model.state_dict())
    fresh = TinyCNN().eval()
    load_csr_into_(fresh, path)
    x = torch.randn(2, 1, 12, 12)
    assert torch.equal(fresh(x), model(x))
    layouts = {e.name: e.layout for e in report.entries}
    assert layouts["conv2.weight"] == "csr" and layouts["fc.weight"] == "csr"
    assert layouts["bn1.weight"] == layouts["fc.bias"] == layouts["bn1.num_batches_tracked"] == "dense"


def test_metadata_holds_versions_shapes_method_and_sparsity(tiny):
    model, path, report = tiny
    meta = read_csr_metadata(path)
    assert meta["format"] == "fxsparse-csr" and meta["format_version"] == FORMAT_VERSION
    assert meta["torch_version"] == torch.__version__ and meta["fxsparse_version"]
    assert meta["architecture"] == "models:TinyCNN"
    assert meta["sparsity"] == pytest.approx(0.8, abs=1e-2)
    assert meta["sparsity_scope"] == SPARSITY_SCOPE
    assert meta["tensors"]["conv2.weight"] == {
        "layout": "csr",
        "shape": [16, 4, 3, 3],
        "dtype": "float32",
        "nnz": int(torch.count_nonzero(model.conv2.weight)),
        "index_dtypes": ["uint8", "uint8"],
        "output_axis": 0,
        "groups": 1,
        "experts": False,
    }
    assert list(meta["tensors"]) == list(model.state_dict())
    assert report.metadata == meta
    assert report.file_bytes == os.path.getsize(path)


def test_file_is_plain_safetensors_with_documented_keys(tiny):
    _, path, _ = tiny
    stored = load_file(str(path))
    assert {"conv2.weight::crow_indices", "conv2.weight::col_indices", "conv2.weight::values"} <= set(stored)
    assert "bn1.weight" in stored and "conv2.weight" not in stored
    crow = stored["conv2.weight::crow_indices"]
    assert crow.numel() == 16 + 1 and int(crow[-1]) == stored["conv2.weight::values"].numel()


def test_sparsified_model_is_folded_on_export(tmp_path):
    import fxsparse

    model = TinyCNN()
    sparse = fxsparse.sparsify(model, method="st3sigma", sparsity=0.75)
    folded_state = fxsparse.fold(fxsparse.sparsify(model, method="st3sigma", sparsity=0.75)).state_dict()
    report = save_csr(sparse, tmp_path / "s.safetensors")
    meta = report.metadata
    assert meta["method"] == "st3sigma" and meta["target_sparsity"] == 0.75 and meta["folded_on_export"]
    assert meta["sparsity"] == pytest.approx(0.75, abs=0.01)
    assert_bitwise_equal(load_csr(tmp_path / "s.safetensors"), folded_state)


def test_export_leaves_the_sparsified_model_usable(tmp_path):
    import fxsparse

    sparse = fxsparse.sparsify(TinyCNN(), method="st3", sparsity=0.5)
    save_csr(sparse, tmp_path / "s.safetensors")
    assert fxsparse.is_sparsified(sparse)
    sparse(torch.randn(1, 1, 8, 8))


def test_resnet18_sparsified_export_loads_into_timm_with_identical_outputs(tmp_path):
    timm = pytest.importorskip("timm")
    import fxsparse

    sparse = fxsparse.sparsify(timm.create_model("resnet18"), method="st3sigma", sparsity=0.9)
    folded = fxsparse.fold(sparse).eval()
    report = save_csr(folded, tmp_path / "r18.safetensors", architecture="resnet18", method="st3sigma")
    assert_bitwise_equal(load_csr(tmp_path / "r18.safetensors"), folded.state_dict())
    fresh = timm.create_model("resnet18").eval()
    load_csr_into_(fresh, tmp_path / "r18.safetensors")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), folded(x))
    save_file({k: v.contiguous() for k, v in folded.state_dict().items()}, str(tmp_path / "dense.safetensors"))
    ratio = report.file_bytes / os.path.getsize(tmp_path / "dense.safetensors")
    assert ratio <= 0.16, ratio


def test_resnet50_at_90_percent_is_at_most_016_of_dense(tmp_path):
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet50").eval()
    prune_(model, 0.9)
    report = save_csr(model, tmp_path / "r50.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "dense.safetensors"))
    ratio = report.file_bytes / os.path.getsize(tmp_path / "dense.safetensors")
    assert report.metadata["sparsity"] == pytest.approx(0.9, abs=1e-6)
    assert ratio <= 0.16, ratio
    assert_bitwise_equal(load_csr(tmp_path / "r50.safetensors"), model.state_dict())


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 40),
    inner=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    density=st.sampled_from([0.0, 0.01, 0.1, 0.5, 0.9, 1.0]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_any_tensor_round_trips_exactly(tmp_path_factory, rows, inner, density, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    shape = (rows, *inner)
    values = torch.randn(shape, generator=generator).to(dtype)
    values = values * (torch.rand(shape, generator=generator) < density)
    state = {"w": values, "b": torch.randn(rows, generator=generator).to(dtype)}
    path = tmp_path_factory.mktemp("h") / "x.safetensors"
    save_csr(state, path)
    assert_bitwise_equal(load_csr(path), state)
    crow, col, nonzeros = to_csr(values)
    assert nonzeros.numel() == int(torch.count_nonzero(values))
    assert torch.equal(from_csr(crow, col, nonzeros, shape), values)


@pytest.mark.parametrize(
    "shape, layout",
    [
        ((6, 4), MatrixLayout(output_axis=1)),  # a Conv1D (in, out) weight
        ((4, 3, 3, 3), MatrixLayout(output_axis=1, groups=2)),  # ConvTranspose2d(4, 6, 3, groups=2)
        ((6, 2, 5), MatrixLayout(output_axis=1, groups=3)),
        ((300, 2), MatrixLayout(output_axis=1)),  # int16 columns (300) become uint8 ones (2)
        ((5, 7, 1, 1), MatrixLayout()),
        ((3, 5, 4), MatrixLayout(output_axis=1, experts=True)),  # 3 experts (E, out, in)
        ((3, 4, 5), MatrixLayout(output_axis=2, experts=True)),  # 3 experts stored (E, in, out)
    ],
)
def test_row_major_parts_of_any_layout_equal_to_csr_of_the_view(shape, layout):
    """CsrParts.row_major() converts another layout's components from the nonzeros alone, bitwise equal (values,
    indices and their dtypes) to the CSR of the (shape[0], rest) view; dense() reads the tensor back."""
    tensor = torch.randn(shape) * (torch.rand(shape) < 0.3)
    parts = CsrParts(*to_csr(tensor, layout), shape, layout)
    assert torch.equal(parts.dense(), tensor)
    converted = parts.row_major()
    assert converted.matrix == MatrixLayout() and converted.shape == shape
    for got, expected in zip((converted.crow, converted.col, converted.values), to_csr(tensor)):
        assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_reader_gives_csr_parts_and_tensors(tiny):
    model, path, _ = tiny
    state = model.state_dict()
    with CsrReader(path) as reader:
        assert list(reader.entries) == list(state)
        for name, stored in reader.entries.items():
            assert torch.equal(reader.tensor(name), state[name])
            if stored.layout == "csr":
                parts = reader.csr(name)
                assert torch.equal(parts.dense(), state[name]) and parts.values.numel() == stored.nnz
    with pytest.raises(RuntimeError, match="inside `with CsrReader"):
        reader.tensor(name)


def test_index_dtype_is_the_smallest_that_fits():
    assert [index_dtype(v) for v in (0, 255, 256, 32767, 32768, 2**31 - 1, 2**31)] == [
        torch.uint8,
        torch.uint8,
        torch.int16,
        torch.int16,
        torch.int32,
        torch.int32,
        torch.int64,
    ]


def test_dense_fallback_and_edge_tensors(tmp_path):
    state = {
        "dense.weight": torch.randn(8, 8),  # no zeros: CSR would be larger
        "empty.weight": torch.zeros(8, 8),  # all zeros: CSR is just crow
        "wide.weight": torch.zeros(2, 40000).index_fill_(1, torch.tensor([39999]), 1.0),  # int32 columns
        "scalar": torch.tensor(3.5),
        "flags": torch.tensor([True, False]),
        "zero_size": torch.zeros(0, 4),
        "step": torch.tensor(12, dtype=torch.int64),
    }
    report = save_csr(state, tmp_path / "e.safetensors")
    layouts = {e.name: e.layout for e in report.entries}
    assert layouts == {
        "dense.weight": "dense",
        "empty.weight": "csr",
        "wide.weight": "csr",
        "scalar": "dense",
        "flags": "dense",
        "zero_size": "dense",
        "step": "dense",
    }
    meta = read_csr_metadata(tmp_path / "e.safetensors")
    assert meta["tensors"]["wide.weight"]["index_dtypes"] == ["uint8", "int32"]
    assert meta["sparsity_scope"].startswith("floating-point tensors")
    assert_bitwise_equal(load_csr(tmp_path / "e.safetensors"), state)


def test_negative_zero_comes_back_as_zero(tmp_path):
    weight = torch.tensor([[-0.0, 1.0, 0.0, -2.0]] * 4)
    save_csr({"w": weight}, tmp_path / "z.safetensors")
    loaded = load_csr(tmp_path / "z.safetensors")["w"]
    assert torch.equal(loaded, weight)  # -0.0 == 0.0
    assert not torch.signbit(loaded[0, 0])


def test_tied_weights(tmp_path):
    model = TiedLinear()
    prune_(model, 0.5)
    save_csr(model, tmp_path / "t.safetensors")
    fresh = TiedLinear()
    load_csr_into_(fresh, tmp_path / "t.safetensors")
    assert_bitwise_equal(fresh.state_dict(), model.state_dict())


# ------------------------------------------------------------------------------------------------
# never half-written
# ------------------------------------------------------------------------------------------------
def test_failed_write_leaves_the_old_file_and_no_temporary(tiny, monkeypatch):
    model, path, _ = tiny
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_csr(model, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_overwrite_replaces_atomically_and_keeps_umask_mode(tiny):
    model, path, _ = tiny
    prune_(model, 0.95)
    save_csr(model, path)
    assert_bitwise_equal(load_csr(path), model.state_dict())
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_missing_directory(tiny, tmp_path):
    model, _, _ = tiny
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_csr(model, tmp_path / "nowhere" / "x.safetensors")


# ------------------------------------------------------------------------------------------------
# errors that name the tensor and say what to do
# ------------------------------------------------------------------------------------------------
def test_truncated_file_names_a_tensor(tiny):
    _, path, _ = tiny
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CsrFormatError, match=r"truncated: tensor '.+'"):
        load_csr(path)
    path.write_bytes(data[:20])
    with pytest.raises(CsrFormatError, match="truncated"):
        load_csr(path)
    path.write_bytes(data[:3])
    with pytest.raises(CsrFormatError, match="too short"):
        load_csr(path)


def test_corrupt_bytes_fail_the_checksum_naming_the_tensor(tiny):
    _, path, _ = tiny
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last stored tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CsrFormatError, match=r"corrupt: tensor '.+' .*CRC32"):
        load_csr(path)


def _rewrite_metadata(path, change):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        meta = json.loads(handle.metadata()["fxsparse"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    change(meta, tensors)
    save_file(tensors, str(path), metadata={"fxsparse": json.dumps(meta)})


def test_wrong_format_version(tiny):
    _, path, _ = tiny
    _rewrite_metadata(path, lambda meta, tensors: meta.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(CsrFormatError, match=f"version {FORMAT_VERSION + 1}.*Upgrade fxsparse"):
        load_csr(path)


def test_inconsistent_csr_is_refused_naming_the_tensor(tiny):
    _, path, _ = tiny

    def break_columns(meta, tensors):
        col = tensors["conv2.weight::col_indices"]
        tensors["conv2.weight::col_indices"] = torch.full_like(col, 200)  # outside the 36 columns
        meta["crc32"]["conv2.weight::col_indices"] = zlib.crc32(tensors["conv2.weight::col_indices"].numpy())

    _rewrite_metadata(path, break_columns)
    with pytest.raises(CsrFormatError, match=r"tensor 'conv2.weight'.*outside \[0, 36\)"):
        load_csr(path)


def test_plain_safetensors_file_is_not_a_csr_checkpoint(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CsrFormatError, match="without fxsparse metadata"):
        load_csr(tmp_path / "plain.safetensors")


def test_shape_mismatch_names_the_tensor(tiny):
    _, path, _ = tiny
    with pytest.raises(
        ValueError,
        match=r"tensor 'fc.weight' has shape \[10, 16\] in the checkpoint .* "
        r"but \[3, 16\] in the model; was the checkpoint made for another",
    ):
        load_csr_into_(TinyCNN(classes=3), path)


def test_other_architecture_lists_missing_keys(tiny):
    _, path, _ = tiny
    with pytest.raises(ValueError, match="missing .*another architecture"):
        load_csr_into_(TiedLinear(), path)


def test_unfolded_state_dict_says_what_to_call(tmp_path):
    import fxsparse

    sparse = fxsparse.sparsify(TinyCNN(), method="st3", sparsity=0.5)
    with pytest.raises(ValueError, match=r"sparsified \(unfolded\).*fxsparse.fold\(model\)"):
        save_csr(sparse.state_dict(), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_loading_into_a_sparsified_model_is_refused(tiny):
    import fxsparse

    _, path, _ = tiny
    with pytest.raises(ValueError, match="plain model"):
        load_csr_into_(fxsparse.sparsify(TinyCNN(), method="st3", sparsity=0.5), path)


# ------------------------------------------------------------------------------------------------
# tools/export.py
# ------------------------------------------------------------------------------------------------
def test_cli_exports_a_sparsified_training_checkpoint(tmp_path, capsys, load_tool):
    import fxsparse

    sparse = fxsparse.sparsify(TinyCNN(), method="st3sigma", sparsity=0.8)
    torch.save({"state_dict": sparse.state_dict(), "epoch": 3}, tmp_path / "train.pth")
    out = tmp_path / "out.safetensors"
    tool = load_tool("export")
    assert tool.main(["models:TinyCNN", "--checkpoint", str(tmp_path / "train.pth"), "-o", str(out)]) == 2
    assert "--method" in capsys.readouterr().err
    assert (
        tool.main(
            [
                "models:TinyCNN",
                "--checkpoint",
                str(tmp_path / "train.pth"),
                "--method",
                "st3sigma",
                "--sparsity",
                "0.8",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "conv2.weight" in printed and "dense bytes" in printed and "file" in printed
    assert_bitwise_equal(load_csr(out), fxsparse.fold(sparse).state_dict())
    assert read_csr_metadata(out)["method"] == "st3sigma"


def tiny_cnn_3_classes() -> nn.Module:
    """TinyCNN with another classifier size: its checkpoint does not fit."""
    return TinyCNN(classes=3)


def test_cli_exports_a_folded_checkpoint_and_reads_it_back(tmp_path, capsys, load_tool):
    model = TinyCNN()
    prune_(model, 0.9)
    torch.save(model.state_dict(), tmp_path / "folded.pth")
    out = tmp_path / "out.safetensors"
    assert (
        load_tool("export").main(["models:TinyCNN", "--checkpoint", str(tmp_path / "folded.pth"), "-o", str(out)]) == 0
    )
    loaded = load_model("models:TinyCNN", out)
    assert loaded.method is None
    assert_bitwise_equal(loaded.model.state_dict(), model.state_dict())
    wrong = load_tool("export").main(
        ["test_export:tiny_cnn_3_classes", "--checkpoint", str(tmp_path / "folded.pth"), "-o", str(out)]
    )
    assert wrong == 2 and "'fc.weight'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# the size sweep (slow): timm resnet50 sparsified with ST-3-sigma and folded
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resnet50_size_sweep(tmp_path):
    timm = pytest.importorskip("timm")
    import fxsparse

    dense = timm.create_model("resnet50").eval()
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(tmp_path / "dense.safetensors"))
    dense_bytes = os.path.getsize(tmp_path / "dense.safetensors")
    lines = [
        f"dense fp32 safetensors: {dense_bytes:,} bytes",
        "| sparsity | measured sparsity | nnz | CSR file bytes | ratio to dense |",
        "|---|---|---|---|---|",
    ]
    ratios = {}
    for sparsity in (0.8, 0.9, 0.95, 0.98, 0.99):
        folded = fxsparse.fold(fxsparse.sparsify(dense, method="st3sigma", sparsity=sparsity)).eval()
        path = tmp_path / f"r50-{sparsity}.safetensors"
        report = save_csr(folded, path, architecture="resnet50", method="st3sigma")
        assert_bitwise_equal(load_csr(path), folded.state_dict())
        ratios[sparsity] = report.file_bytes / dense_bytes
        nnz = sum(
            e.nnz
            for e in report.entries
            if e.name in {f"{n}.weight" for n, m in folded.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        )
        lines.append(
            f"| {sparsity:.2f} | {report.metadata['sparsity']:.4f} | {nnz:,} | {report.file_bytes:,} | "
            f"{ratios[sparsity]:.4f} |"
        )
    print("\n".join(lines))
    assert ratios[0.9] <= 0.16
    assert list(ratios.values()) == sorted(ratios.values(), reverse=True)
