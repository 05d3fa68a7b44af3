"""The weights an arithmetic actually multiplies, read at the aten level, independently of fxsparse."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten


class _Operands(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.weights = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        if packet is _aten.convolution:
            self.weights.append(args[1])
        elif packet is _aten.addmm:
            self.weights.append(args[2])
        elif packet is _aten.mm:
            self.weights.append(args[1])
        return out


@torch.no_grad()
def weight_operands(model, x):
    """The weight operand of every convolution, addmm and mm (second operand) of one forward."""
    recorder = _Operands()
    with recorder:
        model(x)
    return recorder.weights


def zero_fraction(tensors):
    return sum(int((t == 0).sum()) for t in tensors) / sum(t.numel() for t in tensors)
