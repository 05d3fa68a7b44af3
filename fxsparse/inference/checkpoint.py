"""Building an accelerated model straight from a CSR checkpoint (docs/FORMAT.md) without densifying it.

The checkpoint is opened, checked and read by fxsparse.export.CsrReader, the format's one reader: every
tensor is checked (header, CRC-32, CSR components) before it is used, since a checkpoint is untrusted input.
Here: ``skeleton()``, to build a model with its parameters on the meta device (no memory) and real buffers,
and ``layer_csr()``, the CSR parts a SparseConv2d / SparseLinear takes, whatever layout the entry is stored in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

from ..export import CsrReader


@contextlib.contextmanager
def skeleton() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no init cost) and keep real
    buffers (e.g. transformers' position_ids), ready for fxsparse.accelerate_checkpoint to fill.

        with fxsparse.inference.skeleton():
            model = timm.create_model("resnet50")
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param) -> None:
        if isinstance(param, nn.Parameter) and type(param) is nn.Parameter and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def layer_csr(reader: CsrReader, name: str) -> tuple[Tensor, Tensor, Tensor]:
    """(crow, col, values) of the (out, in/groups*kh*kw) view of a conv or linear weight stored as CSR, as the
    sparse layers take them: an entry stored with another layout (output_axis 1, which fxsparse writes for
    ConvTranspose and Conv1D weights) is converted from its nonzeros, never densified."""
    parts = reader.csr(name).row_major()
    return parts.crow, parts.col, parts.values
