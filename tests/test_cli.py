"""The `fxsparse` command's export and flops subcommands on real tiny runs, and its one-line errors."""

import argparse
import io
import json

import pytest
import torch

import fxsparse
from fxsparse.export import load_csr, read_csr_metadata
from fxsparse.train import TrainConfig, cli, run

from test_export import assert_bitwise_equal
from test_train import TINY


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit code 2 and the error in one line of stderr (after any notes), no traceback."""
    assert code == 2
    lines = [line for line in err.strip().splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("fxsparse ") and ": error: " in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


def bad_pickle() -> bytes:
    """A torch checkpoint holding an object that weights_only=True refuses (its error runs to a dozen lines)."""
    buffer = io.BytesIO()
    torch.save({"model": argparse.Namespace(weights=1)}, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def ramp_run(tmp_path_factory):
    """A st3sigma run whose ramp spans both epochs, stopped after the first: its checkpoint is mid-ramp."""
    runs = tmp_path_factory.mktemp("runs")
    config = TrainConfig(
        **dict(
            TINY, method="st3sigma", sparsity=0.8, epochs=2, ramp_begin=0, ramp_end=2, runs_dir=str(runs), sname="ramp"
        )
    )
    stopped = run(config, stop_after=1)
    return config.run_dir / "checkpoint.pt", stopped["model"]


# ---------------------------------------------------------------------------------------------------
# export: the run it is given
# ---------------------------------------------------------------------------------------------------
def test_export_of_a_mid_ramp_checkpoint_is_the_run_at_its_step(ramp_run, tmp_path, capsys):
    checkpoint, live = ramp_run
    threshold = fxsparse.get_threshold(live)
    assert 0 < threshold.target_sparsity() < 0.8  # the run is mid-ramp
    out = tmp_path / "ramp.safetensors"
    assert cli.main(["export", "--checkpoint", str(checkpoint), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "mid-ramp" in err and f"step {int(threshold.step)}" in err
    assert_bitwise_equal(load_csr(out), fxsparse.fold(live).state_dict())  # not the model at the final sparsity
    metadata = read_csr_metadata(out)
    assert metadata["method"] == "st3sigma" and metadata["architecture"] == "cnn"
    assert metadata["extra"]["step"] == int(threshold.step)
    assert metadata["extra"]["target_sparsity"] == pytest.approx(threshold.target_sparsity())


def test_export_refuses_flags_that_contradict_the_run(ramp_run, tmp_path, capsys):
    checkpoint, _ = ramp_run
    out = tmp_path / "out.safetensors"
    for flags, needle in (
        (["--method", "st3"], "st3sigma"),
        (["--sparsity", "0.9"], "sparsity 0.8"),
        (["resnet20"], "model cnn"),
        (["--width", "1"], "width 0.25"),
    ):
        args = ["export", *flags[-1:]] if flags == ["resnet20"] else ["export", *flags]
        code = cli.main([*args, "--checkpoint", str(checkpoint), "-o", str(out)])
        assert_one_line_error(code, capsys.readouterr().err, "contradicts", needle)
        assert not out.exists()
    # flags that repeat the run's values are fine
    assert (
        cli.main(
            [
                "export",
                "cnn",
                "--checkpoint",
                str(checkpoint),
                "--method",
                "st3sigma",
                "--sparsity",
                "0.8",
                "-o",
                str(out),
            ]
        )
        == 0
    )


def test_export_and_flops_of_a_finished_run(tmp_path, capsys, load_tool):
    config = TrainConfig(**dict(TINY, method="feather", sparsity=0.9, epochs=1, runs_dir=str(tmp_path), sname="done"))
    summary = run(config)
    out = tmp_path / "done.safetensors"
    assert load_tool("export").main(["--checkpoint", str(config.run_dir / "checkpoint.pt"), "-o", str(out)]) == 0
    assert "mid-ramp" not in capsys.readouterr().err
    assert_bitwise_equal(load_csr(out), summary["folded_model"].state_dict())
    assert load_tool("flops").main(["--checkpoint", str(config.run_dir / "checkpoint.pt"), "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = fxsparse.flops(summary["folded_model"], torch.zeros(1, 1, 12, 12))  # the run's own data shape
    assert report["totals"]["sparse_macs"] == expected.sparse_macs < expected.dense_macs


def test_a_state_dict_of_a_sparsified_model_needs_method_and_sparsity(tmp_path, capsys):
    from models import TinyCNN

    sparse = fxsparse.sparsify(TinyCNN(), "st3", 0.5)
    torch.save(sparse.state_dict(), tmp_path / "sparse.pt")
    out = tmp_path / "out.safetensors"
    code = cli.main(
        ["export", "models:TinyCNN", "--checkpoint", str(tmp_path / "sparse.pt"), "--method", "st3", "-o", str(out)]
    )
    assert_one_line_error(code, capsys.readouterr().err, "--method st3sigma --sparsity 0.9")
    assert (
        cli.main(
            [
                "export",
                "models:TinyCNN",
                "--checkpoint",
                str(tmp_path / "sparse.pt"),
                "--method",
                "st3",
                "--sparsity",
                "0.5",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert "final sparsity 0.5" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# flops: one model builder for every command
# ---------------------------------------------------------------------------------------------------
def test_flops_of_the_training_default_model(capsys, load_tool):
    assert load_tool("flops").main(["cnn", "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    # SmallCNN on a 1x28x28 image, by hand: 3x3 convs 1->32 at 28x28, 32->64 at 14x14, 64->128 at 7x7, then
    # 128*3*3 -> 256 -> 10 linears
    by_hand = 28 * 28 * 32 * 9 + 14 * 14 * 64 * 32 * 9 + 7 * 7 * 128 * 64 * 9 + 1152 * 256 + 256 * 10
    assert report["totals"]["dense_macs"] == by_hand == 7_748_608
    assert cli.main(["flops", "resnet20", "--width", "0.5", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["dense_macs"] > 0
    assert cli.main(["flops", "models:TinyCNN", "--input-size", "1", "8", "8"]) == 0
    capsys.readouterr()
    code = cli.main(["flops", "models:TinyCNN", "--input-size", "3", "8", "8"])
    assert_one_line_error(code, capsys.readouterr().err, "--input-size")


# ---------------------------------------------------------------------------------------------------
# one-line errors, and nothing written
# ---------------------------------------------------------------------------------------------------
def _train(tmp_path, *extra):
    return cli.main(
        [
            "train",
            "--dataset",
            "synthetic",
            "--width",
            "0.25",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--threads",
            "1",
            "--no-progress",
            "--no-export",
            "--runs-dir",
            str(tmp_path / "runs"),
            "--sname",
            "r",
            *extra,
        ]
    )


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--sparsity", "1.5"], "--sparsity"),
        (["--batch-size", "0"], "--batch-size"),
        (["--device", "bogus"], "--device 'bogus'"),
        (["--epochs", "0"], "--epochs"),
        (["--batch-size", "5000"], "larger than the training set"),
    ],
)
def test_bad_settings_are_one_line_and_create_nothing(tmp_path, capsys, extra, needle):
    assert_one_line_error(_train(tmp_path, *extra), capsys.readouterr().err, needle)
    assert not (tmp_path / "runs").exists()


def test_bad_resume_checkpoints_are_one_line_errors(tmp_path, capsys):
    assert _train(tmp_path) == 0
    checkpoint = tmp_path / "runs" / "r" / "checkpoint.pt"
    good = checkpoint.read_bytes()
    capsys.readouterr()
    cases = {
        "corrupt": b"\x00not a checkpoint" * 10,
        "truncated": good[: len(good) // 2],
        "a bad pickle": bad_pickle(),
    }
    for content in cases.values():
        checkpoint.write_bytes(content)
        assert_one_line_error(_train(tmp_path, "--resume"), capsys.readouterr().err, "corrupt", "--overwrite")
    saved = torch.load(io.BytesIO(good), weights_only=True)
    for drop, needle in (("config", "no run config"), ("optimizer", "'optimizer' is missing")):
        torch.save({k: v for k, v in saved.items() if k != drop}, checkpoint)
        assert_one_line_error(_train(tmp_path, "--resume"), capsys.readouterr().err, needle)
    torch.save(dict(saved, model={"nothing": torch.zeros(1)}), checkpoint)
    assert_one_line_error(_train(tmp_path, "--resume"), capsys.readouterr().err, "cannot restore", "--overwrite")


@pytest.mark.parametrize("command", ["export", "flops"])
def test_bad_checkpoint_files_for_export_and_flops(tmp_path, capsys, command):
    out = ["-o", str(tmp_path / "out.safetensors")] if command == "export" else []
    for name, content in (
        ("pickle.pt", bad_pickle()),
        ("junk.pt", b"junk" * 50),
        ("list.pt", None),
        ("junk.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{junk" * 3),
    ):
        path = tmp_path / name
        if content is None:
            torch.save([torch.zeros(2)], path)
        else:
            path.write_bytes(content)
        code = cli.main([command, "cnn", "--checkpoint", str(path), *out])
        assert_one_line_error(code, capsys.readouterr().err, name)
    assert not (tmp_path / "out.safetensors").exists()
    assert_one_line_error(
        cli.main([command, "--checkpoint", str(tmp_path / "absent.pt"), *out]), capsys.readouterr().err, "absent.pt"
    )


# ---------------------------------------------------------------------------------------------------
# the shipped configs are package data: found in an installed wheel, from outside the checkout
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_wheel_install_finds_the_shipped_configs(tmp_path):
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root, source = Path(__file__).resolve().parent.parent, tmp_path / "source"  # built from a copy: no build/ left
    shutil.copytree(root / "fxsparse", source / "fxsparse", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)], check=True, cwd=tmp_path
    )
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), *map(str, wheels.glob("*.whl"))], check=True)
    env = dict(os.environ, PYTHONPATH=str(site))
    printed = subprocess.run(
        [sys.executable, "-m", "fxsparse", "train", "--config", "st3_cifar", "--print-config"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert 'method = "st3"' in printed and "finetune_epochs = 10" in printed
    where = subprocess.run(
        [sys.executable, "-c", "import fxsparse; print(fxsparse.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(site))  # the wheel's copy ran, not the checkout's


# ---------------------------------------------------------------------------------------------------
# export, flops: bad options are one line, and nothing is written
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["export", "flops"])
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["cnn", "--width", "0"], "--width"),
        (["cnn", "--width", "-1"], "--width"),
        (["cnn", "--sparsity", "1.5"], "--sparsity"),
        (["cnn", "--sparsity", "7"], "--sparsity"),
        (["cnn", "--num-classes", "0"], "--num-classes"),
        (["torch.nn:Linear"], "cannot build torch.nn:Linear"),
        (["cnn", "--method", "st3"], "would be ignored"),  # no checkpoint: a fresh dense model
    ],
)
def test_bad_model_options_are_one_line_errors(command, argv, needle, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    code = cli.main([command, *argv, *(["-o", str(out)] if command == "export" else [])])
    assert_one_line_error(code, capsys.readouterr().err, needle)
    assert not out.exists()


@pytest.mark.parametrize("command", ["export", "flops"])
def test_method_and_sparsity_on_a_plain_checkpoint_are_refused(command, tmp_path, capsys):
    plain = tmp_path / "plain.pth"
    torch.save(fxsparse.fold(fxsparse.sparsify(tiny_cnn(), "st3", 0.5)).state_dict(), plain)
    csr = tmp_path / "plain.safetensors"
    fxsparse.save_csr(fxsparse.fold(fxsparse.sparsify(tiny_cnn(), "st3", 0.5)), csr, method="st3", architecture="cnn")
    out = tmp_path / "out.safetensors"
    for checkpoint in (plain, csr):
        for flags in (["--method", "st3", "--sparsity", "0.5"], ["--sparsity", "0.5"]):
            argv = [command, "cnn", "--checkpoint", str(checkpoint), *flags]
            code = cli.main(argv + (["-o", str(out)] if command == "export" else []))
            assert_one_line_error(code, capsys.readouterr().err, "plain", "would be ignored", flags[0])
    assert not out.exists()


def test_flops_checks_every_output_path_before_writing_any(tmp_path, capsys):
    plot, json_path = tmp_path / "flops.png", tmp_path / "absent" / "flops.json"
    code = cli.main(["flops", "cnn", "--plot", str(plot), "--json", str(json_path)])
    assert_one_line_error(code, capsys.readouterr().err, "--json", "does not exist")
    assert not plot.exists()
    code = cli.main(["flops", "cnn", "--json", str(tmp_path / "flops.json"), "--plot", str(tmp_path)])
    assert_one_line_error(code, capsys.readouterr().err, "--plot", "is a directory")
    assert not (tmp_path / "flops.json").exists()


def tiny_cnn():
    from fxsparse.train.models import build_model

    torch.manual_seed(0)
    return build_model("cnn", None, None, 1.0)
