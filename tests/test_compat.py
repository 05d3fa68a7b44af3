"""fxsparse.compat.Pruner: Feather's documented usage, unchanged, reaches the exact final sparsity."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse.compat import Pruner
from fxsparse.threshold import reference_quantile


class CifarNet(nn.Module):
    """A CIFAR-shaped ResNet-ish net (3x16x16 inputs, BN, a residual add, a 1x1 shortcut, a classifier)."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.shortcut = nn.Conv2d(8, 16, 1, stride=2, bias=False)  # 128 weights: below pthres=200 below
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return self.fc(F.relu(out).mean((2, 3)))


def cifar_like_loader(nbatches, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = CifarNet().eval()
    data = torch.randn(nbatches * batch, 3, 16, 16, generator=g)
    with torch.no_grad():
        labels = teacher(data).argmax(1)
    return [(data[i * batch : (i + 1) * batch], labels[i * batch : (i + 1) * batch]) for i in range(nbatches)]


def feather_reference_schedule(final_rate, nbatches, epochs, t1):
    """The rate Feather uses at batch index i: 0 before t1 epochs, cubic to half of training, then final_rate."""
    total = nbatches * epochs
    begin, end = t1 * nbatches, math.floor(0.5 * total)
    rates = []
    for i in range(total):
        if i < begin:
            rates.append(0.0)
        elif i < end:
            rates.append(final_rate - final_rate * (1 - (i - begin) / (end - begin)) ** 3)
        else:
            rates.append(final_rate)
    return rates


def test_feather_usage_sketch_reaches_the_exact_final_sparsity():
    torch.manual_seed(0)
    train_loader = cifar_like_loader(nbatches=5)
    epochs = 6
    final_rate = 0.9
    # ---- Feather's README usage, with only the import changed ----
    model = CifarNet()
    pruner = Pruner(
        model, device="cpu", final_rate=final_rate, nbatches=len(train_loader), epochs=epochs, pthres=200, t1=1
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    rates, taus, epoch_losses = [], [], []
    for _epoch in range(epochs):
        total = 0.0
        for data, target in train_loader:
            pruner.update_thresh()
            rates.append(pruner.rate)
            output = model(data)
            taus.append(pruner.gth)
            loss = loss_fn(output, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        pruner.update_thresh(end_of_batch=True)
        epoch_losses.append(total)
    # ---- evaluation sees the fresh end-of-epoch T and the exact sparsity ----
    pooled = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.numel() >= 200]
    assert sorted(e.fqn.rsplit(".", 1)[0] for e in fxsparse.pool.sparse_entries(model)) == sorted(pooled)
    assert not hasattr(model.shortcut, "parametrizations")  # pthres: too small to prune
    raw = [model.get_submodule(n).parametrizations.weight.original.detach() for n in pooled]
    assert pruner.gth == pytest.approx(float(reference_quantile(raw, final_rate)), rel=0, abs=0)
    n = sum(w.numel() for w in raw)
    expected_zeros = math.floor((n - 1) * final_rate) + 1
    model.eval()
    with torch.no_grad():
        eval_out = model(train_loader[0][0])
    assert pruner.print_sparsity() == pytest.approx(100.0 * expected_zeros / n)
    # ---- schedule, theta ----
    assert rates == pytest.approx(feather_reference_schedule(final_rate, 5, epochs, 1), abs=1e-12)
    assert rates[:5] == [0.0] * 5 and taus[:5] == [0.0] * 5  # dense for the first t1 epochs
    assert pruner.theta == 1.0
    assert epoch_losses[-1] < epoch_losses[0]
    # ---- desparsify: a plain model with exactly the sparsity and the output evaluation had ----
    pruner.desparsify()
    assert not fxsparse.is_sparsified(model) and not model._forward_pre_hooks
    assert sum(int((model.get_submodule(p).weight == 0).sum()) for p in pooled) == expected_zeros
    assert model.shortcut.weight.count_nonzero() == model.shortcut.weight.numel()
    with torch.no_grad():
        torch.testing.assert_close(model(train_loader[0][0]), eval_out)
    assert set(model.state_dict()) == set(CifarNet().state_dict())


def test_pruner_is_sparsify_with_feather_and_the_cubic_schedule():
    """Same training, bit for bit, as
    fxsparse.sparsify(model, Feather(), rate, Cubic(t1*nb, total//2), min_numel=pthres)."""
    loader = cifar_like_loader(nbatches=3, seed=1)
    epochs, base = 4, CifarNet()
    model = copy.deepcopy(base)
    graph = fxsparse.sparsify(base, fxsparse.Feather(), 0.96, fxsparse.Cubic(3, 6), min_numel=200)
    pruner = Pruner(model, None, 0.96, 3, epochs, pthres=200, t1=1)
    assert pruner.theta == 0.5 == fxsparse.get_threshold(graph).method.theta  # final_rate > 0.95
    opt_p = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt_g = torch.optim.SGD(graph.parameters(), lr=0.05, momentum=0.9)
    for _epoch in range(epochs):
        for data, target in loader:
            pruner.update_thresh()
            for net, opt in ((model, opt_p), (graph, opt_g)):
                loss = F.cross_entropy(net(data), target)
                opt.zero_grad()
                loss.backward()
                opt.step()
            fxsparse.step_(graph)
        pruner.update_thresh(end_of_batch=True)
    assert pruner.step_idx == fxsparse.get_threshold(graph).current_step == 12
    pruner.desparsify()
    folded = fxsparse.fold(graph)
    for key, value in folded.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)


def _feather_epochs(model, pruner, optimizer, loader, epochs):
    for _epoch in range(epochs):
        for data, target in loader:
            pruner.update_thresh()
            loss = F.cross_entropy(model(data), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        pruner.update_thresh(end_of_batch=True)


def test_checkpoint_mid_ramp_resumes_bit_identically():
    """The Pruner's batch counter lives in the model's state_dict: a resumed run continues the same ramp."""
    loader, base = cifar_like_loader(nbatches=3, seed=2), CifarNet()

    def fresh():
        model = copy.deepcopy(base)
        pruner = Pruner(model, "cpu", 0.8, nbatches=3, epochs=4)
        return model, pruner, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    straight, pruner, optimizer = fresh()
    _feather_epochs(straight, pruner, optimizer, loader, 4)

    first, pruner, optimizer = fresh()
    _feather_epochs(first, pruner, optimizer, loader, 1)  # stops inside the ramp (batches 0..5)
    checkpoint = copy.deepcopy({"model": first.state_dict(), "optimizer": optimizer.state_dict()})
    resumed, pruner, optimizer = fresh()
    resumed.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    assert pruner.step_idx == 3
    _feather_epochs(resumed, pruner, optimizer, loader, 3)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_pruner_keeps_the_users_parameter_objects_and_theta_rule():
    model = CifarNet()
    before = {id(p) for p in model.parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the Pruner: still valid
    pruner = Pruner(model, "cpu", 0.95, 2, 4)
    assert {id(p) for p in model.parameters()} == before
    assert pruner.theta == 1.0  # 0.95 is not > 0.95
    pruner.update_thresh()
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    optimizer.step()
    pruner.desparsify()
    assert {id(p) for p in model.parameters()} == before


def test_pruner_errors_are_clear():
    with pytest.raises(ValueError, match="must start before it ends"):
        Pruner(CifarNet(), "cpu", 0.9, nbatches=2, epochs=4, t1=2)
    with pytest.raises(ValueError, match="nbatches"):
        Pruner(CifarNet(), "cpu", 0.9, nbatches=0, epochs=4)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Pruner(CifarNet(), "cpu", 90, nbatches=2, epochs=4)
    model = CifarNet()
    pruner = Pruner(model, "cpu", 0.5, 2, 4)
    with pytest.raises(ValueError, match="already sparsified"):
        Pruner(model, "cpu", 0.5, 2, 4)
    pruner.desparsify()
    with pytest.raises(RuntimeError, match="desparsified"):
        pruner.update_thresh()
