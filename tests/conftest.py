import importlib.util
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)  # tiny models: one thread is faster and immune to OpenMP stalls on a busy machine


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def load_tool():
    """Import a script under tools/ by name (they are scripts, not a package)."""
    tools = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(tools, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def spy(monkeypatch):
    """spy(owner, name) replaces owner.name (a module function or a method) by a wrapper that calls through and
    records each call's (args, kwargs), self included for a method, in the list it returns."""

    def install(owner, name: str) -> list:
        calls = []
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls.append((args, kwargs))
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)
        return calls

    return install


def pass_layers(call) -> list[int]:
    """The layers a recorded call of fxsparse.threshold._Pool.layer_chunks(self, layers=None) passes over."""
    args, kwargs = call
    layers = args[1] if len(args) > 1 else kwargs.get("layers")
    return list(range(len(args[0].tensors))) if layers is None else list(layers)
