"""Bad input gives a clear error (what happened, what was expected, what to do) and loses nothing.

Export errors (unwritable path, truncated, corrupt, other architecture) live in tests/test_export.py;
this file adds only the export cases missing there (a path that is a directory or under a file).
"""

import copy

import pytest
import torch

import fxsparse
from fxsparse.methods import METHODS

from models import NothingToSparsify, TiedLinear, TinyCNN, Untraceable


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown sparsity method 'st4'") as info:
        fxsparse.sparsify(TinyCNN(), method="st4")
    for name in METHODS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="available methods"):
        fxsparse.sparsify(TinyCNN(), method=3)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 90, 1.5, float("nan"), float("inf"), True, "0.9", None])
def test_sparsity_outside_zero_one_is_refused_with_the_fix(sparsity):
    model = TinyCNN()
    with pytest.raises(ValueError, match=r"must be in \[0, 1\).*sparsity=0.9"):
        fxsparse.sparsify(model, "st3", sparsity)
    assert not fxsparse.is_sparsified(model)


def test_model_with_nothing_to_sparsify():
    with pytest.raises(ValueError, match="nothing to sparsify in NothingToSparsify: found 0 prunable weights"):
        fxsparse.sparsify(NothingToSparsify())
    with pytest.raises(ValueError, match="nothing to sparsify"):
        fxsparse.sparsify_(NothingToSparsify())
    with pytest.raises(TypeError, match="takes a torch.nn.Module, got function"):
        fxsparse.sparsify(lambda x: x)


def test_sparsifying_a_sparsified_model_says_what_to_do():
    model = fxsparse.sparsify(TinyCNN(), "st3", 0.5)
    state = copy.deepcopy(model.state_dict())
    for again in (fxsparse.sparsify, fxsparse.sparsify_):
        with pytest.raises(ValueError, match=r"already sparsified.*fxsparse.fold\(model\)"):
            again(model, "feather", 0.9)
    assert len(fxsparse.pool.sparse_entries(model)) == 4  # nothing was added or lost
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    fxsparse.sparsify(fxsparse.fold(model), "feather", 0.9)  # the documented way works


def test_untraceable_model_falls_back_and_says_what_was_lost():
    with pytest.warns(UserWarning) as record:
        model = fxsparse.sparsify(Untraceable(), "st3", 0.5)
    message = str(record[0].message)
    assert "could not trace Untraceable" in message and "TraceError" in message
    for lost in (
        "found 2 prunable weights",
        "F.linear/F.conv*/matmul on raw parameters stay dense",
        "forward pre-hook, not a graph node",
    ):
        assert lost in message
    model(torch.randn(3, 6))
    assert fxsparse.realized_sparsity(model) == pytest.approx(0.5, abs=1 / 48)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("method", ["st3sigma", "feather"])
def test_non_finite_weights_at_threshold_time_raise_and_keep_the_last_good_state(method, bad):
    model = fxsparse.sparsify(TinyCNN(), method, 0.5).eval()  # eval: BatchNorm statistics stay put
    x = torch.randn(2, 1, 8, 8)
    model(x)
    threshold = fxsparse.get_threshold(model)
    good_tau, good_state = threshold.tau.clone(), copy.deepcopy(model.state_dict())
    raw = model.conv2.parametrizations.weight.original
    with torch.no_grad():
        kept = raw[1, 2, 0, 0].item()
        raw[1, 2, 0, 0] = bad  # a diverged optimizer step
    with pytest.raises(ValueError, match=r"non-finite weight.*shape \(16, 4, 3, 3\).*lower the learning rate"):
        model(x)
    assert torch.equal(threshold.tau, good_tau)  # no garbage threshold was installed
    with pytest.raises(ValueError, match="non-finite"):  # and it keeps refusing, not silently proceeding
        model(x)
    with torch.no_grad():
        raw[1, 2, 0, 0] = kept
    model(x)  # repaired: back to the same threshold and masks
    assert torch.equal(threshold.tau, good_tau)
    for key, value in model.state_dict().items():
        assert torch.equal(value, good_state[key]), key


def test_non_finite_weights_before_the_ramp_do_not_need_a_threshold():
    model = fxsparse.sparsify(TinyCNN(), "st3", 0.5, fxsparse.Cubic(begin=3, end=6))
    with torch.no_grad():
        model.fc.parametrizations.weight.original[0, 0] = float("nan")
    assert torch.isnan(model(torch.randn(1, 1, 8, 8))).any()  # dense: NaN flows like in plain training
    fxsparse.step_(model, 4)
    with pytest.raises(ValueError, match="non-finite"):
        model(torch.randn(1, 1, 8, 8))


@pytest.mark.parametrize("begin,end", [(10, 5), (5, 5), (-1, 4), (0, 0)])
def test_schedule_ending_before_it_begins(begin, end):
    with pytest.raises(ValueError, match=r"0 <= begin < end.*fxsparse.Constant\(\)"):
        fxsparse.Cubic(begin=begin, end=end)
    with pytest.raises(TypeError, match="integer step counts"):
        fxsparse.Cubic(begin=0.5, end=10)
    with pytest.raises(TypeError, match="schedule must be callable"):
        fxsparse.sparsify(TinyCNN(), "st3", 0.5, schedule=(begin, end))


def test_step_and_hooks_on_a_model_that_is_not_sparsified():
    for call in (
        lambda m: fxsparse.step_(m),
        lambda m: fxsparse.hook_optimizer(m, torch.optim.SGD(m.parameters(), 0.1)),
        lambda m: fxsparse.fold(m),
    ):
        with pytest.raises(ValueError, match=r"not a sparsified model.*fxsparse.sparsify\(model"):
            call(TinyCNN())


def test_exclude_of_the_wrong_type():
    with pytest.raises(TypeError, match="glob pattern"):
        fxsparse.sparsify(TinyCNN(), "st3", 0.5, exclude=[3])


def test_checkpoint_of_another_architecture_is_refused_by_load_state_dict():
    """torch's strict load names the missing/unexpected keys; fxsparse's buffers take part like any other."""
    model = fxsparse.sparsify(TinyCNN(), "st3", 0.5)
    other = fxsparse.sparsify(TiedLinear(), "st3", 0.5)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*conv1\.parametrizations\.weight\.original"):
        model.load_state_dict(other.state_dict())
    dense = TinyCNN().state_dict()  # a dense checkpoint: load it into the model before sparsifying
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*conv1\.weight"):
        model.load_state_dict(dense)


# --- export: only what tests/test_export.py does not cover -------------------------------------------


def _folded():
    return fxsparse.fold(fxsparse.sparsify(TinyCNN(), "st3", 0.5))


def test_export_to_a_directory_path_fails_and_leaves_nothing(tmp_path):
    from fxsparse.export import save_csr

    target = tmp_path / "checkpoints"
    target.mkdir()
    with pytest.raises(OSError):
        save_csr(_folded(), target)
    assert target.is_dir() and not any(target.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]  # no temporary left beside it


def test_export_under_a_file_fails_and_keeps_the_previous_checkpoint(tmp_path):
    from fxsparse.export import load_csr, save_csr

    good = tmp_path / "model.safetensors"
    save_csr(_folded(), good)
    before = good.read_bytes()
    with pytest.raises(OSError):
        save_csr(_folded(), good / "nested.safetensors")  # a path below a regular file
    assert good.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    load_csr(good)
