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
LAYERS = "Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, transformers' Conv1D, MultiheadAttention projections"
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

    def matrix_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(rows, cols) of the matrix of a weight of ``shape``."""
        if self.output_axis == 0:
            return shape[0], math.prod(shape[1:])
        inputs_per_group, kernel = shape[0] // self.groups, math.prod(shape[2:])
        return self.groups * shape[1], inputs_per_group * kernel

    def to_matrix(self, weight: Tensor) -> Tensor:
        """The (outputs, inputs) matrix of ``weight`` (a view for output_axis 0, else a copy)."""
        shape = tuple(weight.shape)
        rows, cols = self.matrix_shape(shape)
        if self.output_axis == 0:
            return weight.reshape(rows, cols)
        grouped = weight.reshape(self.groups, shape[0] // self.groups, shape[1], math.prod(shape[2:]))
        return grouped.permute(0, 2, 1, 3).reshape(rows, cols)

    def flat_index(self, row: Tensor, col: Tensor, shape: tuple[int, ...]) -> Tensor:
        """Row-major flat position in the stored weight of ``shape`` of matrix entry (row, col) (int64)."""
        rows, cols = self.matrix_shape(shape)
        if self.output_axis == 0:
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
    return {}


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
