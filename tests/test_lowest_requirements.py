"""tools/lowest_requirements.py: the floors of pyproject.toml as pip constraints for tools/check.sh."""

import pytest


@pytest.fixture
def lowest(load_tool):
    return load_tool("lowest_requirements").lowest_constraints


def project(dependencies, **extras):
    return {"project": {"name": "fxsparse", "dependencies": dependencies, "optional-dependencies": extras}}


def test_each_floor_becomes_a_pin_with_its_marker(lowest):
    pins = lowest(
        project(
            ["torch>=2.6", "timm >= 1.0.3", "numpy>=1.24,<3", "tomli>=2; python_version < '3.11'", "packaging"],
            hf=["transformers[torch]>=5.0"],
            test=["pytest>=7", "fxsparse[hf]", "ruff==0.17.6"],
        )
    )
    assert pins == [
        "numpy==1.24",
        "pytest==7",
        "timm==1.0.3",
        "tomli==2; python_version < '3.11'",
        "torch==2.6",
        "transformers==5.0",
    ]  # no floor (packaging, ==), own extra: pip's choice


def test_two_floors_for_one_package_are_refused(lowest):
    with pytest.raises(SystemExit, match="two floors for matplotlib"):
        lowest(project([], plot=["matplotlib>=3.6"], test=["matplotlib>=3.8"]))
    assert lowest(project([], plot=["matplotlib>=3.6"], test=["matplotlib>=3.6"])) == ["matplotlib==3.6"]


def test_this_projects_floors(lowest, load_tool):
    tool = load_tool("lowest_requirements")
    pins = lowest(tool.tomllib.loads((tool.ROOT / "pyproject.toml").read_text()))
    names = [pin.split("==")[0].lower() for pin in pins]
    assert {"torch", "torchvision", "timm", "numpy", "safetensors", "pytest"} <= set(names)
    assert len(names) == len(set(names))
