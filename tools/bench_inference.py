#!/usr/bin/env python
"""Inference speed of fxsparse.accelerate against the dense-with-zeros model (issue 11).

For each configuration (model, masks, sparsity, batch, threads) it builds the sparse model, accelerates it
at that batch and thread count, prints the per-layer table (dense ms, best sparse ms, chosen path) and the
end-to-end latency of the accelerated model against the same folded model run dense (BatchNorms folded
into the convs, eager, same process, interleaved runs, medians). With one thread, times are the thread's
CPU time (robust on a shared machine); with more, wall-clock time (run those on a quiet machine).

Masks: "magnitude" prunes every conv/linear weight to the sparsity by |w|, layer by layer (close to the
MAC density of a trained ST-3-sigma model); --checkpoint takes a CSR checkpoint instead (e.g. the main
job's runs/<name>/model.csr.safetensors, with --arch fxsparse.models:SmallCNN --input 1,1,28,28), built
with fxsparse.accelerate_checkpoint (its sparse weights never densified).

--save-checkpoint PATH writes the magnitude-pruned model as a CSR checkpoint (first --model/--sparsity), and
--memory PATH measures, in this fresh process, the peak memory growth of fxsparse.accelerate_checkpoint
against the checkpoint's CSR bytes and the dense weights' bytes (counted from after the imports and the model
skeleton), timed, then in fresh processes untimed with the plan it chose and for the dense model; --paths
PLAN.json builds once with a given plan.

Results are appended to --results (JSON lines); a configuration already there is skipped unless --force,
so an interrupted run resumes and single configurations are cheap to redo. --plot draws speedup against
sparsity from the results file.

    python tools/bench_inference.py --model resnet50 --sparsity 0.9 0.95 --batch 1 --threads 1 --table
    python tools/bench_inference.py --model resnet50 vit_small_patch16_224 bert-base --sparsity 0.9 --batch 1 16 \
        --threads 1 2
    python tools/bench_inference.py --checkpoint runs/main/model.csr.safetensors --arch fxsparse.models:SmallCNN \
        --input 1,1,28,28 --batch 1 16
    python tools/bench_inference.py --plot speedup.png
    python tools/bench_inference.py --show --table
    python tools/bench_inference.py --model resnet50 --sparsity 0.9 --save-checkpoint r50.safetensors
    python tools/bench_inference.py --memory r50.safetensors --arch resnet50
    python tools/bench_inference.py --memory r50.safetensors --paths plan.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from typing import Any

import torch
from torch import nn

import fxsparse
from fxsparse.inference import interleaved_medians
from fxsparse.inference.timing import clock_name

BERT = "bert-base"
MODELS = ("resnet50", "vit_small_patch16_224", BERT)


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


@torch.no_grad()
def magnitude_prune_(model: nn.Module, sparsity: float) -> None:
    """Zero the round(sparsity * numel) smallest |w| of every conv/linear weight (ties broken by position)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            weight = module.weight.view(-1)
            weight[weight.abs().argsort(stable=True)[: round(sparsity * weight.numel())]] = 0


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


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def run_config(config: dict[str, Any], args, cache: dict) -> dict[str, Any]:
    torch.set_num_threads(config["threads"])
    clock = {"auto": None, "cpu": time.thread_time, "wall": time.perf_counter}[args.clock]

    def timer(candidates):
        return interleaved_medians(candidates, repeats=args.layer_repeats, min_sample_s=1e-3, clock=clock)

    x = example(config["model"] if config["masks"] == "magnitude" else "", config["batch"], args.input)
    start = time.perf_counter()
    if config["masks"] == "magnitude":
        key = (config["model"], config["sparsity"])
        if key not in cache:
            cache.clear()
            model = build(config["model"])
            magnitude_prune_(model, config["sparsity"])
            calibrate_batchnorms_(model, example(config["model"], 8, args.input))
            cache[key] = model
        model = cache[key]
        fast = fxsparse.accelerate(model, x, timer=timer, progress=not args.no_progress)
    else:
        from fxsparse.train.loading import load_model

        model = load_model(args.arch, args.checkpoint).model
        fast = fxsparse.accelerate_checkpoint(args.checkpoint, args.arch, x, timer=timer, progress=not args.no_progress)
    plan_s = time.perf_counter() - start
    dense = fxsparse.inference.dense_baseline(model)
    with torch.no_grad():
        reference = fxsparse.inference.call_model(dense, x)
        output = fxsparse.inference.call_model(fast, x)
    reference = getattr(reference, "last_hidden_state", reference)
    output = getattr(output, "last_hidden_state", output)
    error = float((output - reference).abs().max() / reference.abs().max())
    with torch.inference_mode():
        times = interleaved_medians(
            {
                "dense": lambda: fxsparse.inference.call_model(dense, x),
                "accelerated": lambda: fxsparse.inference.call_model(fast, x),
            },
            repeats=args.repeats,
            warmup=2,
            min_sample_s=0.0,
            clock=clock,
        )
    plan = fast.fxsparse_plan
    return {
        **config,
        "dense_ms": 1e3 * times["dense"],
        "accelerated_ms": 1e3 * times["accelerated"],
        "speedup": times["dense"] / times["accelerated"],
        "relative_error": error,
        "clock": clock_name(clock),
        "plan_seconds": plan_s,
        "sparse_layers": len(plan.sparse_layers),
        "layers": len(plan.layers),
        "dense_bytes": model_bytes(dense),
        "accelerated_bytes": model_bytes(fast),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "plan": plan.to_dict(),
        "table": plan.table(),
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
        f"{model_bytes(fast) / 2**20:.1f} MiB, {len(fast.fxsparse_plan.sparse_layers)}/"
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
    return (
        f"{r['model']} ({r['masks']} masks) sparsity {r['sparsity']} batch {r['batch']} threads {r['threads']}: "
        f"dense {r['dense_ms']:.2f} ms, accelerated {r['accelerated_ms']:.2f} ms, speedup {r['speedup']:.2f}x "
        f"({r['sparse_layers']}/{r['layers']} layers sparse, {r['clock']}, "
        f"max rel. error {r['relative_error']:.1e}, "
        f"model {r['accelerated_bytes'] / 2**20:.1f} MiB vs dense {r['dense_bytes'] / 2**20:.1f} MiB)"
    )


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
    fig.savefig(path, dpi=120)
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
        help="auto: thread CPU time with one thread, wall clock with more",
    )
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
            {"model": model, "masks": "magnitude", "sparsity": s, "batch": b, "threads": t}
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
        result = run_config(config, args, cache)
        if args.table:
            print(result["table"])
        print(summary_line(result), flush=True)
        with open(args.results, "a") as handle:
            handle.write(json.dumps({k: v for k, v in result.items() if k != "table"}) + "\n")
    if args.plot:
        plot(load_results(args.results), args.plot)
    elif not configs:
        parser.error("nothing to do: give --model or --checkpoint (or --plot)")


if __name__ == "__main__":
    sys.exit(main())
