"""What fxsparse prunes: the modules that carry a prunable weight, and the matrix each weight is.

The one definition read by the sparsifying pass's module walk, fxsparse.flops, save_csr and the training
application. A prunable weight is a weight a module multiplies its input with; the op multiplies by a
(rows = outputs, cols = inputs) matrix, read off the stored tensor by the weight's ``MatrixLayout``:

  module                                  stored weight        the (outputs, inputs) matrix
  nn.Linear                               (out, in)            the weight itself
  nn.Conv1d/2d/3d (and subclasses)        (O, I/g, *k)         (O, I/g * prod(k))
  nn.ConvTranspose1d/2d/3d                (I, O/g, *k)         (O, I/g * prod(k)): outputs are dim 1
  transformers' Conv1D (GPT-2 family)     (in, out)            weight.T
  nn.MultiheadAttention projections       (3E, E) or (E, E)    the weight itself
  mixture-of-experts stacks (transformers) (E, out, in)        (E * out, in): expert e's (out, in) matrix is
                                           or (E, in, out)      rows e*out .. (e+1)*out - 1 (``experts=True``)

An expert stack is a 3-D parameter of a transformers experts module (``@use_experts_implementation``:
Mixtral, Qwen2/3-MoE, OLMoE, ...; `expert_stacks`), multiplied per expert through ``torch._grouped_mm``,
bmm or a loop over experts. Each expert's matrix is a linear layer of its own: ST-3's per-channel rescale
and ST-3-sigma's S_l = out + in apply per expert.

ST-3's per-output-channel rescale runs over the rows of that matrix, and the CSR checkpoint stores it.
"""

from __future__ import annotations

import dataclasses
import math
import sys

from torch import Tensor, nn
from torch.nn.utils import parametrize

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)
LAYERS = (
    "Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, transformers' Conv1D, MultiheadAttention projections, "
    "transformers' mixture-of-experts stacks (each expert's matrix)"
)
DESCRIPTION = LAYERS + " and F.conv*/F.linear calls on parameters"


@dataclasses.dataclass(frozen=True)
class MatrixLayout:
    """How a stored weight maps to the (outputs, inputs) matrix its op multiplies by.

    output_axis 0: the matrix is the row-major reshape (d0, d1 * ... * dk).
    output_axis 1: d1 indexes outputs within each of ``groups`` groups of d0 = groups * (inputs per group):
    the weight viewed as (groups, d0 / groups, d1, K) is permuted to (groups, d1, d0 / groups, K) and
    reshaped to (groups * d1, d0 / groups * K), K = d2 * ... * dk (a ConvTranspose; Conv1D is (in, out)).
    """

    output_axis: int = 0
    groups: int = 1
    experts: bool = False  # a (E, a, b) stack of expert matrices; output_axis (1 or 2) indexes each one's outputs

    def expert_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(out, in) of each expert's matrix in a stack of ``shape`` (experts layouts only)."""
        return shape[self.output_axis], shape[3 - self.output_axis]

    def matrix_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(rows, cols) of the matrix of a weight of ``shape``."""
        if self.experts:
            out, inputs = self.expert_shape(shape)
            return shape[0] * out, inputs
        if self.output_axis == 0:
            return shape[0], math.prod(shape[1:])
        inputs_per_group, kernel = shape[0] // self.groups, math.prod(shape[2:])
        return self.groups * shape[1], inputs_per_group * kernel

    def to_matrix(self, weight: Tensor) -> Tensor:
        """The (outputs, inputs) matrix of ``weight`` (a view for output_axis 0, else a copy)."""
        shape = tuple(weight.shape)
        rows, cols = self.matrix_shape(shape)
        if self.experts:
            return weight.movedim(self.output_axis, 1).reshape(rows, cols)
        if self.output_axis == 0:
            return weight.reshape(rows, cols)
        grouped = weight.reshape(self.groups, shape[0] // self.groups, shape[1], math.prod(shape[2:]))
        return grouped.permute(0, 2, 1, 3).reshape(rows, cols)

    def flat_index(self, row: Tensor, col: Tensor, shape: tuple[int, ...]) -> Tensor:
        """Row-major flat position in the stored weight of ``shape`` of matrix entry (row, col) (int64)."""
        rows, cols = self.matrix_shape(shape)
        if self.experts and self.output_axis == 2:  # stored (E, in, out)
            outputs = shape[2]
            expert, output = row // outputs, row % outputs
            return (expert * cols + col) * outputs + output
        if self.output_axis == 0 or self.experts:  # (E, out, in) is the row-major (E * out, in)
            return row * cols + col
        outputs_per_group, kernel = shape[1], math.prod(shape[2:])
        group, output = row // outputs_per_group, row % outputs_per_group
        input_in_group, tap = col // kernel, col % kernel
        stored_input = group * (shape[0] // self.groups) + input_in_group
        return (stored_input * shape[1] + output) * kernel + tap

    @property
    def channels_are_a_dim(self) -> bool:
        """True when each output channel is one index of ``output_axis`` (not for grouped transposed convs)."""
        return self.output_axis == 0 or self.groups == 1


def expert_matrices(stack: Tensor, output_axis: int) -> Tensor:
    """The (E, out, in) view of an expert stack whose experts' outputs lie along ``output_axis`` (1 or 2)."""
    return stack.movedim(output_axis, 1)


def layer_parts(fqn: str, layout: MatrixLayout | None, weight: Tensor) -> list[tuple[str, Tensor]]:
    """The per-layer parts of a weight, for per-layer reports: itself, or for an expert stack each expert's
    (out, in) matrix, named ``<fqn>[<expert>]``."""
    if layout is None or not layout.experts:
        return [(fqn, weight)]
    return [(f"{fqn}[{e}]", matrix) for e, matrix in enumerate(expert_matrices(weight, layout.output_axis))]


def _transformers_conv1d() -> type | None:
    """transformers' Conv1D class when transformers is imported (a model holding one has imported it)."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def layer_types_outside_torch() -> tuple[type, ...]:
    """Prunable layer classes that torch.fx would trace through (it keeps only torch.nn's as leaves):
    the tracer keeps them opaque, so the pass sees each as one call_module with its weight."""
    conv1d = _transformers_conv1d()
    return (conv1d,) if conv1d is not None else ()


def is_linear(module: nn.Module) -> bool:
    """nn.Linear (and subclasses) or transformers' Conv1D: y = x W^T + b, one row per leading index of x."""
    conv1d = _transformers_conv1d()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def weight_layout(module: nn.Module) -> MatrixLayout | None:
    """The layout of ``module.weight`` when the module's forward is one product of its input with it
    (Linear, Conv, ConvTranspose, transformers' Conv1D), else None."""
    if isinstance(module, nn.Linear) or isinstance(module, CONV_TYPES):
        return MatrixLayout()
    if isinstance(module, CONV_TRANSPOSE_TYPES):
        return MatrixLayout(output_axis=1, groups=module.groups)
    if is_linear(module):  # transformers' Conv1D stores (in, out)
        return MatrixLayout(output_axis=1)
    return None


def expert_count(module: nn.Module) -> int | None:
    """The number of experts of a module that declares one (``num_experts``, as transformers' MoE modules do)."""
    count = getattr(module, "num_experts", None)
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else None


def _own_tensor_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the parameters the module holds itself (a parametrized one by its raw tensor's shape)."""
    shapes = {name: tuple(p.shape) for name, p in module._parameters.items() if p is not None}
    for name, chain in getattr(module, "parametrizations", {}).items():
        shapes[name] = tuple(chain.original.shape) if chain.is_tensor else tuple(chain.original0.shape)
    return shapes


def expert_stacks(module: nn.Module) -> dict[str, MatrixLayout]:
    """Name -> layout of each 3-D expert stack of a transformers experts module: a class decorated by
    ``@use_experts_implementation`` (it sets the bool ``is_transposed``: stored (E, in, out) instead of
    (E, out, in)) with ``num_experts`` = E. Every one of its forwards (eager loop, grouped_mm, batched_mm)
    multiplies each routed token by its expert's matrix of each stack, read from the attribute."""
    count, transposed = expert_count(module), getattr(module, "is_transposed", None)
    if count is None or not isinstance(transposed, bool):
        return {}
    layout = MatrixLayout(output_axis=2 if transposed else 1, experts=True)
    return {name: layout for name, shape in _own_tensor_shapes(module).items() if len(shape) == 3 and shape[0] == count}


def unknown_expert_weights(module: nn.Module) -> dict[str, str]:
    """Name -> why it stays dense, for the matrices of a mixture-of-experts module that fxsparse cannot pool:
    a router's weight (multiplied by F.linear in the router's own forward; routing weights stay dense), and
    3-D expert stacks of a class `expert_stacks` does not know (their layout is unknown)."""
    count = expert_count(module)
    if count is None or weight_layout(module) is not None:
        return {}
    known = expert_stacks(module)
    out = {}
    for name, shape in _own_tensor_shapes(module).items():
        if name in known:
            continue
        if len(shape) == 3 and shape[0] == count:
            out[name] = (
                f"a stack of {count} expert matrices in {type(module).__name__}, whose layout fxsparse does not "
                "know (it pools transformers' @use_experts_implementation experts)"
            )
        elif len(shape) == 2 and shape[0] == count and name == "weight":
            out[name] = (
                f"the router of a mixture-of-experts layer ({type(module).__name__} multiplies it with F.linear "
                "in its own forward, which the module walk does not pool)"
            )
    return out


def _holds_tensor(module: nn.Module, name: str) -> bool:
    """``module.name`` is a tensor (a parametrized one is not computed to find out)."""
    return parametrize.is_parametrized(module, name) or isinstance(getattr(module, name, None), Tensor)


def prunable_weights(module: nn.Module) -> dict[str, MatrixLayout]:
    """Attribute name -> layout of every prunable weight ``module`` holds itself (not its children's)."""
    layout = weight_layout(module)
    if layout is not None:
        return {"weight": layout} if _holds_tensor(module, "weight") else {}
    if isinstance(module, nn.MultiheadAttention):
        return {name: MatrixLayout() for name in MHA_WEIGHTS if _holds_tensor(module, name)}
    return expert_stacks(module)


def prunable_weight_names(model: nn.Module) -> dict[str, MatrixLayout]:
    """State-dict name -> layout of every prunable weight of ``model`` (plain or folded)."""
    out = {}
    for prefix, module in model.named_modules():
        for name, layout in prunable_weights(module).items():
            out[f"{prefix}.{name}" if prefix else name] = layout
    return out


def embedding_weights(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> names of the nn.Embedding/EmbeddingBag modules of ``model`` whose weight it is."""
    out: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, EMBEDDING_TYPES) and isinstance(getattr(module, "weight", None), nn.Parameter):
            out.setdefault(id(module.weight), []).append(name)
    return out
