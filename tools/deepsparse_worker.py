"""DeepSparse, driven by tools/bench_runtimes.py from its own venv (deepsparse 1.8.0 needs Python <= 3.11,
numpy 1.x and onnx < 1.15, which the project's environment does not pin).

    python deepsparse_worker.py MODEL.onnx INPUTS.npz THREADS BATCH

Compiles the engine, prints "ready VERSION", then answers one line per command on stdin:
    run           -> seconds of one engine.run on the inputs (time.perf_counter around the call)
    output PATH   -> writes the first output to PATH (.npy), answers "ok"
    profile PATH  -> per-layer times of DeepSparse's debug analysis as JSON at PATH (or the error), answers "ok"
    quit
"""

import json
import os
import sys
import time

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import numpy as np  # noqa: E402


def main() -> None:
    onnx_path, inputs_path, threads, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    import deepsparse
    from deepsparse import compile_model

    arrays = np.load(inputs_path)
    inputs = [arrays[name] for name in arrays.files]
    engine = compile_model(onnx_path, batch_size=batch, num_cores=threads)
    print("ready", deepsparse.__version__, flush=True)
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        if command == "run":
            start = time.perf_counter()
            engine.run(inputs)
            print(time.perf_counter() - start, flush=True)
        elif command == "output":
            np.save(argument, engine.run(inputs)[0])
            print("ok", flush=True)
        elif command == "profile":
            with open(argument, "w") as handle:
                json.dump(profile(onnx_path, inputs, threads, batch), handle)
            print("ok", flush=True)
        elif command == "quit":
            return


def profile(onnx_path: str, inputs: list, threads: int, batch: int) -> dict:
    """{"layers": [{name, ms}]} from DeepSparse's debug analysis (sub-layers flattened), or {"error": why}."""
    try:
        from deepsparse.engine import model_debug_analysis

        analysis = model_debug_analysis(
            onnx_path, inputs, batch_size=batch, num_cores=threads, num_iterations=5, num_warmup_iterations=2
        )
        layers = []
        pending = list(analysis.get("layer_info", []))
        while pending:
            layer = pending.pop(0)
            if layer.get("sub_layer_info"):
                pending[:0] = layer["sub_layer_info"]
                continue
            name = layer.get("canonical_name") if layer.get("canonical_name") not in (None, "<none>") else None
            layers.append({"name": name or layer.get("name"), "ms": layer.get("average_run_time_in_ms")})
        return {"layers": layers, "total_ms": analysis.get("average_total_time")}
    except Exception as error:  # an optional figure: say why it is missing
        return {"error": f"{type(error).__name__}: {error}"}


if __name__ == "__main__":
    main()
