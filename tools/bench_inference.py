#!/usr/bin/env python
"""Inference speed of fxsparse.accelerate against torch eager dense and the runtimes users would pick (issue 16).

For each configuration (model, masks, sparsity, batch, threads) it builds the sparse model (random init, no
download; BatchNorm statistics calibrated on random batches after pruning, as a trained model's would be),
accelerates it at that batch and thread count, and times in the same interleaved rounds (wall clock,
medians): the baseline, torch eager on the dense-with-zeros model with its BatchNorms folded into the convs;
fxsparse; and, each optional (skipped with a one-line note when not installed), torch.compile of the dense
model, ONNX Runtime and OpenVINO (fp32) on the ONNX export of the same model, and DeepSparse 1.8.0 in its own
venv (--deepsparse-python or $FXSPARSE_DEEPSPARSE_PYTHON). Every runtime's output is checked against the
baseline's. --table prints the per-layer plan and a per-block comparison (--layers adds ONNX Runtime's and
DeepSparse's profiles), so the remaining gap shows layer by layer.

Models: timm names, bert-base (transformers BERT-base config, 128 tokens), gpt2 (124M config: generate() of
--new-tokens greedy tokens at batch 1, tokens/s, and whether the tokens equal the folded model's).
Masks: "magnitude" prunes every conv/linear weight to the sparsity by |w|, layer by layer (the uniform
distribution); "global" ranks all of them by |w| against one threshold (ST-3's global mask); "erk" prunes each
by |w| to its Erdos-Renyi-Kernel share (sparsify's distribution="erk"); "global-sigma" is a global
ST-3-sigma-shaped mask (score |w| * sqrt(S_l), one threshold); each is reported against its MAC reduction;
--checkpoint takes a CSR checkpoint instead (e.g. the main job's runs/<name>/model.csr.safetensors, with
--arch cnn --input 1,1,28,28), built with fxsparse.accelerate_checkpoint.

--save-checkpoint PATH writes the magnitude-pruned model as a CSR checkpoint (first --model/--sparsity), and
--memory PATH measures, in this fresh process, the peak memory growth of fxsparse.accelerate_checkpoint
against the checkpoint's CSR bytes and the dense weights' bytes (counted from after the imports and the model
skeleton), timed, then in fresh processes untimed with the plan it chose and for the dense model; --paths
PLAN.json builds once with a given plan.

Results are appended to --results (JSON lines); a configuration already there is skipped unless --force,
so an interrupted run resumes and single configurations are cheap to redo. --plot draws speedup against
sparsity from the results file.

    pip install -e .[bench]
    python3.11 -m venv /opt/ds && /opt/ds/bin/pip install deepsparse==1.8.0
    export FXSPARSE_DEEPSPARSE_PYTHON=/opt/ds/bin/python
    python tools/bench_inference.py --model resnet50 --sparsity 0.9 0.95 --batch 1 --threads 1 2 --table --layers
    python tools/bench_inference.py --model bert-base gpt2 --sparsity 0.9 --threads 1
    python tools/bench_inference.py --model resnet50 --masks global-sigma --sparsity 0.9 --runtimes
    python tools/bench_inference.py --model resnet50 --masks global erk --sparsity 0.9 --threads 1 --runtimes
    python tools/bench_inference.py --checkpoint runs/main/model.csr.safetensors --arch cnn --input 1,1,28,28 --runtimes
    python tools/bench_inference.py --show --table
    python tools/bench_inference.py --plot speedup.png
    python tools/bench_inference.py --model resnet50 --sparsity 0.9 --save-checkpoint r50.safetensors
    python tools/bench_inference.py --memory r50.safetensors --arch resnet50
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

import fxsparse
from fxsparse.atomic import atomic_write
from fxsparse.inference import interleaved_medians
from fxsparse.inference.end_to_end import SETTLE_S
from fxsparse.inference.timing import clock_name, paired_ratios

BERT = "bert-base"
GPT2 = "gpt2"  # generate() of --new-tokens tokens, batch 1 (tokens/s)
MODELS = ("resnet50", "vit_small_patch16_224", BERT, GPT2)
OPTIONAL_RUNTIMES = ("compile", "onnxruntime", "openvino", "deepsparse")


def build(model_name: str, seed: int = 0) -> nn.Module:
    """A randomly initialised model (no download): a timm name, or bert-base (transformers, BERT-base config)."""
    torch.manual_seed(seed)
    if model_name == BERT:
        from transformers import BertConfig, BertModel

        return BertModel(BertConfig(), add_pooling_layer=True).eval()
    import timm

    kwargs = {"zero_init_last": False} if model_name.startswith("resnet") else {}  # no all-zero convs after BN folding
    return timm.create_model(model_name, pretrained=False, **kwargs).eval()


def example(model_name: str, batch: int, input_shape: list[int] | None = None) -> Any:
    if model_name == BERT:
        return {"input_ids": torch.randint(0, 30522, (batch, 128), generator=torch.Generator().manual_seed(0))}
    shape = list(input_shape[1:]) if input_shape else [3, 224, 224]
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))


def _pruned_types() -> tuple[type, ...]:
    """Conv2d, Linear and transformers' Conv1D (GPT-2), whose weights are pruned."""
    try:
        from transformers.pytorch_utils import Conv1D

        return (nn.Conv2d, nn.Linear, Conv1D)
    except ImportError:
        return (nn.Conv2d, nn.Linear)


PRUNED = _pruned_types()


def _pruned_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, weight) of every conv/linear weight, each tied weight once (GPT-2's lm_head and embedding)."""
    seen, weights = set(), []
    for name, module in model.named_modules():
        if isinstance(module, PRUNED) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            weights.append((f"{name}.weight", module.weight))
    return weights


@torch.no_grad()
def _prune_counts_(weights: list[torch.Tensor], counts: list[int]) -> None:
    """Zero the counts[i] smallest |w| of weights[i] (ties broken by position)."""
    for weight, count in zip(weights, counts):
        flat = weight.view(-1)
        flat[flat.abs().argsort(stable=True)[:count]] = 0


def magnitude_prune_(model: nn.Module, sparsity: float) -> None:
    """Zero the round(sparsity * numel) smallest |w| of every conv/linear weight (the uniform distribution)."""
    weights = [w for _, w in _pruned_weights(model)]
    _prune_counts_(weights, [round(sparsity * w.numel()) for w in weights])


def erk_prune_(model: nn.Module, sparsity: float) -> None:
    """Each conv/linear weight pruned by |w| to its Erdos-Renyi-Kernel share (fxsparse.distribution, the counts
    sparsify(distribution="erk") targets), the total exactly round(sparsity * N)."""
    from fxsparse.distribution import layer_targets

    named = _pruned_weights(model)
    targets = layer_targets([n for n, _ in named], [tuple(w.shape) for _, w in named], sparsity, "erk")
    _prune_counts_([w for _, w in named], list(targets.pruned))


@torch.no_grad()
def calibrate_batchnorms_(model: nn.Module, batch: Any, steps: int = 3) -> None:
    """BatchNorm statistics of the pruned model (cumulative average over a few random batches), as a trained
    model's would be: random statistics let activations underflow to denormals, which no deployment sees."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for _ in range(steps):
        fxsparse.inference.call_model(model, batch)
    model.eval()


def config_key(config: dict[str, Any]) -> str:
    return "|".join(str(config[k]) for k in ("model", "masks", "sparsity", "batch", "threads"))


def load_results(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def accelerated_record(dense: nn.Module, fast: nn.Module, plan_s: float, kept_bytes: int = 0) -> dict:
    """The fields every result records of the accelerated model, its plan and the machine (kept_bytes: what the
    compiled kernels keep beside its tensors, fxsparse.inference.native.kept_bytes())."""
    plan = fast.fxsparse_plan
    return {
        "clock": "wall clock",
        "plan_seconds": plan_s,
        "sparse_layers": len(plan.sparse_layers),
        "layers": len(plan.layers),
        "dense_bytes": model_bytes(dense),
        "accelerated_bytes": model_bytes(fast),
        "kept_bytes": kept_bytes,
        "torch": torch.__version__,
        "machine": cpu_name(),
        "cpus": os.cpu_count(),
        "plan": plan.to_dict(),
        "table": plan.table(),
    }


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@torch.no_grad()
def global_prune_(model: nn.Module, sparsity: float, sigma: bool = False) -> None:
    """One threshold over every conv/linear weight, the lowest round(sparsity * total) scores zeroed: score |w|
    (ST-3's global mask), or with ``sigma`` |w| * sqrt(S_l), S_l the sum of the weight's shape dims (a global
    ST-3-sigma-shaped mask, as fxsparse's st3sigma ranks)."""
    from fxsparse.methods.st3 import shape_sum

    weights = [w for _, w in _pruned_weights(model)]
    scales = [math.sqrt(shape_sum(w)) if sigma else 1.0 for w in weights]
    scores = torch.cat([w.abs().flatten() * s for w, s in zip(weights, scales)])
    threshold = scores.kthvalue(round(sparsity * scores.numel())).values
    for weight, scale in zip(weights, scales):
        weight[weight.abs() * scale <= threshold] = 0


MASKS = {
    "magnitude": magnitude_prune_,
    "global": global_prune_,
    "erk": erk_prune_,
    "global-sigma": lambda model, sparsity: global_prune_(model, sparsity, sigma=True),
}


def prepared_model(config: dict[str, Any], args, cache: dict) -> nn.Module:
    """The pruned model with trained-like BatchNorm statistics (cached across batch and thread counts)."""
    key = (config["model"], config["masks"], config["sparsity"])
    if key not in cache:  # a new model: what was compiled for the last one goes too
        cache.clear()
        if config["masks"] == "checkpoint":
            from fxsparse.train.loading import load_model

            cache[key] = load_model(args.arch, args.checkpoint).model.eval()
            return cache[key]
        model = build(config["model"])
        MASKS[config["masks"]](model, config["sparsity"])
        empty = [name for name, weight in _pruned_weights(model) if not weight.any()]
        if empty:  # e.g. a global mask of the initial weights takes all of ResNet-50's fc
            print(
                f"note: {config['masks']} masks prune {', '.join(empty)} entirely: the output no longer depends on "
                "the layers before them, which the error check then cannot see",
                flush=True,
            )
        calibrate_batchnorms_(model, example(config["model"], 8, args.input))
        cache[key] = model
    return cache[key]


def run_config(config: dict[str, Any], args, cache: dict) -> dict[str, Any]:
    """fxsparse and every other runtime against torch eager on the dense model (BN folded), same rounds."""
    import tempfile

    import bench_runtimes as rt

    torch.set_num_threads(config["threads"])
    clock = {"auto": None, "cpu": time.thread_time, "wall": time.perf_counter}[args.clock]  # accelerate's choices

    def timer(candidates):
        return interleaved_medians(candidates, repeats=args.layer_repeats, min_sample_s=1e-3, clock=clock)

    def model_timer(candidates):
        return interleaved_medians(
            candidates, repeats=7, warmup=2, min_sample_s=5e-3, settle_s=SETTLE_S, paired=True, clock=clock
        )

    model = prepared_model(config, args, cache)
    x = example(config["model"] if config["masks"] != "checkpoint" else "", config["batch"], args.input)
    options = dict(timer=timer, model_timer=model_timer, progress=not args.no_progress)
    kept_before = fxsparse.inference.native.kept_bytes()
    start = time.perf_counter()
    if config["masks"] == "checkpoint":
        fast = fxsparse.accelerate_checkpoint(args.checkpoint, args.arch, x, **options)
    else:
        fast = fxsparse.accelerate(model, x, **options)
    plan_s = time.perf_counter() - start
    dense = fxsparse.inference.dense_baseline(model)
    baseline = rt.TorchRuntime(BASELINE, dense, x)
    runtimes: list = [baseline, rt.TorchRuntime("fxsparse", fast, x)]
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as workdir:
        onnx_path = None
        wanted = [r for r in args.runtimes if r != "compile"]
        if wanted:
            try:
                onnx_path = os.path.join(workdir, "model.onnx")
                rt.export_onnx(model, dense, x, onnx_path)
            except ImportError as error:
                onnx_path, _ = None, notes.append(f"ONNX export: skipped (not installed: {error.name})")
            except Exception as error:
                onnx_path = None
                notes.append(f"ONNX export: failed ({type(error).__name__}: {str(error).splitlines()[0][:200]})")
        if "compile" in args.runtimes and ("compiled", config["batch"]) not in cache:  # compiled once per shape
            cache["compiled", config["batch"]] = torch.compile(dense)
        compiled = cache.get(("compiled", config["batch"]))
        ds_python = rt.deepsparse_python(args.deepsparse_python)
        others, more = rt.make_runtimes(
            args.runtimes, dense, x, config["threads"], config["batch"], workdir, onnx_path, ds_python, compiled
        )
        runtimes += others
        notes += more
        reference = baseline.output()
        errors = {r.name: rt.relative_error(r.output(), reference) for r in runtimes}
        samples = rt.interleaved_rounds(runtimes, repeats=args.repeats)  # wall clock, every runtime
        times = {name: statistics.median(values) for name, values in samples.items()}
        paired = paired_ratios(samples, "fxsparse")
        layer_ms = {}
        for runtime in others:
            if args.layers and hasattr(runtime, "layer_ms"):
                if isinstance(runtime, rt.OnnxRuntime):  # a profiling session of its own
                    layer_ms[runtime.name] = rt.OnnxRuntime(onnx_path, x, config["threads"], profile=True).layer_ms()
                else:
                    layer_ms[runtime.name] = runtime.layer_ms()
        for runtime in runtimes:
            runtime.close()
    for note in notes:
        print(note, flush=True)
    base = times[BASELINE]
    return {
        **config,
        "dense_ms": 1e3 * base,
        "accelerated_ms": 1e3 * times["fxsparse"],
        "speedup": base / times["fxsparse"],
        "runtimes": {
            name: {
                "ms": 1e3 * t,
                "speedup": base / t,
                "relative_error": errors[name],
                "vs_fxsparse_paired": paired[name],
            }
            for name, t in times.items()
        },
        "versions": {r.name: getattr(r, "version", torch.__version__) for r in runtimes},
        "notes": notes,
        "relative_error": errors["fxsparse"],
        "plan_clock": clock_name(clock),
        "mac_reduction": mac_reduction(dense, x),
        "layer_ms": layer_ms,
        **accelerated_record(dense, fast, plan_s, fxsparse.inference.native.kept_bytes() - kept_before),
    }


BASELINE = "torch eager (dense, BN folded)"


def mac_reduction(dense: nn.Module, x: Any) -> float:
    """dense MACs / sparse MACs of one forward (fxsparse.flops)."""
    report = fxsparse.flops(dense, x)
    return report.dense_macs / max(report.sparse_macs, 1)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_generate(config: dict[str, Any], args) -> dict[str, Any]:
    """GPT-2 (124M config, random init, every linear/Conv1D weight magnitude-pruned): generate() of
    ``--new-tokens`` greedy tokens at batch 1, tokens/s of the accelerated model against the folded model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    magnitude_prune_(model, config["sparsity"])
    prompt = torch.randint(0, 50257, (1, 8), generator=torch.Generator().manual_seed(0))
    kept_before = fxsparse.inference.native.kept_bytes()
    start = time.perf_counter()
    fast = fxsparse.accelerate(model, {"input_ids": prompt[:, :1]}, progress=not args.no_progress)
    plan_s = time.perf_counter() - start
    dense = fxsparse.inference.dense_baseline(model)
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    def generate(m):
        with torch.inference_mode():
            return m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs)

    same = bool(torch.equal(generate(dense), generate(fast)))
    times = interleaved_medians(
        {BASELINE: lambda: generate(dense), "fxsparse": lambda: generate(fast)},
        repeats=max(3, args.repeats // 3),
        warmup=1,
        min_sample_s=0.0,
        clock=time.perf_counter,
    )
    return {
        **config,
        "dense_ms": 1e3 * times[BASELINE],
        "accelerated_ms": 1e3 * times["fxsparse"],
        "speedup": times[BASELINE] / times["fxsparse"],
        "tokens_per_s": {name: args.new_tokens / t for name, t in times.items()},
        "same_tokens": same,
        "runtimes": {name: {"ms": 1e3 * t, "speedup": times[BASELINE] / t} for name, t in times.items()},
        "relative_error": 0.0 if same else float("nan"),
        **accelerated_record(dense, fast, plan_s, fxsparse.inference.native.kept_bytes() - kept_before),
    }


def reset_peak_rss() -> int:
    """Reset the peak resident memory (Linux: VmHWM via /proc/self/clear_refs); returns the current RSS."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    return _status_bytes("VmHWM")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory(args) -> None:
    """Peak memory growth of building the accelerated model straight from a CSR checkpoint (fresh process).

    The growth is counted from after the imports and the model skeleton (parameters on the meta device), which
    cost the same whatever is loaded; the dense comparison counts its model's construction (its weights)."""
    from fxsparse.train.models import build_model

    torch.set_num_threads(args.threads[0])
    document = fxsparse.read_csr_metadata(args.memory)
    arch = args.arch or document.get("architecture")
    x = example(BERT if arch == BERT else "", args.batch[0], args.input)
    start = _status_bytes("VmRSS")
    with fxsparse.inference.skeleton():
        if arch == BERT:
            from transformers import BertConfig, BertModel

            skeleton_model = BertModel(BertConfig()).eval()
        else:
            skeleton_model = build_model(arch)
    setup = _status_bytes("VmRSS") - start
    if args.paths == "dense":  # the usual way, for comparison: a dense model loaded from the checkpoint
        before = reset_peak_rss()
        model = BertModel(BertConfig()).eval() if arch == BERT else build_model(arch)
        fxsparse.load_csr_into_(model, args.memory)
        model = fxsparse.inference.dense_baseline(model)
        with torch.no_grad():
            fxsparse.inference.call_model(model, x)
        print(
            f"{args.memory}: dense model loaded with fxsparse.load_csr_into_ and run once: peak memory growth "
            f"{(peak_rss_bytes() - before) / 2**20:.1f} MiB, model {model_bytes(model) / 2**20:.1f} MiB",
            flush=True,
        )
        return
    paths = None
    if args.paths:
        with open(args.paths) as handle:
            paths = json.load(handle)
    before = reset_peak_rss()
    before_file = _status_bytes("RssFile")
    fast = fxsparse.accelerate_checkpoint(args.memory, skeleton_model, x, paths=paths, progress=not args.no_progress)
    growth = peak_rss_bytes() - before
    file_backed = _status_bytes("RssFile") - before_file
    with torch.no_grad():
        fxsparse.inference.call_model(fast, x)
    with_call = peak_rss_bytes() - before
    dense = sum(
        math.prod(e["shape"]) * torch.empty((), dtype=getattr(torch, e["dtype"])).element_size()
        for e in document["tensors"].values()
    )
    how = "with the given paths (untimed)" if paths else "timed"
    print(
        f"{args.memory}: file {os.path.getsize(args.memory) / 2**20:.1f} MiB, dense tensors {dense / 2**20:.1f} MiB; "
        f"accelerate_checkpoint {how}: peak memory growth {growth / 2**20:.1f} MiB ({file_backed / 2**20:.1f} MiB "
        f"of it file-backed: library code), {with_call / 2**20:.1f} MiB with one more call; accelerated model "
        f"{model_bytes(fast) / 2**20:.1f} MiB + {fxsparse.inference.native.kept_bytes() / 2**20:.1f} MiB kept by the "
        f"kernels, {len(fast.fxsparse_plan.sparse_layers)}/"
        f"{len(fast.fxsparse_plan.layers)} layers sparse; imports and skeleton {setup / 2**20:.1f} MiB (not counted)",
        flush=True,
    )
    if paths is None:  # the same build again in a fresh process, untimed, from this plan
        import subprocess
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            json.dump(fast.fxsparse_plan.paths(), handle)
        for paths_argument in (handle.name, "dense"):
            command = [
                sys.executable,
                __file__,
                "--memory",
                args.memory,
                "--paths",
                paths_argument,
                "--no-progress",
                "--batch",
                str(args.batch[0]),
                "--threads",
                str(args.threads[0]),
            ]
            command += ["--arch", args.arch] if args.arch else []
            command += ["--input", ",".join(map(str, args.input))] if args.input else []
            subprocess.run(command, check=True)
        os.unlink(handle.name)


def summary_line(r: dict[str, Any]) -> str:
    kept = f" + {r['kept_bytes'] / 2**20:.1f} MiB kept by the kernels" if r.get("kept_bytes") else ""
    line = (
        f"{r['model']} ({r['masks']} masks) sparsity {r['sparsity']} batch {r['batch']} threads {r['threads']}: "
        f"dense {r['dense_ms']:.2f} ms, accelerated {r['accelerated_ms']:.2f} ms, speedup {r['speedup']:.2f}x "
        f"({r['sparse_layers']}/{r['layers']} layers sparse, {r['clock']}, "
        f"max rel. error {r['relative_error']:.1e}, "
        f"model {r['accelerated_bytes'] / 2**20:.1f} MiB{kept} vs dense {r['dense_bytes'] / 2**20:.1f} MiB)"
    )
    if r.get("mac_reduction"):
        ratio = r["speedup"] / r["mac_reduction"]
        line += f"; MAC reduction {r['mac_reduction']:.2f}x (speedup / MAC reduction {ratio:.2f})"
    split = (r.get("plan") or {}).get("batch_split") or {}
    if split.get("chosen"):  # fxsparse/inference/batch_split.py
        line += f"; the batch runs a sample per thread ({split['reason']})"
    if "tokens_per_s" in r:
        tokens = ", ".join(f"{name} {value:.1f}" for name, value in r["tokens_per_s"].items())
        line += f"; tokens/s: {tokens}; same tokens as the folded model: {r['same_tokens']}"
    return line


def runtimes_table(r: dict[str, Any]) -> str:
    """One configuration, every runtime: median ms, speed-up against torch eager dense (BN folded), max error."""
    from tabulate import tabulate

    rows = [
        [
            name,
            f"{v['ms']:.2f}",
            f"{v['speedup']:.2f}x",
            f"{v['vs_fxsparse_paired']:.2f}" if "vs_fxsparse_paired" in v else "-",
            f"{v['relative_error']:.1e}" if "relative_error" in v else "-",
        ]
        for name, v in r["runtimes"].items()
    ]
    title = f"{r['model']}, {r['masks']} {100 * r['sparsity']:g}%, batch {r['batch']}, {r['threads']} thread(s)"
    headers = ["runtime", "ms", "vs torch eager dense", "time / fxsparse's, paired", "max rel. error"]
    return f"{title} ({r['clock']}, medians; paired: the median over rounds of the ratio in a round)\n" + tabulate(
        rows, headers, tablefmt="simple", disable_numparse=True
    )


def layers_table(r: dict[str, Any]) -> str:
    """Per block (a layer's parent module): torch dense and fxsparse timed alone (the plan's conv/linear layers),
    and where profiled ONNX Runtime in the model (every node of the block: it fuses ReLUs and adds into its
    convs and names them after the activation, so its per-layer names do not match ours)."""
    from tabulate import tabulate

    def block(name: str) -> str:
        return name.rpartition(".")[0] or name

    ort = r.get("layer_ms", {}).get("onnxruntime", {})
    ort_blocks: dict[str, float] = {}
    for name, ms in ort.items():
        ort_blocks[block(name)] = ort_blocks.get(block(name), 0.0) + ms
    ours: dict[str, list] = {}
    for layer in r["plan"]["layers"]:
        dense, chosen = layer["times"].get("dense"), layer["times"].get(layer["path"])
        entry = ours.setdefault(block(layer["name"]), [0.0, 0.0, 0, 0])
        entry[0] += 1e3 * (dense or 0.0)
        entry[1] += 1e3 * (chosen if chosen is not None else dense or 0.0)
        entry[2] += 1
        entry[3] += layer["path"] != "dense"
    rows = []
    for name, (dense, chosen, count, sparse) in ours.items():
        other = ort_blocks.get(name)
        rows.append(
            [
                name,
                f"{sparse}/{count}",
                f"{dense:.3f}",
                f"{chosen:.3f}",
                f"{dense / chosen:.2f}x" if chosen else "-",
                "-" if other is None else f"{other:.3f}",
                "-" if other is None or not chosen else f"{other / chosen:.2f}",
            ]
        )
    headers = [
        "block",
        "sparse layers",
        "torch dense ms",
        "fxsparse ms",
        "speedup",
        "ORT ms (profiled)",
        "ORT/fxsparse",
    ]
    text = "per block, conv/linear layers timed alone (ORT: all its nodes in the block, in the model)\n"
    text += tabulate(rows, headers, tablefmt="simple", disable_numparse=True)
    deepsparse = r.get("layer_ms", {}).get("deepsparse")
    if deepsparse:
        if "error" in deepsparse:
            text += f"\nDeepSparse per-layer profile: not obtained ({deepsparse['error'][:200]})"
        else:
            top = sorted(deepsparse["layers"], key=lambda e: -(e["ms"] or 0))[:15]
            text += f"\nDeepSparse debug analysis ({deepsparse.get('total_ms')} ms in all), its slowest layers:\n"
            text += tabulate(
                [[e["name"], e["ms"]] for e in top], ["layer (DeepSparse's name)", "ms"], tablefmt="simple"
            )
    return text


def plot(results: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple, list[tuple[float, float]]] = {}
    for r in results:
        series.setdefault((r["model"], r["masks"], r["batch"], r["threads"]), []).append((r["sparsity"], r["speedup"]))
    models = sorted({key[:2] for key in series})
    colors = {model: f"C{i % 10}" for i, model in enumerate(models)}
    markers = {(1, 1): "o", (1, 2): "s", (16, 1): "^", (16, 2): "v"}
    fig, ax = plt.subplots(figsize=(8, 5))
    for (model, masks, batch, threads), points in sorted(series.items()):
        points.sort()
        label = f"{model} ({masks}), batch {batch}, {threads} thread{'s' if threads > 1 else ''}"
        ax.plot(
            [100 * s for s, _ in points],
            [v for _, v in points],
            marker=markers.get((batch, threads), "x"),
            linestyle="-" if threads == 1 else "--",
            color=colors[(model, masks)],
            label=label,
        )
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("speedup over dense (end to end)")
    ax.set_title("fxsparse.accelerate on CPU")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", nargs="+", default=[], help=f"timm names or {BERT!r} (e.g. {', '.join(MODELS)})")
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.9])
    parser.add_argument("--checkpoint", help="a CSR checkpoint instead of magnitude masks (needs --arch)")
    parser.add_argument(
        "--arch",
        help="the checkpoint's model: timm name or module:callable (default: the checkpoint's architecture metadata)",
    )
    parser.add_argument(
        "--input",
        type=lambda s: [int(v) for v in s.split(",")],
        help="input shape N,C,H,W (N is replaced by --batch); default 1,3,224,224",
    )
    parser.add_argument("--batch", nargs="+", type=int, default=[1])
    parser.add_argument("--threads", nargs="+", type=int, default=[1])
    parser.add_argument("--repeats", type=int, default=15, help="end-to-end runs of each model (median)")
    parser.add_argument("--layer-repeats", type=int, default=7, help="runs of each candidate path per layer (median)")
    parser.add_argument(
        "--clock",
        choices=("auto", "cpu", "wall"),
        default="auto",
        help="the clock of accelerate's per-layer and whole-model choices (auto: the library's, thread CPU time with "
        "one thread); the comparison of the runtimes is always wall clock",
    )
    parser.add_argument(
        "--masks",
        nargs="+",
        choices=tuple(MASKS),
        default=["magnitude"],
        help="magnitude: each conv/linear weight pruned to the sparsity by |w| (uniform); global: one threshold on |w| "
        "over all of them; erk: each pruned by |w| to its Erdos-Renyi-Kernel share; global-sigma: one threshold on "
        "|w|*sqrt(S_l)",
    )
    parser.add_argument(
        "--runtimes",
        nargs="*",
        default=list(OPTIONAL_RUNTIMES),
        help=f"the optional runtimes compared (default all: {' '.join(OPTIONAL_RUNTIMES)}); each one not installed is "
        "skipped with a note",
    )
    parser.add_argument(
        "--deepsparse-python",
        help="python of a venv with deepsparse==1.8.0 (default: $FXSPARSE_DEEPSPARSE_PYTHON; docs/INFERENCE.md)",
    )
    parser.add_argument("--layers", action="store_true", help="profile ONNX Runtime (and DeepSparse) per layer")
    parser.add_argument("--new-tokens", type=int, default=64, help="gpt2: tokens generate() makes (batch 1)")
    parser.add_argument("--results", default="bench_inference.jsonl", help="JSON lines, appended (resumable)")
    parser.add_argument("--force", action="store_true", help="rerun configurations already in --results")
    parser.add_argument("--table", action="store_true", help="print each configuration's per-layer table")
    parser.add_argument("--plot", help="PNG of speedup against sparsity, from all results in --results")
    parser.add_argument(
        "--show",
        action="store_true",
        help="print the results in --results (with --table: the per-layer tables too) and exit",
    )
    parser.add_argument("--save-checkpoint", help="write the first magnitude-pruned model as a CSR checkpoint")
    parser.add_argument(
        "--memory",
        help="a CSR checkpoint: peak memory of accelerate_checkpoint, timed, then again "
        "untimed with the paths chosen (fresh processes)",
    )
    parser.add_argument(
        "--paths",
        help="with --memory: a JSON file {layer: path} (e.g. fast.fxsparse_plan.paths()) to build with, untimed; "
        "'dense': load the dense model instead",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.memory:
        return memory(args)
    if args.show:
        for result in load_results(args.results):
            if args.table:
                print(fxsparse.inference.AccelerationPlan.from_dict(result["plan"]).table())
                print(layers_table(result))
            if "runtimes" in result:
                print(runtimes_table(result))
            print(summary_line(result))
        return None
    if args.save_checkpoint:
        if not args.model:
            parser.error("--save-checkpoint needs --model")
        model = build(args.model[0])
        magnitude_prune_(model, args.sparsity[0])
        calibrate_batchnorms_(model, example(args.model[0], 8, args.input))
        fxsparse.save_csr(model, args.save_checkpoint, architecture=None if args.model[0] == BERT else args.model[0])
        print(f"wrote {args.save_checkpoint}")
        return None
    if args.checkpoint and args.model:
        parser.error("give either --model (magnitude masks) or --checkpoint, not both")

    configs = []
    if args.checkpoint:
        args.arch = args.arch or fxsparse.read_csr_metadata(args.checkpoint).get("architecture")
        if not args.arch:
            parser.error("the checkpoint does not record its architecture: pass --arch")
        sparsity = round(float(fxsparse.read_csr_metadata(args.checkpoint).get("sparsity") or 0.0), 4)
        name = f"{args.arch}:{os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint)))}"
        configs = [
            {"model": name, "masks": "checkpoint", "sparsity": sparsity, "batch": b, "threads": t}
            for b in args.batch
            for t in args.threads
        ]
    for model in args.model:
        configs += [
            {"model": model, "masks": masks, "sparsity": s, "batch": b, "threads": t}
            for masks in args.masks
            for s in args.sparsity
            for b in args.batch
            for t in args.threads
        ]
    done = {config_key(r) for r in load_results(args.results)}
    cache: dict = {}
    for config in configs:
        if config_key(config) in done and not args.force:
            print(f"skip (in {args.results}): {config_key(config)}")
            continue
        result = run_generate(config, args) if config["model"] == GPT2 else run_config(config, args, cache)
        if args.table:
            print(result["table"])
            if "layer_ms" in result:
                print(layers_table(result))
        print(runtimes_table(result))
        print(summary_line(result), flush=True)
        with open(args.results, "a") as handle:
            handle.write(json.dumps({k: v for k, v in result.items() if k != "table"}) + "\n")
    if args.plot:
        plot(load_results(args.results), args.plot)
    elif not configs:
        parser.error("nothing to do: give --model or --checkpoint (or --plot)")


if __name__ == "__main__":
    sys.exit(main())
