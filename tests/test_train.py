"""fxsparse.train (the application) and the `fxsparse train` command on tiny synthetic runs (a few seconds each)."""

import builtins
import json

import pytest
import torch

import fxsparse
from fxsparse.train import TrainConfig, cli, run
from fxsparse.train.checkpoint import save_checkpoint
from fxsparse.train.config import resolve_config
from fxsparse.train.errors import ConfigError, SetupError
from fxsparse.train.models import build_model
from fxsparse.train.recipe import LrLambda, build_optimizer, sparsity_schedule
from fxsparse.train.tensorboard import open_tensorboard

TINY = dict(
    dataset="synthetic",
    model="cnn",
    width=0.25,
    batch_size=64,
    epochs=2,
    lr=0.05,
    threads=1,
    progress=False,
    export=False,
)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_is_bit_identical(tmp_path):
    """Interrupt after the main phase, resume into ST-3's fixed-mask fine-tune: same weights, same history."""
    common = dict(TINY, method="st3", sparsity=0.8, finetune_epochs=1, runs_dir=str(tmp_path))
    full = run(TrainConfig(**common, sname="full"))
    stopped = run(TrainConfig(**common, sname="split"), stop_after=2)
    assert stopped["stopped_after"] == 2
    resumed = run(TrainConfig(**common, sname="split", resume=True))
    a, b = _state(full["folded_model"]), _state(resumed["folded_model"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def strip(history):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in history]

    assert strip(full["history"]) == strip(resumed["history"])
    assert full["test_acc"] == resumed["test_acc"]
    assert abs(resumed["realized_sparsity"] - 0.8) < 1e-3


def test_resume_refuses_other_settings_and_missing_checkpoint(tmp_path):
    common = dict(TINY, method="gmp", sparsity=0.5, runs_dir=str(tmp_path), sname="r")
    run(TrainConfig(**common), stop_after=1)
    with pytest.raises(ValueError, match="lr: checkpoint 0.05, now 0.1"):
        run(TrainConfig(**dict(common, lr=0.1), resume=True))
    with pytest.raises(FileExistsError, match="--resume"):
        run(TrainConfig(**common))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(TrainConfig(**dict(common, sname="other"), resume=True))


def test_cli_train_end_to_end(tmp_path, capsys):
    code = cli.main(
        [
            "train",
            "--dataset",
            "synthetic",
            "--model",
            "cnn",
            "--width",
            "0.25",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--method",
            "feather",
            "--sparsity",
            "0.9",
            "--threads",
            "1",
            "--runs-dir",
            str(tmp_path),
            "--sname",
            "cli",
            "--no-progress",
        ]
    )
    assert code == 0
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert summary["method"] == "feather" and abs(summary["realized_sparsity"] - 0.9) < 1e-3
    assert summary["sparse_macs"] < summary["dense_macs"]
    assert (tmp_path / "cli" / "model.csr.safetensors").stat().st_size == summary["csr_bytes"]
    out = capsys.readouterr().out
    assert "test accuracy" in out and "sparse MACs" in out
    code = cli.main(["train", "--dataset", "synthetic", "--runs-dir", str(tmp_path), "--sname", "cli"])
    assert code == 2 and "--resume" in capsys.readouterr().err


def _resolve(args):
    return resolve_config(getattr(args, "config", None), vars(args))


def test_config_file_and_command_line_precedence(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('model = "resnet20"\nepochs = 7\nlr = 0.05\nmilestones = [3, 5]\nweight-decay = 1e-4\n')
    parser = cli.build_parser()
    config = _resolve(parser.parse_args(["train", "--config", str(toml), "--lr", "0.2"]))
    assert (config.model, config.epochs, config.lr, config.weight_decay) == ("resnet20", 7, 0.2, 1e-4)
    assert config.milestones == (3.0, 5.0) and config.batch_size == TrainConfig().batch_size
    config = _resolve(parser.parse_args(["train", "--config", str(toml), "--epochs", "2", "--milestones", "1,2"]))
    assert config.epochs == 2 and config.milestones == (1.0, 2.0)
    toml.write_text("epoch = 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'epoch'.*did you mean epochs"):
        _resolve(parser.parse_args(["train", "--config", str(toml)]))
    toml.write_text('epochs = "ten"\n')
    with pytest.raises(ConfigError, match="should be a int"):
        _resolve(parser.parse_args(["train", "--config", str(toml)]))
    assert cli.main(["train", "--config", str(tmp_path / "absent.toml")]) == 2


@pytest.mark.parametrize("name", ["fashion_mnist_cpu", "st3_cifar", "feather_cifar"])
def test_shipped_configs_resolve(name, capsys):
    assert cli.main(["train", "--config", name, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "epochs = " in printed


def test_weight_decay_only_on_conv_linear_weights():
    model = fxsparse.sparsify(build_model("cnn", 10, 1, 0.25), "st3", 0.5)
    optimizer = build_optimizer(model, lr=0.1, weight_decay=5e-4)
    decay, rest = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 5e-4 and rest["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("parametrizations.weight.original") for p in decay["params"])
    assert len(decay["params"]) == 5  # three convs, two linears
    assert all(p.dim() == 1 for p in rest["params"])  # BN weights/biases and linear biases


def test_lr_schedules_and_ramp_placement():
    cosine = LrLambda("cosine", total_steps=100)
    assert cosine(0) == 1.0 and abs(cosine(50) - 0.5) < 1e-12 and cosine(100) == 0.0
    step = LrLambda("step", total_steps=100, milestones=(40, 60), gamma=0.1)
    assert step(39) == 1.0 and abs(step(40) - 0.1) < 1e-12 and abs(step(99) - 0.01) < 1e-12
    warm = LrLambda("cosine", total_steps=100, warmup_steps=10)
    assert warm(0) == 0.1 and warm(10) == 1.0
    # ST-3's CIFAR recipe: ramp from epoch 5 to 80 of 160; Feather: from 0 to half of training
    assert sparsity_schedule(TrainConfig(method="st3", epochs=160), 10) == fxsparse.Cubic(50, 800)
    assert sparsity_schedule(TrainConfig(method="feather", epochs=160), 10) == fxsparse.Cubic(0, 800)
    gmp = TrainConfig(method="gmp", epochs=10, ramp_begin=1, ramp_end=4)
    assert sparsity_schedule(gmp, 10) == fxsparse.Cubic(10, 40)
    with pytest.raises(ValueError, match="ramp"):
        TrainConfig(method="gmp", epochs=10, ramp_end=11)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1})

    def broken_save(obj, file):
        with open(file, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_tensorboard_missing_gives_a_clear_message(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ModuleNotFoundError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(SetupError, match="pip install tensorboard"):
        open_tensorboard(tmp_path)


def test_tensorboard_logging(tmp_path):
    pytest.importorskip("tensorboard")
    summary = run(
        TrainConfig(
            **dict(
                TINY,
                epochs=1,
                method="st3sigma",
                sparsity=0.5,
                tensorboard=True,
                log_every=2,
                runs_dir=str(tmp_path),
                sname="tb",
            )
        )
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/acc",
        "train/lr",
        "sparsity/target",
        "sparsity/tau",
        "val/epoch_acc",
        "epoch/realized_sparsity",
    } <= tags
    assert any(t.startswith("density/") for t in tags)
    assert summary["realized_sparsity"] > 0.49
