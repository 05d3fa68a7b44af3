"""The runtimes tools/bench_inference.py compares fxsparse.accelerate with (issue 16), each optional.

Every runtime runs the same folded model (BatchNorms folded) on the same input, one call at a time, and says
how long its call took (wall clock, time.perf_counter). ONNX Runtime and OpenVINO run the ONNX export of the
dense-with-zeros model; DeepSparse runs the same file in its own venv (tools/deepsparse_worker.py, driven
through a pipe; it times its own call); torch.compile compiles the dense model. One that is not installed
(or fails to build) is left out with a one-line note. interleaved_rounds() times them all in the same rounds
and gives every round's times (fxsparse.inference.timing.paired_ratios compares them round by round).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fxsparse.inference import batch_split, call_model
from fxsparse.inference.timing import settle

DEEPSPARSE_ENV = "FXSPARSE_DEEPSPARSE_PYTHON"  # the deepsparse venv's python (or --deepsparse-python)
OPTIONAL = ("compile", "onnxruntime", "openvino", "deepsparse")


def first_tensor(output: Any) -> torch.Tensor:
    """The tensor a model's output leads with (a tensor, .last_hidden_state, .logits, or the first item)."""
    for attribute in ("last_hidden_state", "logits"):
        if hasattr(output, attribute):
            return getattr(output, attribute)
    return output if isinstance(output, torch.Tensor) else output[0]


def named_inputs(example: Any) -> dict[str, torch.Tensor]:
    return dict(example) if isinstance(example, Mapping) else {"input": example}


class Runtime:
    """One way to run the model: once() -> seconds of one call; output() -> its output as a torch tensor."""

    name = ""

    def once(self) -> float:
        raise NotImplementedError

    def output(self) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TorchRuntime(Runtime):
    def __init__(self, name: str, model: Callable, example: Any):
        self.name, self.model, self.example = name, model, example

    def once(self) -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            call_model(self.model, self.example)
            return time.perf_counter() - start

    def output(self) -> torch.Tensor:
        with torch.inference_mode():
            return first_tensor(call_model(self.model, self.example)).clone()


class _Positional(nn.Module):
    """The model called with its named inputs in a fixed order, returning its leading tensor (for export)."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, *tensors):
        if self.names == ["input"]:
            return first_tensor(self.model(tensors[0]))
        return first_tensor(self.model(**dict(zip(self.names, tensors))))


def export_onnx(model: nn.Module, dense: nn.Module, example: Any, path: str) -> None:
    """The dense model as ONNX with static shapes (TorchScript exporter, on a copy: exporting changed a
    transformers model's later outputs). The exporter folds eval BatchNorms into the convs itself, so the
    unfolded ``model`` is exported when that leaves no BatchNormalization node: it keeps the module names the
    per-layer profile needs (the BN-folded ``dense`` is a torch.fx GraphModule whose names are flat)."""
    import onnx

    inputs = named_inputs(example)
    for source in (model, dense):
        wrapper = _Positional(copy.deepcopy(source), list(inputs)).eval()
        with torch.no_grad():
            torch.onnx.export(
                wrapper, tuple(inputs.values()), path, dynamo=False, input_names=list(inputs), opset_version=17
            )
        if not any(node.op_type == "BatchNormalization" for node in onnx.load(path).graph.node):
            return


class OnnxRuntime(Runtime):
    name = "onnxruntime"

    def __init__(self, path: str, example: Any, threads: int, profile: bool = False):
        """profile: record every node's time (layer_ms()), in a file next to the ONNX file."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.enable_profiling = profile
        options.profile_file_prefix = os.path.join(os.path.dirname(os.path.abspath(path)), "onnxruntime_profile")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.feed = {name: t.numpy() for name, t in named_inputs(example).items()}
        self.version = ort.__version__

    def once(self) -> float:
        start = time.perf_counter()
        self.session.run(None, self.feed)
        return time.perf_counter() - start

    def output(self) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, self.feed)[0])

    def layer_ms(self, runs: int = 5) -> dict[str, float]:
        """Per-layer milliseconds (median over runs of each ONNX node's kernel time, summed per torch module)."""
        for _ in range(runs):
            self.session.run(None, self.feed)
        with open(self.session.end_profiling()) as handle:
            events = json.load(handle)
        per_node: dict[str, list[float]] = {}
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                per_node.setdefault(event["name"][: -len("_kernel_time")], []).append(event["dur"] / 1e3)
        layers: dict[str, float] = {}
        for node, durations in per_node.items():
            module = module_of_onnx_node(node)
            layers[module] = layers.get(module, 0.0) + statistics.median(durations)
        return layers


def module_of_onnx_node(node: str) -> str:
    """torch module name of a TorchScript-exported node: "/layer1/layer1.0/downsample/downsample.0/Conv" ->
    "layer1.0.downsample.0" (each scope repeats its parent's last name as a prefix), wrapper "model." removed."""
    parts: list[str] = []
    for scope in node.strip("/").split("/")[:-1]:
        head, _, tail = scope.rpartition(".")
        parts.append(tail if head and parts and head == parts[-1] else scope)
    name = ".".join(parts)
    return name[len("model.") :] if name.startswith("model.") else name


class OpenVinoRuntime(Runtime):
    name = "openvino"

    def __init__(self, path: str, example: Any, threads: int):
        import openvino as ov

        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        self.compiled = ov.Core().compile_model(path, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.feed = {name: t.numpy() for name, t in named_inputs(example).items()}
        self.version = ov.__version__

    def once(self) -> float:
        start = time.perf_counter()
        self.request.infer(self.feed)
        return time.perf_counter() - start

    def output(self) -> torch.Tensor:
        self.request.infer(self.feed)
        return torch.from_numpy(np.array(self.request.get_output_tensor(0).data))


class DeepSparseRuntime(Runtime):
    """DeepSparse in its own venv (tools/deepsparse_worker.py), which times its own engine.run."""

    name = "deepsparse"

    def __init__(self, python: str, path: str, example: Any, threads: int, batch: int, workdir: str):
        inputs = os.path.join(workdir, "deepsparse_inputs.npz")
        np.savez(inputs, *[t.numpy() for t in named_inputs(example).values()])
        worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deepsparse_worker.py")
        env = {**os.environ, "NM_DISABLE_ANALYTICS": "1"}
        self.workdir = workdir
        self.process = subprocess.Popen(
            [python, worker, path, inputs, str(threads), str(batch)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        line = self._read()
        while line and not line.startswith("ready"):  # DeepSparse prints its own banner lines first
            line = self._read()
        if not line.startswith("ready"):
            raise RuntimeError("the DeepSparse worker exited before its engine was ready (see its messages above)")
        self.version = line.partition(" ")[2]

    def _read(self) -> str:
        return self.process.stdout.readline().strip()

    def _ask(self, command: str) -> str:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._read()

    def once(self) -> float:
        return float(self._ask("run"))

    def output(self) -> torch.Tensor:
        path = os.path.join(self.workdir, "deepsparse_output.npy")
        self._ask(f"output {path}")
        return torch.from_numpy(np.load(path))

    def layer_ms(self) -> dict[str, Any]:
        path = os.path.join(self.workdir, "deepsparse_profile.json")
        self._ask(f"profile {path}")
        with open(path) as handle:
            return json.load(handle)

    def close(self) -> None:
        if self.process.poll() is None:
            self._ask("quit")
            self.process.wait(timeout=30)


def deepsparse_python(option: str | None) -> str | None:
    return option or os.environ.get(DEEPSPARSE_ENV)


def make_runtimes(
    wanted: Sequence[str],
    dense: nn.Module,
    example: Any,
    threads: int,
    batch: int,
    workdir: str,
    onnx_path: str | None,
    ds_python: str | None,
    compiled: Callable | None = None,
) -> tuple[list[Runtime], list[str]]:
    """(the optional runtimes that could be built, one-line notes for those left out)."""
    runtimes, notes = [], []
    for name in wanted:
        try:
            if name == "compile":
                compiled = compiled if compiled is not None else torch.compile(dense)
                runtimes.append(TorchRuntime("torch.compile (dense)", compiled, example))
            elif name in ("onnxruntime", "openvino", "deepsparse") and onnx_path is None:
                notes.append(f"{name}: skipped (no ONNX export: install the bench extra, pip install -e .[bench])")
            elif name == "onnxruntime":
                runtimes.append(OnnxRuntime(onnx_path, example, threads))
            elif name == "openvino":
                runtimes.append(OpenVinoRuntime(onnx_path, example, threads))
            elif name == "deepsparse":
                if not ds_python:
                    notes.append(
                        f"deepsparse: skipped (give --deepsparse-python or {DEEPSPARSE_ENV}: the python of a venv "
                        "with deepsparse==1.8.0, docs/INFERENCE.md)"
                    )
                    continue
                runtimes.append(DeepSparseRuntime(ds_python, onnx_path, example, threads, batch, workdir))
        except ImportError as error:
            notes.append(f"{name}: skipped (not installed: {error.name}; pip install -e .[bench])")
        except Exception as error:  # an optional comparison must not stop the benchmark
            notes.append(f"{name}: skipped ({type(error).__name__}: {str(error).splitlines()[0][:200]})")
    return runtimes, notes


def interleaved_rounds(
    runtimes: Sequence[Runtime], repeats: int, warmup: int = 2, settle_s: float = 0.2
) -> dict[str, list[float]]:
    """Seconds of each runtime's timed call, round by round: ``warmup`` calls each, then ``repeats`` rounds in
    which every runtime runs once, the order rotating from round to round (a burst of load hits all of them).

    In a round each runtime first runs untimed for ``settle_s`` seconds (one call at least), so that its timed
    call runs as it would on its own: the runtime before it leaves threads spinning (torch's OpenMP pool, ONNX
    Runtime's, DeepSparse's in its own process) and caches holding its own data. ResNet-50 90%, batch 1, two
    threads (AMD EPYC VM, 7 Dec): DeepSparse alone 18-21 ms; in the rounds 39-41 ms with no untimed call, 24-37
    ms with one, 22 ms with two, 21 ms with 0.2 s of them (fxsparse 17.5-19 ms alone, 19-20 ms in the rounds)."""
    for runtime in runtimes:
        for _ in range(warmup):
            runtime.once()
    samples: dict[str, list[float]] = {r.name: [] for r in runtimes}
    for index in range(repeats):
        shift = index % len(runtimes)
        for runtime in [*runtimes[shift:], *runtimes[:shift]]:
            settle(runtime.once, settle_s)  # untimed: until the previous runtime's threads have stopped spinning
            samples[runtime.name].append(runtime.once())
    return samples


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """max |output - reference| / max |reference| (the library's measure), output reshaped as reference."""
    return batch_split.relative_error(output.float().reshape(reference.shape), reference.float())
