"""A model name read from a file never imports code: a CSR checkpoint's "architecture" and a training
checkpoint's config["model"] select only among the names fxsparse knows (built-ins, timm); a
"package.module:callable" is honoured only when the caller typed it (issue 17, item 1)."""

import importlib
import sys

import pytest
import torch

import fxsparse
from fxsparse.models import UntrustedModelName, build_model
from fxsparse.train import cli

from test_cli import assert_one_line_error, ramp_run  # noqa: F401 (a fixture)

SENTINEL = "fxsparse_sentinel_model"


@pytest.fixture
def sentinel(tmp_path, monkeypatch):
    """A module that, imported, builds the tiny training CNN; every import_module call is recorded."""
    (tmp_path / f"{SENTINEL}.py").write_text(
        "from fxsparse.models import SmallCNN\n"
        "def build(num_classes=10):\n"
        "    return SmallCNN(0.25, num_classes=num_classes, in_channels=1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, SENTINEL, raising=False)
    imported = []
    real = importlib.import_module

    def recording(name, *args, **kwargs):
        imported.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", recording)
    yield imported
    sys.modules.pop(SENTINEL, None)


def test_build_model_imports_only_when_allowed(sentinel):
    with pytest.raises(UntrustedModelName, match="yourself"):
        build_model(f"{SENTINEL}:build")
    with pytest.raises(UntrustedModelName):
        build_model("os:abort")
    assert SENTINEL not in sentinel and SENTINEL not in sys.modules
    assert isinstance(build_model(f"{SENTINEL}:build", allow_import=True), torch.nn.Module)
    assert SENTINEL in sentinel


def test_accelerate_checkpoint_never_imports_the_files_architecture(sentinel, tmp_path):
    torch.manual_seed(0)
    model = build_model(f"{SENTINEL}:build", allow_import=True).eval()
    sentinel.clear()
    sys.modules.pop(SENTINEL)
    path = tmp_path / "model.safetensors"
    fxsparse.save_csr(model, path, architecture=f"{SENTINEL}:build")
    x = torch.randn(1, 1, 28, 28)
    with pytest.raises(UntrustedModelName, match=f"accelerate_checkpoint\\(path, '{SENTINEL}:build'"):
        fxsparse.accelerate_checkpoint(path, None, x)
    assert SENTINEL not in sentinel and SENTINEL not in sys.modules  # nothing named in the file was imported
    # the same name, typed by the caller, is built
    fast = fxsparse.accelerate_checkpoint(path, f"{SENTINEL}:build", x)
    assert SENTINEL in sentinel
    torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_known_architecture_name_from_the_file_still_builds(tmp_path):
    model = build_model("cnn", width=1.0).eval()
    path = tmp_path / "cnn.safetensors"
    fxsparse.save_csr(model, path, architecture="cnn")
    x = torch.randn(1, 1, 28, 28)
    torch.testing.assert_close(fxsparse.accelerate_checkpoint(path, None, x)(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("command", ["flops", "export"])
def test_the_command_never_imports_a_run_checkpoints_model_name(ramp_run, sentinel, tmp_path, capsys, command):  # noqa: F811
    checkpoint, _ = ramp_run
    saved = torch.load(checkpoint, weights_only=True)
    saved["config"]["model"] = f"{SENTINEL}:build"
    saved["config"]["width"] = 1.0  # the sentinel builds the run's 0.25-wide CNN itself
    doctored = tmp_path / "checkpoint.pt"
    torch.save(saved, doctored)
    output = ["-o", str(tmp_path / "out.safetensors")] if command == "export" else []
    code = cli.main([command, "--checkpoint", str(doctored), *output])
    assert_one_line_error(code, capsys.readouterr().err, f"{SENTINEL}:build", "name it yourself")
    assert SENTINEL not in sentinel and SENTINEL not in sys.modules
    # typed on the command line, the same name is honoured
    assert cli.main([command, f"{SENTINEL}:build", "--checkpoint", str(doctored), *output]) == 0
    assert SENTINEL in sentinel
