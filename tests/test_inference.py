"""fxsparse.accelerate: sparse kernels equal the folded model for every layer kind, the path choice, the
CSR-checkpoint build, and torch.compile / torch.export round trips."""

import io
import itertools
import json
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse.export import CsrFormatError, to_csr
from fxsparse.inference import AccelerationPlan, SparseConv2d, SparseLinear, native, ops, skeleton, timing
from fxsparse.inference.layers import four_sided_padding, preferred_sparse_path
from fxsparse.inference.timing import paired_ratios

CONV_PATHS = [f"{layout}+{kernel}" for layout, kernel in itertools.product(ops.CONV_LAYOUTS, ops.KERNELS)]
LINEAR_PATHS = list(ops.KERNELS)


def prune_(model: nn.Module, density: float = 0.25, seed: int | None = None) -> nn.Module:
    """Zero all but a random ``density`` of every conv/linear weight (and give BatchNorms real statistics);
    ``seed`` seeds torch's generator first."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.mul_(torch.rand_like(module.weight) < density)
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_()
                module.bias.normal_()
    return model.eval()


def prefer(*wanted: str):
    """A timer under which the first of ``wanted`` among the candidates is fastest, dense second."""

    def timer(candidates):
        path = next((p for p in wanted if p in candidates), None)
        return {name: 1.0 if name == path else 2.0 if name == "dense" else 3.0 for name in candidates}

    return timer


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4):
    out, ref = out.detach(), ref.detach()
    assert out.shape == ref.shape and out.dtype == ref.dtype
    error = float((out - ref).abs().max()) / max(float(ref.abs().max()), 1e-12) if out.numel() else 0.0
    assert error <= tol, f"relative error {error:.2e}"


def run(model, x):
    with torch.no_grad():
        return model(x)


def paths(fast: nn.Module) -> dict[str, str]:
    return {p.name: p.path for p in fast.fxsparse_plan.layers}


# ------------------------------------------------------------------------------------------------
# every layer kind, every path, equal to the folded model
# ------------------------------------------------------------------------------------------------
CONVS = {  # name: (Conv2d kwargs, input (C, H, W))
    "1x1": (dict(in_channels=6, out_channels=10, kernel_size=1), (6, 7, 9)),
    "3x3": (dict(in_channels=6, out_channels=10, kernel_size=3, padding=1), (6, 9, 8)),
    "3x3-strided": (dict(in_channels=6, out_channels=10, kernel_size=3, stride=2, padding=1), (6, 11, 10)),
    "1x1-strided": (dict(in_channels=6, out_channels=10, kernel_size=1, stride=2), (6, 9, 9)),
    "5x3-stride-2x1-no-pad": (dict(in_channels=4, out_channels=5, kernel_size=(5, 3), stride=(2, 1)), (4, 12, 9)),
    "3x3-dilated": (dict(in_channels=6, out_channels=8, kernel_size=3, padding=2, dilation=2), (6, 10, 10)),
    "grouped": (dict(in_channels=6, out_channels=9, kernel_size=3, padding=1, groups=3), (6, 8, 8)),
    "depthwise": (dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6), (6, 8, 8)),
    "7x7-stem": (dict(in_channels=3, out_channels=8, kernel_size=7, stride=2, padding=3), (3, 17, 15)),
    "same-even-kernel": (dict(in_channels=4, out_channels=5, kernel_size=4, padding="same"), (4, 9, 8)),
    "no-bias": (dict(in_channels=6, out_channels=10, kernel_size=3, padding=1, bias=False), (6, 8, 8)),
}


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("path", CONV_PATHS)
@pytest.mark.parametrize("kind", sorted(CONVS))
@pytest.mark.parametrize("batch", [1, 3])
def test_conv_equals_folded(kind, path, batch):
    kwargs, shape = CONVS[kind]
    model = prune_(nn.Sequential(nn.Conv2d(**kwargs)))
    x = torch.randn(batch, *shape)
    fast = fxsparse.accelerate(model, x, timer=prefer(path))
    assert_close(run(fast, x), run(model, x))
    expected = "dense" if path.startswith("rows") and kwargs["kernel_size"] == 1 else path  # rows needs a kxk conv
    assert paths(fast) == {"0": expected}
    assert isinstance(fast[0], SparseConv2d) == (expected != "dense")


@pytest.mark.parametrize("path", LINEAR_PATHS)
@pytest.mark.parametrize("shape", [(1, 12), (5, 12), (2, 7, 12), (2, 1, 3, 12)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_folded(path, shape, bias):
    model = prune_(nn.Sequential(nn.Linear(12, 9, bias=bias)))
    x = torch.randn(*shape)
    fast = fxsparse.accelerate(model, x, timer=prefer(path))
    assert isinstance(fast[0], SparseLinear) and paths(fast) == {"0": path}
    assert_close(run(fast, x), run(model, x))


def test_inputs_in_other_memory_layouts():
    """channels_last and non-contiguous inputs go through the strided table builders unchanged."""
    model = prune_(nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2)))
    x = torch.randn(2, 6, 10, 12)
    for path in CONV_PATHS:
        fast = fxsparse.accelerate(model, x, timer=prefer(path))
        assert_close(run(fast, x.to(memory_format=torch.channels_last)), run(model, x))
        assert_close(run(fast, x[:, :, :, ::2]), run(model, x[:, :, :, ::2]))


def test_rows_layout_at_another_input_size():
    """Row bags depend on the input height: another size gets its own bags (eager)."""
    model = prune_(nn.Sequential(nn.Conv2d(4, 6, 3, padding=1)))
    fast = fxsparse.accelerate(model, torch.randn(1, 4, 8, 8), timer=prefer("rows+ebag"))
    for size in [(8, 8), (11, 7), (8, 8)]:
        x = torch.randn(2, 4, *size)
        assert_close(run(fast, x), run(model, x))


def test_four_sided_padding_matches_torch():
    for k, d in [((4, 3), (1, 1)), ((2, 2), (3, 1)), ((5, 5), (2, 2))]:
        pt, pb, pl, pr = four_sided_padding("same", k, d)
        x, w = torch.randn(1, 2, 9, 10), torch.randn(3, 2, *k)
        same = F.conv2d(x, w, padding="same", dilation=d)
        assert torch.allclose(F.conv2d(F.pad(x, (pl, pr, pt, pb)), w, dilation=d), same, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# whole models: BatchNorm folding, sparsified input, the plan
# ------------------------------------------------------------------------------------------------
class ConvBnNet(nn.Module):
    """conv-BN-ReLU stages, a conv whose output also feeds a residual (its BN cannot be folded), a head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 16, 1, stride=2), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        y = self.conv2(x)
        x = F.relu(self.bn2(y) + y)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("path", ["im2col+ebag", "rows+mkl", "dense"])
def test_batchnorm_folded_into_convs(path):
    model = prune_(ConvBnNet())
    x = torch.randn(2, 3, 12, 12)
    fast = fxsparse.accelerate(model, x, timer=prefer(path))
    assert_close(run(fast, x), run(model, x))
    assert fast.fxsparse_plan.folded_batchnorms == ["conv1", "conv3"]  # conv2's output has two users
    kept = [name for name, m in fast.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert kept == ["bn2"]
    assert isinstance(model.bn1, nn.BatchNorm2d) and model.conv1.bias is None  # the input model is untouched


def test_sparsified_model_is_folded_on_a_copy():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4)).eval()
    sparse = fxsparse.sparsify(model, method="gmp", sparsity=0.8, schedule=fxsparse.Constant())
    x = torch.randn(2, 3, 6, 6)
    fast = fxsparse.accelerate(sparse, x, timer=prefer("im2col+ebag"))
    assert fxsparse.is_sparsified(sparse)  # untouched
    assert_close(run(fast, x), run(fxsparse.fold(sparse).eval(), x))
    folded = fxsparse.fold(sparse)
    expected = {
        name: float((m.weight != 0).float().mean())
        for name, m in folded.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }
    assert {p.name: p.density for p in fast.fxsparse_plan.layers} == pytest.approx(expected)
    assert sum(expected.values()) < 1.0


def test_dense_model_gains_nothing_and_is_untimed():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 2)).eval()
    x = torch.randn(1, 3, 4, 4)

    def timer(candidates):
        raise AssertionError("a dense layer must not be timed")

    fast = fxsparse.accelerate(model, x, timer=timer)
    assert type(fast[0]) is nn.Conv2d and type(fast[2]) is nn.Linear
    assert all(p.path == "dense" and "max_density" in p.reason for p in fast.fxsparse_plan.layers)
    assert_close(run(fast, x), run(model, x))


def test_path_choice_and_dense_fallback():
    model = prune_(
        nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 1), nn.Flatten(), nn.Linear(6 * 25, 3))
    )
    x = torch.randn(1, 4, 5, 5)
    times = {
        "0": {"dense": 1.0, "im2col+ebag": 0.5, "rows+ebag": 0.4, "im2col+mkl": 0.6, "rows+mkl": 0.7},
        "2": {"dense": 1.0, "im2col+ebag": 0.97, "im2col+mkl": 2.0},  # faster, but below min_speedup
        "4": {"dense": 1.0, "ebag": 3.0, "mkl": 2.0},
    }
    seen = []

    def timer(candidates):
        layer = next(name for name, t in times.items() if set(t) == set(candidates))
        seen.append(layer)
        return times[layer]

    fast = fxsparse.accelerate(model, x, timer=timer, min_speedup=1.05, kernels=ops.KERNELS)  # the bag kernels
    assert seen == ["0", "2", "4"]
    assert paths(fast) == {"0": "rows+ebag", "2": "dense", "4": "dense"}
    assert isinstance(fast[0], SparseConv2d) and type(fast[2]) is nn.Conv2d and type(fast[4]) is nn.Linear
    assert_close(run(fast, x), run(model, x))
    plan = fast.fxsparse_plan.layers[0]
    assert plan.dense_ms == 1000.0 and plan.sparse_ms == 400.0 and plan.best_sparse == "rows+ebag"
    assert "rows+ebag" in fast.fxsparse_plan.table()
    again = AccelerationPlan.from_dict(json.loads(json.dumps(fast.fxsparse_plan.to_dict())))
    assert again.table() == fast.fxsparse_plan.table() and again.paths() == paths(fast)


@pytest.mark.parametrize(
    "times, chosen",
    [
        ({"ebag": 1.0, "mkl": 1.2, "native": 1.24}, "native"),  # within the margin of the fastest: compiled
        ({"ebag": 1.0, "mkl": 1.2, "native": 1.26}, "ebag"),  # a torch-op kernel faster by more: taken
        ({"im2col+ebag": 1.0, "direct+native": 1.25}, "direct+native"),
        ({"im2col+ebag": 1.0, "direct+native": 1.2, "rows+mkl": 0.9}, "rows+mkl"),
        ({"ebag": 1.0, "mkl": 0.9}, "mkl"),  # no compiled kernel (no compiler): the fastest
        ({}, None),
    ],
)
def test_the_compiled_kernel_is_preferred_unless_another_is_faster_by_the_margin(times, chosen):
    assert preferred_sparse_path(times, 1.25) == chosen


def test_a_layer_takes_the_compiled_kernel_when_a_torch_op_kernel_is_barely_faster_alone():
    if not native.available():
        pytest.skip(f"compiled kernels unavailable: {native.failure()}")
    model = prune_(nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8)), density=0.2)
    x = torch.randn(4, 32)
    timer = lambda c: {n: 3.0 if n == "dense" else 1.0 if n == "ebag" else 1.2 if n == "native" else 2.0 for n in c}  # noqa: E731
    fast = fxsparse.accelerate(model, x, timer=timer, end_to_end=False)
    assert paths(fast) == {"0": "native", "2": "native"}
    assert dict(fast.named_modules())["0"].activation == "gelu"  # what only the compiled path gains: the fused epilogue
    assert_close(run(fast, x), run(model, x))


def test_kernels_and_layouts_can_be_restricted():
    model = prune_(nn.Sequential(nn.Conv2d(4, 6, 3, padding=1)))
    x = torch.randn(1, 4, 6, 6)
    asked = []
    fast = fxsparse.accelerate(
        model,
        x,
        kernels=["mkl"],
        layouts=["im2col"],
        timer=lambda c: asked.append(sorted(c)) or {n: 1.0 if n != "dense" else 9.0 for n in c},
    )
    assert asked == [["dense", "im2col+mkl"]] and paths(fast) == {"0": "im2col+mkl"}


def test_default_timer_keeps_outputs():
    model = prune_(ConvBnNet(), density=0.1)
    x = torch.randn(1, 3, 16, 16)
    fast = fxsparse.accelerate(model, x)
    assert_close(run(fast, x), run(model, x))
    assert fast.fxsparse_plan.threads == torch.get_num_threads()
    assert all(set(p.times) >= {"dense"} for p in fast.fxsparse_plan.layers)


def test_progress_bar_leaves_outputs_alone(monkeypatch):
    """The progress bar advances from forward hooks; tqdm's update() returns True when it redraws, and a hook's
    return value would replace the layer's output (it did: BERT failed in the planning pass)."""
    import tqdm.auto

    def redraws(self, n=1):
        self.n += n
        return True

    monkeypatch.setattr(tqdm.auto.tqdm, "update", redraws)
    model = prune_(ConvBnNet(), density=0.1)
    x = torch.randn(1, 3, 16, 16)
    fast = fxsparse.accelerate(model, x, progress=True, timer=prefer("direct+native", "rows+native"))
    assert_close(run(fast, x), run(model, x))


class ReadsWeight(nn.Module):
    """A parent that reads its child's weight directly (as nn.MultiheadAttention does)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x) + self.proj.weight.sum()


def test_module_reading_a_weight_needs_exclude_unless_the_layer_can_be_rebuilt_dense():
    model = prune_(ReadsWeight())
    x = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="exclude"):  # planned, then read: without the end-to-end check's
        fxsparse.accelerate(model, x, timer=prefer("ebag"))  # CSR parts it cannot be rebuilt dense
    fast = fxsparse.accelerate(model, x, timer=prefer("ebag"), exclude="proj")
    assert type(fast.proj) is nn.Linear
    assert_close(run(fast, x), run(model, x))
    sparse_wins = lambda candidates: {name: 1.0 if name == "sparse" else 2.0 for name in candidates}  # noqa: E731
    with pytest.warns(UserWarning, match="proj stays dense"):
        fast = fxsparse.accelerate(model, x, timer=prefer("ebag"), model_timer=sparse_wins)
    assert type(fast.proj) is nn.Linear
    assert_close(run(fast, x), run(model, x))


def test_layer_not_called_by_the_example_stays_dense():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x, use_both: bool = False):
            return self.unused(self.used(x)) if use_both else self.used(x)

    model = prune_(Branchy())
    fast = fxsparse.accelerate(model, torch.randn(1, 4), timer=prefer("ebag"))
    assert paths(fast) == {"used": "ebag", "unused": "dense"} and type(fast.unused) is nn.Linear
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert_close(fast(x, use_both=True), model(x, use_both=True))


def test_measure_speedup_reports():
    model = prune_(ConvBnNet(), density=0.1)
    result = fxsparse.measure_speedup(model, torch.randn(1, 3, 16, 16), repeats=2, timer=prefer("im2col+ebag", "ebag"))
    assert result["dense_ms"] > 0 and result["accelerated_ms"] > 0 and result["threads"] == torch.get_num_threads()
    assert result["speedup"] == pytest.approx(result["dense_ms"] / result["accelerated_ms"])
    assert result["layers"] == 4 and result["sparse_layers"] == 4 and len(result["plan"]["layers"]) == 4


def test_bad_example_input():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="example_input"):
        fxsparse.accelerate(model, "not a tensor")


# ------------------------------------------------------------------------------------------------
# torch.compile and torch.export
# ------------------------------------------------------------------------------------------------
def _accelerated_net():
    model = prune_(ConvBnNet())
    x = torch.randn(2, 3, 12, 12)
    wanted = iter(["rows+ebag", "im2col+mkl", "im2col+ebag", "mkl"])  # conv1, conv2, conv3, fc in call order

    def timer(candidates):
        path = next(wanted)
        return {name: 1.0 if name == path else 2.0 for name in candidates}

    return model, fxsparse.accelerate(model, x, timer=timer), x


def test_compile_round_trip():
    model, fast, x = _accelerated_net()
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)
    assert_close(run(compiled, x), run(model, x))


@pytest.mark.slow
def test_compile_inductor_round_trip():
    model, fast, x = _accelerated_net()
    compiled = torch.compile(fast, fullgraph=True)
    assert_close(run(compiled, x), run(model, x))


def test_export_round_trip():
    model, fast, x = _accelerated_net()
    program = torch.export.export(fast, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"fxsparse.conv2d.default", "fxsparse.linear.default"} <= targets
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    assert_close(loaded.module()(x), run(model, x))


def test_fake_kernels_match_real_shapes():
    x = torch.randn(2, 4, 9, 7)
    w = torch.randn(6, 2, 3, 3) * (torch.rand(6, 2, 3, 3) < 0.5)
    bags = ops.rows_bags(*to_csr(w), None, 4, 2, (3, 3), (2, 1), (1, 1, 0, 2), (1, 2), (9, 7))
    args = (6, [3, 3], [2, 1], [1, 1, 0, 2], [1, 2], [9, 7], "rows", "ebag")
    real = torch.ops.fxsparse.conv2d(x, *bags, *args)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = torch.ops.fxsparse.conv2d(mode.from_tensor(x), *(mode.from_tensor(b) for b in bags), *args)
    assert fake.shape == real.shape and fake.stride() == real.stride()


# ------------------------------------------------------------------------------------------------
# straight from a CSR checkpoint
# ------------------------------------------------------------------------------------------------
def test_skeleton_puts_parameters_on_meta_and_keeps_buffers():
    with skeleton():
        model = ConvBnNet()
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())
    assert nn.Linear(2, 2).weight.device.type == "cpu"  # restored on exit


@pytest.mark.parametrize("path", ["im2col+ebag", "rows+mkl", "dense"])
def test_accelerate_checkpoint_equals_folded(tmp_path, path):
    model = prune_(ConvBnNet(), density=0.2)
    file = tmp_path / "net.safetensors"
    fxsparse.save_csr(model, file)
    x = torch.randn(2, 3, 12, 12)
    with skeleton():
        skeleton_model = ConvBnNet()
    fast = fxsparse.accelerate_checkpoint(file, skeleton_model, x, timer=prefer(path, path.split("+")[-1]))
    assert_close(run(fast, x), run(model, x))
    assert fast.fxsparse_plan.folded_batchnorms == ["conv1", "conv3"]
    for layer in fast.modules():
        if isinstance(layer, (SparseConv2d, SparseLinear)):
            assert layer.dense_weight is None  # the sparse layers hold their bags only


def test_accelerate_checkpoint_never_densifies_sparse_layers(tmp_path, monkeypatch):
    """Sparse layers end up holding no dense weight; each one is densified once, transiently, to time dense."""
    model = prune_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 16, 4)), density=0.2)
    file = tmp_path / "net.safetensors"
    fxsparse.save_csr(model, file)
    import fxsparse.inference.layers as layers

    densified = []
    real = layers.from_csr
    monkeypatch.setattr(layers, "from_csr", lambda *a: densified.append(a[-1]) or real(*a))
    with skeleton():
        plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 16, 4))
    x = torch.randn(1, 3, 6, 6)
    fast = fxsparse.accelerate_checkpoint(file, plain, x, timer=prefer("im2col+ebag", "ebag"))
    assert_close(run(fast, x), run(model, x))
    # the dense weight is built once per layer, only to time the dense path, and then dropped
    assert densified == [(8, 3, 3, 3), (4, 128)]
    assert all(getattr(m, "dense_weight", None) is None for m in fast.modules())


def test_accelerate_checkpoint_refuses_another_architecture(tmp_path):
    model = prune_(nn.Sequential(nn.Linear(6, 4)))
    file = tmp_path / "net.safetensors"
    fxsparse.save_csr(model, file)
    with skeleton():
        other = nn.Sequential(nn.Linear(5, 4))
    with pytest.raises(ValueError, match="0.weight"):
        fxsparse.accelerate_checkpoint(file, other, torch.randn(1, 5))


def test_accelerate_checkpoint_refuses_bad_csr_parts(tmp_path):
    """A CSR part that passes its CRC but points outside the matrix is refused, naming the tensor."""
    import json
    import zlib

    from safetensors import safe_open
    from safetensors.torch import save_file

    model = prune_(nn.Sequential(nn.Linear(6, 4)))
    file = tmp_path / "net.safetensors"
    fxsparse.save_csr(model, file)
    with safe_open(file, "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata()
    document = json.loads(metadata["fxsparse"])
    key = "0.weight::col_indices"
    tensors[key] = tensors[key].clone()
    tensors[key][-1] = 6  # one past the last column
    document["crc32"][key] = zlib.crc32(tensors[key].numpy())
    save_file(tensors, file, metadata={"fxsparse": json.dumps(document)})
    with skeleton():
        plain = nn.Sequential(nn.Linear(6, 4))
    with pytest.raises(CsrFormatError, match="'0.weight'.*column index"):
        fxsparse.accelerate_checkpoint(file, plain, torch.randn(1, 6))


class TransposedNet(nn.Module):
    """Transposed convs (their weights are stored with output_axis 1) around a conv and a linear."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, groups=2)  # weight (4, 3, 3, 3): matrix (6, 18)
        self.square = nn.ConvTranspose2d(6, 6, 1)  # weight (6, 6, 1, 1): matrix its transpose, same shape
        self.conv = nn.Conv2d(6, 8, 3)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(self.conv(self.square(self.up(x))).flatten(1))


def test_accelerate_checkpoint_reads_transposed_conv_weights(tmp_path):
    """ConvTranspose weights are stored as the CSR of their (out, in) matrix (output_axis 1): densified with that
    layout, not as a (shape[0], rest) view (which was refused, or silently transposed for a square one)."""
    model = prune_(TransposedNet())
    with torch.no_grad():
        for layer in (model.up, model.square):
            layer.weight.mul_(torch.rand_like(layer.weight) < 0.25)
    file = tmp_path / "net.safetensors"
    fxsparse.save_csr(model, file)
    entries = fxsparse.read_csr_metadata(file)["tensors"]
    assert [entries[f"{n}.weight"]["output_axis"] for n in ("up", "square", "conv", "fc")] == [1, 1, 0, 0]
    with skeleton():
        plain = TransposedNet()
    x = torch.randn(1, 4, 4, 4)
    fast = fxsparse.accelerate_checkpoint(file, plain, x, timer=prefer("im2col+ebag", "ebag"))
    assert paths(fast) == {"conv": "im2col+ebag", "fc": "ebag"}
    assert torch.equal(fast.up.weight, model.up.weight) and torch.equal(fast.square.weight, model.square.weight)
    assert_close(run(fast, x), run(model, x))


def _store_with_output_axis_1(file, name: str, weight: torch.Tensor) -> None:
    """Rewrite the CSR entry ``name`` of a checkpoint as the CSR of the weight's transpose (output_axis 1), as
    another writer may: the same tensor, another layout."""
    import zlib

    from safetensors import safe_open
    from safetensors.torch import save_file

    from fxsparse.layers import MatrixLayout

    with safe_open(file, "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        document = json.loads(handle.metadata()["fxsparse"])
    parts = to_csr(weight, MatrixLayout(output_axis=1))
    for part, tensor in zip(("crow_indices", "col_indices", "values"), parts):
        tensors[f"{name}::{part}"] = tensor
        document["crc32"][f"{name}::{part}"] = zlib.crc32(tensor.contiguous().view(torch.uint8).numpy())
    entry = document["tensors"][name]
    entry.update(output_axis=1, groups=1, index_dtypes=[str(t.dtype).removeprefix("torch.") for t in parts[:2]])
    save_file(tensors, file, metadata={"fxsparse": json.dumps(document)})


@pytest.mark.parametrize("shape", [(6, 6), (4, 6)], ids=["square", "wide"])
def test_a_linear_weight_stored_with_output_axis_1_runs_sparse(tmp_path, monkeypatch, shape):
    """A Linear weight stored as the CSR of its transpose is converted to the kernels' (out, in) CSR from its
    nonzeros (no dense weight), instead of being read as a (shape[0], rest) CSR: silently transposed (square)
    or refused (wide) before."""
    out_features, in_features = shape
    model = prune_(nn.Sequential(nn.Linear(in_features, out_features)))
    file = tmp_path / "net.safetensors"
    fxsparse.save_csr(model, file)
    _store_with_output_axis_1(file, "0.weight", model[0].weight.detach())
    assert fxsparse.read_csr_metadata(file)["tensors"]["0.weight"]["output_axis"] == 1
    reference = nn.Sequential(nn.Linear(in_features, out_features))
    fxsparse.load_csr_into_(reference, file)
    assert torch.equal(reference[0].weight, model[0].weight)
    import fxsparse.export as export

    densified = []
    real = export.from_csr
    monkeypatch.setattr(export, "from_csr", lambda *a, **k: densified.append(a[3]) or real(*a, **k))
    with skeleton():
        plain = nn.Sequential(nn.Linear(in_features, out_features))
    x = torch.randn(3, in_features)
    fast = fxsparse.accelerate_checkpoint(file, plain, x, timer=prefer("ebag"), paths={"0": "ebag"})
    assert isinstance(fast[0], SparseLinear) and densified == []
    assert_close(run(fast, x), run(model, x))


# ------------------------------------------------------------------------------------------------
# chained linears pass feature-first activations
# ------------------------------------------------------------------------------------------------
class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 (a transformer MLP), then fc3 after a residual (not chainable)."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.fc1, self.act, self.drop = nn.Linear(8, 16, bias=bias), nn.GELU(), nn.Dropout(0.1)
        self.fc2 = nn.Linear(16, 8, bias=bias)
        self.fc3, self.fc4 = nn.Linear(8, 8), nn.Linear(8, 6)

    def forward(self, x):
        x = x + self.fc2(self.drop(self.act(self.fc1(x))))
        y = F.relu(self.fc3(x))
        return self.fc4(y) + y.sum(-1, keepdim=True)  # y has two users: fc3 -> fc4 must not chain


@pytest.mark.parametrize("path", LINEAR_PATHS)
@pytest.mark.parametrize("shape", [(1, 8), (5, 8), (2, 3, 8), (1, 1, 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_chained_linears_equal_folded(path, shape, bias):
    model = prune_(Mlp(bias))
    x = torch.randn(*shape)
    fast = fxsparse.accelerate(model, x, timer=prefer(path))
    assert fast.fxsparse_plan.chained_linears == [("fc1", "fc2")]
    assert fast.fc1.features_first_out and fast.fc2.features_first_in and not fast.fc3.features_first_out
    assert_close(run(fast, x), run(model, x))


def test_three_linears_chain_through_relu_and_silu():
    model = prune_(nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.SiLU(), nn.Linear(10, 4)))
    x = torch.randn(2, 7, 6)
    fast = fxsparse.accelerate(model, x, timer=prefer("ebag"))
    assert fast.fxsparse_plan.chained_linears == [("0", "2"), ("2", "4")]
    assert_close(run(fast, x), run(model, x))
    program = torch.export.export(fast, (x,))
    assert_close(program.module()(x), run(model, x))


@pytest.mark.parametrize("features_first", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("kernel", ops.KERNELS)
def test_linear_op_in_token_chunks(monkeypatch, features_first, kernel):
    """Many tokens are multiplied chunk by chunk; every chunk lands in its place, bias included."""
    monkeypatch.setattr(ops, "TABLE_CHUNK_BYTES", 4 * 13 * 64)  # 64 tokens per chunk for 12 features + ones
    w = torch.randn(5, 12) * (torch.rand(5, 12) < 0.4)
    bias = torch.randn(5)
    x = torch.randn(3, 70, 12)  # 210 tokens: chunks of 64, 64, 64, 18
    ff_in, ff_out = features_first
    bags = ops.dense_bags(*to_csr(w), bias, 12)
    separate = None
    if ff_in:
        bags, separate = ops.split_bias(bags, 12)
    inp = x.permute(2, 0, 1).contiguous() if ff_in else x
    out = torch.ops.fxsparse.linear(inp, *bags, separate, 5, ff_in, ff_out, kernel)
    ref = F.linear(x, w, bias)
    assert_close(out, ref.permute(2, 0, 1) if ff_out else ref)


def test_given_paths_are_taken_without_timing(tmp_path, monkeypatch):
    """A previous plan rebuilds the same model untimed; from a checkpoint nothing is densified then."""
    model = prune_(ConvBnNet(), density=0.2)
    x = torch.randn(1, 3, 12, 12)
    first = fxsparse.accelerate(model, x, timer=prefer("rows+ebag", "mkl"))
    assert paths(first) == {"conv1": "rows+ebag", "conv2": "rows+ebag", "conv3": "dense", "fc": "mkl"}

    def timer(candidates):
        raise AssertionError("nothing is timed when every path is given")

    again = fxsparse.accelerate(model, x, timer=timer, paths=first.fxsparse_plan)
    assert paths(again) == paths(first) and all(p.times == {} for p in again.fxsparse_plan.layers)
    assert_close(run(again, x), run(model, x))

    file = tmp_path / "net.safetensors"
    fxsparse.save_csr(model, file)
    import fxsparse.inference.layers as layers

    densified = []
    real = layers.from_csr
    monkeypatch.setattr(layers, "from_csr", lambda *a: densified.append(a[-1]) or real(*a))
    sparse_paths = {**first.fxsparse_plan.paths(), "conv3": "im2col+ebag"}
    with skeleton():
        plain = ConvBnNet()
    built = fxsparse.accelerate_checkpoint(file, plain, x, timer=timer, paths=sparse_paths)
    assert densified == [] and paths(built) == sparse_paths
    assert_close(run(built, x), run(model, x))


def test_a_given_path_a_layer_cannot_run_is_timed():
    model = prune_(nn.Sequential(nn.Conv2d(4, 4, 1)))
    x = torch.randn(1, 4, 5, 5)
    with pytest.warns(UserWarning, match="cannot run the given path 'rows\\+ebag'"):
        fast = fxsparse.accelerate(model, x, timer=prefer("im2col+mkl"), paths={"0": "rows+ebag"})
    assert paths(fast) == {"0": "im2col+mkl"}


def test_bench_magnitude_masks_are_exact_per_layer(load_tool):
    bench = load_tool("bench_inference")
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(7, 5))
    bench.magnitude_prune_(model, 0.9)
    for module in model:
        assert int((module.weight == 0).sum()) == round(0.9 * module.weight.numel())


def test_bench_global_and_erk_masks(load_tool):
    bench = load_tool("bench_inference")
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 1), nn.Linear(64, 10)]
    model = nn.Sequential(*layers)
    total = sum(m.weight.numel() for m in layers)
    original = [m.weight.detach().clone() for m in layers]
    bench.MASKS["global"](model, 0.8)
    assert sum(int((m.weight == 0).sum()) for m in layers) == round(0.8 * total)
    kept = torch.cat([w[m.weight != 0].abs() for w, m in zip(original, layers)])
    pruned = torch.cat([w[m.weight == 0].abs() for w, m in zip(original, layers)])
    assert kept.min() > pruned.max()  # one threshold over the pool
    for module, weight in zip(layers, original):
        module.weight.data.copy_(weight)
    bench.MASKS["erk"](model, 0.8)
    # ERK by hand: density proportional to sum(dims) / prod(dims), scaled so that the pool keeps 20%
    scale = [sum(m.weight.shape) / m.weight.numel() for m in layers]
    eps = (0.2 * total) / sum(s * m.weight.numel() for s, m in zip(scale, layers))
    assert all(eps * s < 1 for s in scale)  # no layer dense at these shapes
    for module, s in zip(layers, scale):
        assert abs(int((module.weight != 0).sum()) - eps * s * module.weight.numel()) <= 1
    assert sum(int((m.weight == 0).sum()) for m in layers) == round(0.8 * total)


def test_bench_rounds_keep_each_round_and_pair_them(load_tool):
    """The benchmark's interleaved_rounds gives every timed call, round by round, each after an untimed one;
    paired_ratios is the median of the ratios within a round, not the ratio of the medians."""
    runtimes = load_tool("bench_runtimes")

    class Fake:
        def __init__(self, name, seconds):
            self.name, self.seconds, self.calls = name, list(seconds), 0

        def once(self):
            self.calls += 1
            return self.seconds[(self.calls - 1) // 2]  # the untimed call and the timed one of a round

    fxsparse_times, other_times = [1.0, 2.0, 2.0], [1.1, 2.2, 1.9]
    fast, other = Fake("fxsparse", fxsparse_times), Fake("other", other_times)
    samples = runtimes.interleaved_rounds([fast, other], repeats=3, warmup=0, settle_s=0.0)
    assert samples == {"fxsparse": fxsparse_times, "other": other_times} and fast.calls == other.calls == 6
    paired = paired_ratios(samples, "fxsparse")
    assert paired == {"fxsparse": 1.0, "other": pytest.approx(1.1)}  # rounds: 1.1, 1.1, 0.95
    assert statistics.median(other_times) / statistics.median(fxsparse_times) == pytest.approx(0.95)


@pytest.mark.parametrize(
    "speedups, chosen, timings",
    [
        ([1.50], True, 1),  # clear: timed once
        ([0.80], False, 1),
        ([1.04, 1.20], True, 2),  # near the threshold: timed again, sqrt(1.04 * 1.20) = 1.117 >= 1.05
        ([1.06, 0.98], False, 2),  # sqrt(1.06 * 0.98) = 1.019 < 1.05
    ],
)
def test_a_switch_timed_near_its_threshold_is_timed_again(speedups, chosen, timings):
    """time_switch: a first speed-up within SECOND_TIMING_BAND of min_speedup is timed a second time and the
    geometric mean of the two decides; the switch is left as chosen and the reason gives both timings."""
    state, calls = {"on": None}, []

    def timer(candidates):
        speedup = speedups[len(calls)]
        calls.append(sorted(candidates))
        for run in candidates.values():
            run()
        return {"off": speedup, "on": 1.0}

    record = timing.time_switch(timer, lambda on: state.update(on=on), lambda: None, ("off", "on"), 1.05, "off")
    assert len(calls) == timings and record["chosen"] is chosen and state["on"] is chosen
    assert ("timed twice" in record["reason"]) is (timings == 2)
    assert record["reason"].startswith(f"{statistics.geometric_mean(speedups):.2f}x of off")
