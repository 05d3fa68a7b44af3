"""Tiny test models; each docstring names the edge case it exercises."""

import torch
import torch.nn.functional as F
from torch import nn


class TinyCNN(nn.Module):
    """Plain conv -> BN -> conv (grouped) -> linear: call_module Conv2d, grouped conv and Linear."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        x = F.relu(self.depthwise(x))
        return self.fc(x.mean((2, 3)))


class FunctionalBlock(nn.Module):
    """Weights used through F.conv1d / F.linear on raw parameters (call_function with get_attr)."""

    def __init__(self):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(6, 3, 5) * 0.3)
        self.proj = nn.Parameter(torch.randn(4, 6) * 0.3)
        self.bias = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        h = F.conv1d(x, self.kernel, padding=2).mean(-1)
        return F.linear(h, self.proj, self.bias) + self.proj.sum()


class FunctionalWeights(nn.Module):
    """A traced-through submodule whose raw parameters feed F.conv1d / F.linear (and another op)."""

    def __init__(self):
        super().__init__()
        self.block = FunctionalBlock()

    def forward(self, x):
        return self.block(x)


class TiedLinear(nn.Module):
    """One Linear weight shared by two modules: it must enter the pool once."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 12)
        self.b = nn.Linear(12, 12)
        self.b.weight = self.a.weight
        self.c = nn.Linear(12, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


class Opaque(nn.Module):
    """A module kept opaque as a leaf: its Linear is invisible in the graph."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(8, 8)

    def forward(self, x):
        return self.inner(x) * 2


class WithLeaf(nn.Module):
    """Conv/linear inside an opaque leaf module (passed as leaf_modules) must still be pooled."""

    def __init__(self):
        super().__init__()
        self.leaf = Opaque()
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.leaf(x))


class Untraceable(nn.Module):
    """Data-dependent Python control flow: torch.fx cannot trace it, sparsify must fall back."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x):
        if x.sum() > 0:
            x = self.a(x)
        return self.b(x)


class NothingToSparsify(nn.Module):
    """Only norm layers: there is nothing to sparsify."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(x)


class LayerStack(nn.ModuleList):
    """A ModuleList subclass whose forward iterates itself: a child added to it would be called."""

    def __init__(self):
        super().__init__([nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)])

    def forward(self, x):
        for layer in self:
            x = torch.tanh(layer(x))
        return x


class Branches(nn.ModuleDict):
    """A ModuleDict subclass summing its values: a child added to it would join the sum."""

    def __init__(self):
        super().__init__({"left": nn.Linear(8, 4), "right": nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))})

    def forward(self, x):
        return sum(branch(x) for branch in self.values())


class RemembersInput(nn.Module):
    """A forward that assigns to self: symbolic tracing would leave a Proxy there."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.last_input = None

    def forward(self, x):
        self.last_input = x
        return self.fc(x)
