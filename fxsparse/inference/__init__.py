"""Run a folded sparse model on sparse CPU kernels (docs/INFERENCE.md).

fast = fxsparse.accelerate(folded_model, example_input)             # per-layer timed choice of kernel
fast = fxsparse.accelerate_checkpoint("model.safetensors", model, x)  # never densifies sparse weights
print(fast.fxsparse_plan.table())                                    # what each layer measured and chose
"""

from .api import (
    PLAN_ATTRIBUTE,
    AccelerationPlan,
    accelerate,
    accelerate_checkpoint,
    call_model,
    dense_baseline,
    measure_speedup,
)
from .checkpoint import skeleton
from .layers import LayerPlan, Planner, SparseConv2d, SparseLinear
from .timing import interleaved_medians

__all__ = [
    "accelerate",
    "accelerate_checkpoint",
    "measure_speedup",
    "dense_baseline",
    "call_model",
    "AccelerationPlan",
    "PLAN_ATTRIBUTE",
    "LayerPlan",
    "Planner",
    "SparseConv2d",
    "SparseLinear",
    "skeleton",
    "interleaved_medians",
]
