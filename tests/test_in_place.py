"""sparsify_: the user's own model, sparsified in place, computes what sparsify() computes, and its module tree
is unchanged apart from the parametrizations on the modules that own the pooled weights."""

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import fxsparse
from fxsparse.compat import Pruner
from fxsparse.methods import METHODS

from models import Branches, FunctionalWeights, LayerStack, RemembersInput, TiedLinear, TinyCNN

ALL_METHODS = sorted(METHODS)


def sequential():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


FACTORIES = {  # model, an input
    "Sequential": (sequential, lambda: torch.randn(5, 8)),
    "ModuleList subclass": (LayerStack, lambda: torch.randn(5, 8)),
    "ModuleDict subclass": (Branches, lambda: torch.randn(5, 8)),
    "F.conv1d/F.linear on a submodule's parameters": (FunctionalWeights, lambda: torch.randn(5, 3, 7)),
    "tied weights": (TiedLinear, lambda: torch.randn(5, 12)),
    "CNN": (TinyCNN, lambda: torch.randn(5, 1, 8, 8)),
}


def visible_tree(model: nn.Module) -> list[tuple[str, type]]:
    """What the user sees: module names and classes, outside the parametrizations."""
    return [
        (name, parametrize.type_before_parametrizations(m))
        for name, m in model.named_modules()
        if "parametrizations" not in name.split(".")
    ]


@pytest.mark.parametrize("name", FACTORIES)
def test_the_module_tree_is_unchanged_and_forward_still_works(name):
    factory, example = FACTORIES[name]
    model = factory()
    tree, children = visible_tree(model), [n for n, _ in model.named_children()]
    dense_out = model(example())
    fxsparse.sparsify_(model, "st3sigma", 0.5)
    assert visible_tree(model) == tree
    assert [n for n, _ in model.named_children()] == children
    out = model(example())
    assert isinstance(out, torch.Tensor) and out.shape == dense_out.shape
    assert not hasattr(model, "fxsparse_threshold")
    if isinstance(model, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        assert len(model) == len(factory())


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_in_place_computes_bit_for_bit_what_sparsify_computes(name, method):
    """Same pool, same outputs, same tau at every step of a ramp and a few SGD steps, same folded weights."""
    factory, example = FACTORIES[name]
    base = factory()
    graph = fxsparse.sparsify(base, method, 0.7, fxsparse.Cubic(0, 3))
    own = copy.deepcopy(base)
    fxsparse.sparsify_(own, method, 0.7, fxsparse.Cubic(0, 3))
    assert fxsparse.get_threshold(own).pool_paths == fxsparse.get_threshold(graph).pool_paths
    assert fxsparse.get_threshold(own).pool_size == fxsparse.get_threshold(graph).pool_size
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (graph, own)]
    for _ in range(5):
        x = example()
        outs = [model(x) for model in (graph, own)]
        assert torch.equal(outs[0], outs[1])
        assert torch.equal(fxsparse.get_threshold(graph).tau, fxsparse.get_threshold(own).tau)
        for out, optimizer, model in zip(outs, optimizers, (graph, own)):
            optimizer.zero_grad()
            out.square().mean().backward()
            optimizer.step()
            fxsparse.step_(model)
    folded_graph, folded_own = fxsparse.fold(graph).state_dict(), fxsparse.fold(own).state_dict()
    assert folded_graph.keys() == folded_own.keys()
    for key, value in folded_graph.items():
        assert torch.equal(value, folded_own[key]), key


def test_functional_weights_of_a_submodule_are_pooled_in_place():
    """The old module walk missed F.conv1d/F.linear on a module's own parameters; tracing finds them."""
    model = FunctionalWeights()
    fxsparse.sparsify_(model, "st3", 0.5)
    assert sorted(fxsparse.get_threshold(model).pool_paths) == [
        "block.parametrizations.kernel.original",
        "block.parametrizations.proj.original",
    ]
    model(torch.randn(2, 3, 7))
    assert fxsparse.realized_sparsity(model) == pytest.approx(0.5, abs=1 / 40)


def test_the_threshold_state_is_in_the_state_dict_and_resumes_bit_identically():
    data = [(torch.randn(8, 8), torch.randint(0, 4, (8,))) for _ in range(8)]
    base = LayerStack()

    def fresh():
        model = copy.deepcopy(base)
        fxsparse.sparsify_(model, "st3sigma", 0.9, fxsparse.Cubic(1, 6))
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def train(model, optimizer, batches):
        for x, y in batches:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            fxsparse.step_(model)

    straight, optimizer = fresh()
    train(straight, optimizer, data)
    first, optimizer = fresh()
    train(first, optimizer, data[:4])
    state = copy.deepcopy(first.state_dict())
    assert {
        "0.parametrizations.weight.0.global_threshold.step",
        "0.parametrizations.weight.0.global_threshold.tau",
        "0.parametrizations.weight.0.global_threshold.frozen",
    } <= set(state)
    resumed, optimizer2 = fresh()
    resumed.load_state_dict(state)
    optimizer2.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert fxsparse.get_threshold(resumed).current_step == 4
    train(resumed, optimizer2, data[4:])
    for (key, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), key


def test_feathers_pruner_on_a_sequential_keeps_it_working():
    model = sequential()
    pruner = Pruner(model, "cpu", 0.8, nbatches=2, epochs=2)
    pruner.update_thresh()
    assert len(model) == 3 and model(torch.randn(3, 8)).shape == (3, 4)
    pruner.desparsify()
    assert len(model) == 3 and not model._forward_pre_hooks


def test_sparsify_in_place_of_a_graph_module_then_fold_removes_the_pre_hook():
    model = fx.symbolic_trace(TinyCNN())
    code = model.code
    x = torch.randn(3, 1, 8, 8)
    fxsparse.sparsify_(model, "st3", 0.6)
    sparse_out = model.eval()(x)
    assert model.code == code and len(model._forward_pre_hooks) == 1
    twin = copy.deepcopy(model)
    assert torch.equal(twin(x), sparse_out)
    fxsparse.fold_(model)
    assert not model._forward_pre_hooks and not fxsparse.is_sparsified(model)
    torch.testing.assert_close(model(x), sparse_out)
    assert set(model.state_dict()) == set(fx.symbolic_trace(TinyCNN()).state_dict())
    assert fxsparse.is_sparsified(twin) and len(twin._forward_pre_hooks) == 1  # the copy keeps its own hook
    before = fxsparse.get_threshold(twin).tau.clone()
    with torch.no_grad():
        twin.fc.parametrizations.weight.original.mul_(3)
    twin(x)  # the copy's hook runs the copy's threshold
    assert not torch.equal(fxsparse.get_threshold(twin).tau, before)


def test_tracing_in_place_leaves_the_models_attributes_alone():
    model = RemembersInput()
    fxsparse.sparsify_(model, "st3", 0.5)
    assert model.last_input is None  # not a Proxy left by symbolic tracing
    x = torch.randn(2, 8)
    model(x)
    assert model.last_input is x


def test_in_place_pools_weights_held_by_the_root():
    """No GraphModule to protect: a Linear root (or F.linear on the root's own parameter) is sparsified in place."""
    model = nn.Linear(16, 16)
    fxsparse.sparsify_(model, "st3", 0.5)
    assert fxsparse.get_threshold(model).pool_paths == ["parametrizations.weight.original"]
    model(torch.randn(2, 16))
    assert fxsparse.realized_sparsity(model) == pytest.approx(0.5, abs=1 / 256)
    fxsparse.fold_(model)
    assert type(model) is nn.Linear and int((model.weight == 0).sum()) == 128


IN_PLACE_ZOO = [
    "resnet18",
    "mobilenetv3_small_050",
    "efficientnet_b0",
    "convnext_atto",
    "vit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224",
    "levit_128s",
    "mixer_s16_224",
    "coat_lite_tiny",
    "hgnetv2_b0",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", IN_PLACE_ZOO)
def test_in_place_on_timm_models_matches_sparsify(name):
    timm = pytest.importorskip("timm")
    base = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, *base.pretrained_cfg.get("input_size", (3, 224, 224)))
    graph = fxsparse.sparsify(base, "st3sigma", 0.9)
    own = copy.deepcopy(base)
    tree = visible_tree(own)
    fxsparse.sparsify_(own, "st3sigma", 0.9)
    assert visible_tree(own) == tree
    assert fxsparse.get_threshold(own).pool_paths == fxsparse.get_threshold(graph).pool_paths
    with torch.no_grad():
        assert torch.equal(own(x), graph(x))
    assert torch.equal(fxsparse.get_threshold(own).tau, fxsparse.get_threshold(graph).tau)
