"""Rebuild a model from a name and a checkpoint, for `fxsparse export` and `fxsparse flops`.

The checkpoint may be:
- a `fxsparse train` checkpoint (runs/NAME/checkpoint.pt): the run's own config says which model, method,
  final sparsity and ramp it trained with, and the threshold's step buffer says where on the ramp it is,
  so the exported model is the run's model at that step. A flag that contradicts the run is an error;
- a state_dict (.pt/.pth, possibly under "state_dict", "model" or "model_state_dict"), a CSR checkpoint or a
  plain .safetensors file of a plain or folded model;
- a state_dict of a sparsified model (keys like "conv1.parametrizations.weight.original"): it holds no
  schedule, so --method and --sparsity say how to rebuild it, and it is folded at its final sparsity.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any, Union

from torch import Tensor, nn

from ..api import sparsify
from ..export import NoCsrMetadata, is_sparsified_key, load_checked_, load_csr, load_csr_into_
from ..fold import fold
from ..models import UntrustedModelName, build_model, default_input_size
from ..pool import THRESHOLD_NAME, distribution_record, get_threshold
from .checkpoint import is_training_checkpoint, load_torch_file, read_checkpoint
from .config import DENSE, TrainConfig, checked_settings
from .data import BUILTIN_SHAPES
from .errors import CheckpointError, CommandError, first_line
from .recipe import sparsity_schedule

PathLike = Union[str, "os.PathLike[str]"]


@dataclasses.dataclass
class LoadedModel:
    model: nn.Module  # a plain (folded) model in eval mode
    name: str  # what it was built from: a built-in, timm or "package.module:callable" name
    method: str | None  # the sparse-training method, when the checkpoint was sparsified
    input_size: tuple[int, ...]  # one input without the batch dimension
    notes: list[str] = dataclasses.field(default_factory=list)  # what the user should know (mid-ramp, fresh weights)
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)  # facts for the CSR checkpoint's metadata


def load_model(
    name: str | None = None,
    checkpoint: PathLike | None = None,
    *,
    method: str | None = None,
    sparsity: float | None = None,
    num_classes: int | None = None,
    width: float | None = None,
) -> LoadedModel:
    """The plain model ``checkpoint`` holds (see the module docstring); without one, ``name`` freshly built."""
    if checkpoint is None:
        if name is None:
            raise CommandError("name the model (e.g. resnet50, cnn, package.module:callable) or give --checkpoint")
        _no_sparse_options("without --checkpoint the model is a fresh dense one", method, sparsity)
        model = build_model(name, num_classes, None, 1.0 if width is None else width, allow_import=True)
        return LoadedModel(
            model.eval(),
            name,
            None,
            default_input_size(name, model),
            notes=[f"no --checkpoint: the freshly initialised {name}"],
        )
    source = os.fspath(checkpoint)
    if not _is_safetensors(source):
        saved = load_torch_file(source)
        if is_training_checkpoint(saved):
            return _load_run(source, name, method, sparsity, num_classes, width)
        state = _state_dict_of(saved, source)
    elif name is not None:
        model = build_model(name, num_classes, None, 1.0 if width is None else width, allow_import=True)
        try:  # a CSR checkpoint: its declared shapes are checked against the model before anything is allocated
            load_csr_into_(model, source)
            _no_sparse_options(f"{source} is a CSR checkpoint of a folded model", method, sparsity)
            return LoadedModel(
                model.eval(), name, None, default_input_size(name, model), metadata={"source": os.path.abspath(source)}
            )
        except NoCsrMetadata:
            state = _read_safetensors(source)
    else:
        state = _read_safetensors(source)
    if name is None:
        raise CommandError(
            f"{source} is not a `fxsparse train` checkpoint: name its model (e.g. resnet50) before --checkpoint"
        )
    model = build_model(name, num_classes, None, 1.0 if width is None else width, allow_import=True)
    loaded = LoadedModel(
        model, name, None, default_input_size(name, model), metadata={"source": os.path.abspath(source)}
    )
    if not any(is_sparsified_key(k) for k in state):
        _no_sparse_options(f"{source} holds a plain (dense or folded) model", method, sparsity)
        load_checked_(model, state, source)
        loaded.model = model.eval()
        return loaded
    if method is None or sparsity is None:
        raise CommandError(
            f"{source} holds a sparsified model (keys like {next(k for k in state if is_sparsified_key(k))!r}) "
            "and no run config: say which method and final sparsity it was trained with "
            "(--method st3sigma --sparsity 0.9) so it can be rebuilt and folded"
        )
    sparse = sparsify(model, method, sparsity)
    _load_state(sparse, state, source)
    loaded.model, loaded.method = fold(sparse).eval(), method
    loaded.notes.append(f"a state_dict holds no sparsity schedule: folded at the final sparsity {sparsity:g}")
    return loaded


def _load_run(
    source: str,
    name: str | None,
    method: str | None,
    sparsity: float | None,
    num_classes: int | None,
    width: float | None,
) -> LoadedModel:
    """The model of a `fxsparse train` run, at the step its checkpoint was written."""
    saved = read_checkpoint(source)
    config = TrainConfig(**checked_settings(saved["config"], f"{source} (the run's config)"))
    shape = dict(
        saved.get("data")
        or BUILTIN_SHAPES.get(config.dataset)
        or {"num_classes": num_classes, "in_channels": 3, "image_size": config.image_size}
    )  # older imagefolder runs
    if shape["num_classes"] is None:
        raise CommandError(f"{source} does not record its number of classes: give --num-classes")
    _agree(source, "the model name", "model", name, config.model)
    _agree(source, "--method", "method", method, config.method)
    _agree(source, "--sparsity", "sparsity", sparsity, config.sparsity)
    _agree(source, "--width", "width", width, config.width)
    _agree(source, "--num-classes", "classes", num_classes, shape["num_classes"])
    try:  # the run's model name is read from the file: it may import code only when the user typed it too
        model = build_model(
            config.model, shape["num_classes"], shape["in_channels"], config.width, allow_import=name is not None
        )
    except UntrustedModelName as error:
        raise CheckpointError(
            f"{source} names its model {config.model!r}, which fxsparse does not import from a file (it would run "
            f"the code it names); if you trust it, name it yourself: {config.model} --checkpoint {source}"
        ) from error
    input_size = (shape["in_channels"], shape["image_size"], shape["image_size"])
    metadata = {
        "source": os.path.abspath(source),
        "run": config.run_name,
        "epoch": saved["epoch"],
        "final_sparsity": config.sparsity,
    }
    if config.method == DENSE:
        load_checked_(model, saved["model"], source)
        return LoadedModel(model.eval(), config.model, None, input_size, metadata=metadata)

    step = _step_of(saved["model"], source)
    steps_per_epoch = step // saved["epoch"]  # the schedule advances once per optimizer step, every epoch alike
    if steps_per_epoch < 1 or step != steps_per_epoch * saved["epoch"]:
        raise CheckpointError(f"{source} is inconsistent: schedule step {step} after {saved['epoch']} epochs")
    sparse = sparsify(
        model,
        config.method,
        config.sparsity,
        sparsity_schedule(config, steps_per_epoch),
        **config.distribution_options(),
    )
    _load_state(sparse, saved["model"], source)
    threshold = get_threshold(sparse)
    target = threshold.target_sparsity()
    metadata.update(step=step, target_sparsity=target, distribution=distribution_record(sparse))
    loaded = LoadedModel(fold(sparse).eval(), config.model, config.method, input_size, metadata=metadata)
    ramp = threshold.schedule
    if target < config.sparsity:
        loaded.notes.append(
            f"{source} is mid-ramp: epoch {saved['epoch']} of {config.total_epochs}, step {step} of the sparsity ramp "
            f"from step {ramp.begin} to {ramp.end}, target sparsity {target:.4f} of the final {config.sparsity:g}; "
            f"exported as the run's model at step {step}"
        )
    return loaded


def _no_sparse_options(what: str, method: str | None, sparsity: float | None) -> None:
    """--method and --sparsity say how to rebuild a sparsified state_dict; anywhere else they would be ignored."""
    given = [flag for flag, value in (("--method", method), ("--sparsity", sparsity)) if value is not None]
    if given:
        verb, them = ("describe", "they") if len(given) > 1 else ("describes", "it")
        raise CommandError(
            f"{' and '.join(given)} {verb} a sparsified state_dict, and {what}: {them} would be ignored; "
            f"leave {' and '.join(given)} out"
        )


def _agree(source: str, option: str, setting: str, given: Any, recorded: Any) -> None:
    """An option may repeat what the run recorded, never contradict it."""
    if given is None:
        return
    same = math.isclose(given, recorded, rel_tol=0, abs_tol=1e-12) if isinstance(recorded, float) else given == recorded
    if not same:
        raise CommandError(
            f"{option} {given} contradicts {source}: that run was trained with {setting} {recorded}; "
            f"leave {option} out (the run's own value is used)"
        )


def _step_of(state: Mapping[str, Any], source: str) -> int:
    keys = [k for k in state if k == f"{THRESHOLD_NAME}.step" or k.endswith(".global_threshold.step")]
    step = state.get(keys[0]) if len(keys) == 1 else None  # a traced model's node, or an in-place one's
    if not isinstance(step, Tensor) or step.numel() != 1 or step.is_floating_point() or int(step) < 0:
        raise CheckpointError(f"{source} has no valid sparsity-schedule step ({THRESHOLD_NAME}.step) in its model")
    return int(step)


def _load_state(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{source} does not fit the rebuilt model: {first_line(error)}") from error


def _is_safetensors(path: str) -> bool:
    """By name, or by content: safetensors starts with an 8-byte header length and then '{'."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    return path.endswith(".safetensors") or head[8:9] == b"{"


def _read_safetensors(path: str) -> dict[str, Tensor]:
    """A CSR checkpoint's folded state_dict, or a plain safetensors file's tensors."""
    try:
        return load_csr(path)
    except NoCsrMetadata:
        pass
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except SafetensorError as error:
        raise CheckpointError(f"cannot read {path}: {first_line(error)}") from error


def _state_dict_of(saved: Any, source: str) -> dict[str, Tensor]:
    """The state_dict in a torch checkpoint: the object itself or one under a usual key; DDP's "module." removed."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(saved, Mapping) and isinstance(saved.get(key), Mapping):
            saved = saved[key]
            break
    if not isinstance(saved, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in saved.items()
    ):
        raise CheckpointError(f"{source} holds a {type(saved).__name__} that is not a state_dict (names to tensors)")
    state = dict(saved)
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state
