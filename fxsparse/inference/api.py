"""accelerate(), accelerate_checkpoint(), measure_speedup(): a folded sparse model on sparse CPU kernels.

The accelerated model computes what the folded model computes (to float32 rounding) and is for inference
only (eval mode, no autograd through the sparse kernels). Every exact nn.Conv2d (zeros padding) and
nn.Linear becomes a SparseConv2d / SparseLinear that times its candidate paths on the example's
activations at the current thread count (torch.get_num_threads()) and keeps the fastest; a layer for which
dense is as fast goes back to a plain module, so the model is never slower than dense by more than the
timing noise. BatchNorm2d layers after convs are folded into them first.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..export import CsrReader, from_csr
from ..fold import fold
from ..kernel_layer import WeightReadError
from ..models import UntrustedModelName, build_model
from ..pool import is_sparsified
from . import attention, batch_split, ops
from .batchnorm import fold_batchnorms_
from .chain import chain_linears_
from .checkpoint import layer_csr, skeleton
from .end_to_end import SETTLE_S, default_model_timer, keep_csr_parts, keep_what_wins, plain_twin
from .fuse import fuse_epilogues_, replace_max_pools_
from .hooks import Hooks, carry_forward_hooks_, forward_hooks, remove_forward_hooks_
from .layers import DENSE, LayerPlan, Planner, SparseConv2d, SparseLinear, density_of, is_conv1d
from .timing import Timer, default_timer, interleaved_medians

PLAN_ATTRIBUTE = "fxsparse_plan"
# the attention kernel computes what torch's does, only faster: kept when it wins end to end by this much, not
# by min_speedup (a sparse layer's bar); BERT-base 90% gained 1.12x at one thread and 1.16x at two, ViT-B/16 90%
# 1.13-1.14x at one (AMD EPYC Zen 5)
ATTENTION_MIN_SPEEDUP = 1.02
ExcludeSpec = None | str | Sequence[str] | Callable[[str, nn.Module], bool]


@dataclasses.dataclass
class AccelerationPlan:
    """What accelerate() measured and chose, layer by layer (``model.fxsparse_plan``)."""

    layers: list[LayerPlan]
    threads: int
    example_shape: tuple[int, ...] | None
    folded_batchnorms: list[str]
    chained_linears: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    # issue 16, never slower: the whole model timed against dense (end_to_end.keep_what_wins); None: not timed
    end_to_end: dict[str, Any] | None = None
    # issue 16: a batch run a sample per thread (batch_split.split_batches_); None: not considered
    batch_split: dict[str, Any] | None = None
    # issue 16: a transformer's attention on the compiled kernel (attention.switch_attention_); None: no sdpa
    attention: dict[str, Any] | None = None

    @property
    def sparse_layers(self) -> list[LayerPlan]:
        return [p for p in self.layers if p.path != DENSE]

    def table(self, tablefmt: str = "simple") -> str:
        """name, kind, weight shape, input shape, density, dense ms, best sparse ms and path, chosen path."""
        from tabulate import tabulate

        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value:.3f}"

        def switch_row(label: str, record: dict[str, Any], names: tuple[str, str]) -> list[str]:
            """The row of a switch timed end to end (timing.time_switch's record; names: (off, on))."""
            off, on = (record["ms"][name] for name in names)
            chosen = names[1] if record["chosen"] else names[0]
            return [label, "", "", "", "", ms(off), ms(on), "", f"{off / on:.2f}x", chosen, record["reason"]]

        rows = []
        for p in self.layers:
            speedup = f"{p.dense_ms / p.sparse_ms:.2f}x" if p.dense_ms and p.sparse_ms else "-"
            rows.append(
                [
                    p.name,
                    p.kind,
                    "x".join(map(str, p.weight_shape)),
                    "x".join(map(str, p.input_shape)) if p.input_shape else "-",
                    f"{p.density:.3f}",
                    ms(p.dense_ms),
                    ms(p.sparse_ms),
                    p.best_sparse or "-",
                    speedup,
                    p.path,
                    p.reason,
                ]
            )
        dense_total = sum(p.dense_ms or 0.0 for p in self.layers)
        chosen_total = sum((p.chosen_ms if p.chosen_ms is not None else p.dense_ms) or 0.0 for p in self.layers)
        rows.append(["total (layers timed alone)", "", "", "", "", ms(dense_total), "", "", "", ms(chosen_total), ""])
        if self.end_to_end:  # issue 16: what the whole model measured, and what it kept
            whole = self.end_to_end["ms"]
            best = min((n for n in whole if n != DENSE), key=whole.get)
            speedup = f"{whole[DENSE] / whole[best]:.2f}x"
            row = ["whole model, end to end", "", "", "", "", ms(whole[DENSE]), ms(whole[best]), best, speedup]
            rows.append(row + [self.end_to_end["chosen"], self.end_to_end["reason"]])
        if self.batch_split and "ms" in self.batch_split:  # issue 16: the batch split a sample per thread
            names = (batch_split.WHOLE, batch_split.SPLIT)
            rows.append(switch_row("the batch, a sample per thread", self.batch_split, names))
        if self.attention and "ms" in self.attention:  # issue 16: the attention kernel, timed end to end
            rows.append(switch_row("attention, whole model", self.attention, (attention.TORCH, attention.NATIVE)))
        headers = [
            "layer",
            "kind",
            "weight",
            "input",
            "density",
            "dense ms",
            "sparse ms",
            "best sparse",
            "speedup",
            "chosen",
            "note",
        ]
        return tabulate(rows, headers, tablefmt=tablefmt, disable_numparse=True)

    def paths(self) -> dict[str, str]:
        """{layer: chosen path}: pass it as ``paths=`` to build the same model again without timing."""
        return {p.name: p.path for p in self.layers}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AccelerationPlan:
        """The plan to_dict() wrote (e.g. read back from JSON)."""
        fields = {f.name for f in dataclasses.fields(LayerPlan)}
        layers = []
        for entry in data["layers"]:
            layer = LayerPlan(**{k: v for k, v in entry.items() if k in fields})
            layer.weight_shape = tuple(layer.weight_shape)
            layer.input_shape = tuple(layer.input_shape) if layer.input_shape else None
            layers.append(layer)
        shape = tuple(data["example_shape"]) if data.get("example_shape") else None
        return cls(
            layers,
            data["threads"],
            shape,
            list(data["folded_batchnorms"]),
            [tuple(pair) for pair in data.get("chained_linears", [])],
            data.get("end_to_end"),
            data.get("batch_split"),
            data.get("attention"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "example_shape": self.example_shape,
            "folded_batchnorms": self.folded_batchnorms,
            "chained_linears": self.chained_linears,
            "end_to_end": self.end_to_end,
            "batch_split": self.batch_split,
            "attention": self.attention,
            "layers": [p.to_dict() for p in self.layers],
        }


def call_model(model: nn.Module, example_input: Any) -> Any:
    """model(x), model(*x) for a tuple/list, model(**x) for a mapping (e.g. a tokenizer's output)."""
    if isinstance(example_input, Mapping):
        return model(**example_input)
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    return model(example_input)


def _example_shape(example_input: Any) -> tuple[int, ...] | None:
    tensors = (
        list(example_input.values())
        if isinstance(example_input, Mapping)
        else (list(example_input) if isinstance(example_input, (tuple, list)) else [example_input])
    )
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    return tuple(first.shape) if first is not None else None


def _exclude_filter(exclude: ExcludeSpec, model: nn.Module) -> Callable[[str, nn.Module], bool]:
    """The filter of ``exclude``; a pattern that matches no module name of ``model`` is an error (a typo would
    exclude nothing, silently)."""
    if exclude is None:
        return lambda name, module: False
    if callable(exclude):
        return exclude
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"exclude must be a glob pattern on module names, a list of them, or a callable(name, module); "
            f"got {exclude!r}"
        )
    names = [name for name, _ in model.named_modules() if name]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ValueError(
                f"exclude pattern {pattern!r} matches no module of the model (module names are like "
                f"{', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
            )
    return lambda name, module: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _replace_submodule_(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _unconvertible(module: nn.Module) -> str | None:
    """Why an exact nn.Conv2d / nn.Linear cannot run sparse (None when it can)."""
    weight = module.weight
    if not weight.is_floating_point():
        return f"weight dtype {weight.dtype}"
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return f"padding_mode {module.padding_mode!r}"
    return None


def _install_sparse_layers_(
    model: nn.Module,
    planner: Planner,
    exclude: Callable[[str, nn.Module], bool],
    checkpoint: CsrReader | None = None,
    kept_dense: list[LayerPlan] | None = None,
) -> list[LayerPlan]:
    """Replace each exact nn.Conv2d / nn.Linear by its sparse layer (built from the checkpoint's CSR when its
    weight is stored as CSR there, else from the module's dense weight); returns ``kept_dense`` extended by
    the plans of the layers left dense (a layer already in it is not looked at again)."""
    kept_dense = [] if kept_dense is None else kept_dense
    seen = {plan.name for plan in kept_dense}
    for name, module in list(model.named_modules()):
        convertible = type(module) in (nn.Conv2d, nn.Linear) or is_conv1d(module)  # kernels: Conv1D as a Linear
        if not convertible or exclude(name, module) or name in seen:
            continue
        key = f"{name}.weight" if name else "weight"
        shape = tuple(module.weight.shape)
        kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
        stored = checkpoint.entries.get(key) if checkpoint is not None else None
        # kernels: a Conv1D (stored (in, out)) is converted once loaded densified, like a layer stored dense
        from_checkpoint = stored is not None and stored.layout == "csr" and not is_conv1d(module)
        if not from_checkpoint and module.weight.device.type == "meta":
            continue  # stored dense in the checkpoint: converted once loaded
        if from_checkpoint:
            crow, col, values = layer_csr(checkpoint, key)
            bias_key = f"{name}.bias" if name else "bias"
            bias = checkpoint.tensor(bias_key) if module.bias is not None and bias_key in checkpoint.entries else None
            density = density_of(values.numel(), shape)
        else:
            density = density_of(int(torch.count_nonzero(module.weight)), shape)
        reason = _unconvertible(module) or (
            f"density {density:.3f} > max_density {planner.max_density}" if density > planner.max_density else None
        )
        if reason:
            if from_checkpoint:  # the module still needs its weight: densify this one layer
                module.weight = nn.Parameter(from_csr(crow, col, values, shape), requires_grad=False)
                if bias is not None:
                    module.bias = nn.Parameter(bias, requires_grad=False)
            kept_dense.append(LayerPlan(name, kind, shape, None, density, {}, DENSE, reason))
            continue
        layer_type = SparseConv2d if kind == "conv" else SparseLinear
        if from_checkpoint:
            layer = layer_type.from_csr(module, crow, col, values, bias)
        else:
            layer = layer_type.from_module(module)
        layer.name, layer.planner = name, planner
        _replace_submodule_(model, name, layer)
    return kept_dense


def _weight_read_(
    model: nn.Module, error: WeightReadError, layer: SparseConv2d | SparseLinear, parts: tuple | None
) -> LayerPlan:
    """Put back the plain module of a layer whose parent computes with its .weight (not its forward), with a
    warning that names it; returns its plan (dense). A layer already planned without its CSR parts kept (no
    end-to-end check) cannot be rebuilt: the error stands, and says to exclude the layer."""
    try:
        plain = plain_twin(layer, parts) if parts is not None else layer.plain_module()
    except (AttributeError, TypeError):
        raise error from None
    name = error.layer_name
    warnings.warn(
        f"fxsparse.accelerate: {name} stays dense: the module around it computes with its .weight directly "
        "(e.g. F.linear(x, self.qkv.weight)), which a sparse kernel layer does not hold",
        stacklevel=4,
    )
    _replace_submodule_(model, name, plain)
    density = density_of(layer.nnz, layer.weight_shape)
    reason = "its .weight is computed with outside its forward"
    return LayerPlan(name, layer.kind, layer.weight_shape, None, density, {}, DENSE, reason)


def _plan_(
    model: nn.Module,
    example_input: Any,
    kept_dense: list[LayerPlan],
    progress: bool,
    hooks: Hooks,
    model_timer: Timer | None = None,
    min_speedup: float = 1.05,
    given: PathsSpec = None,
) -> nn.Module:
    """Fold BatchNorms, run the planning pass, put plain modules back where dense won, then (with a
    model_timer) keep only what wins end to end, and give the modules the forward hooks of their names
    (``hooks``, taken off the model before); the batch split is timed (with a model_timer) or taken as a given
    plan given as ``paths`` chose it (``given``), and so is the attention kernel. Returns the model."""
    model, fused = fold_batchnorms_(model)
    csr_parts = keep_csr_parts(model) if model_timer is not None else {}  # issue 16
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (SparseConv2d, SparseLinear))]
    bar, bar_hooks = None, []
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(layers), desc="fxsparse.accelerate: timing layers", leave=False)

        def advance(*_) -> None:  # returns None: a forward hook's return value would replace the layer's output
            if bar.n < bar.total:
                bar.update(1)

        bar_hooks = [layer.register_forward_hook(advance) for _, layer in layers]
    kept_dense = list(kept_dense)
    try:
        while True:  # a layer whose .weight its parent computes with (BEiT's qkv) is put back dense, and again
            try:
                with torch.no_grad():
                    call_model(model, example_input)
                break
            except WeightReadError as error:
                layer = dict(layers).get(error.layer_name)
                if layer is None:
                    raise
                kept_dense.append(_weight_read_(model, error, layer, csr_parts.get(error.layer_name)))
                layers.remove((error.layer_name, layer))
    finally:
        for hook in bar_hooks:
            hook.remove()
        if bar is not None:
            bar.close()
    plans = list(kept_dense)
    for name, layer in layers:
        if layer.path is None:  # not reached by the example: nothing measured, keep it dense
            density = density_of(layer.nnz, layer.weight_shape)
            plans.append(
                LayerPlan(
                    name, layer.kind, layer.weight_shape, None, density, {}, DENSE, "not called by the example input"
                )
            )
            _replace_submodule_(model, name, layer.plain_module())
            continue
        plans.append(layer.plan)
        if layer.path == DENSE:
            _replace_submodule_(model, name, layer.plain_module())
    whole = None  # issue 16, never slower: the whole model against dense, before chaining (which only helps)
    run = lambda m: call_model(m, example_input)  # noqa: E731
    if model_timer is not None and any(p.path != DENSE for p in plans):
        model, whole = keep_what_wins(model, run, csr_parts, model_timer, min_speedup)
    del csr_parts
    model, chains = chain_linears_(model, run)
    for producer, consumer in chains:
        for plan in plans:
            if plan.name in (producer, consumer):
                side = "output to " + consumer if plan.name == producer else "input from " + producer
                plan.reason = (plan.reason + "; " if plan.reason else "") + f"feature-first {side}"
    # kernels: ReLU, GELU, residual add in the compiled kernels' stores (modules with hooks stay called)
    model, fused_epilogues = fuse_epilogues_(model, keep=hooks.keys(), run=run)
    if any(p.path != DENSE for p in plans):  # issue 16: a model with no sparse layer comes back as the dense model
        replace_max_pools_(model)  # kernels: the compiled max pooling
    for plan in plans:
        if plan.name in fused_epilogues:
            plan.reason = (plan.reason + "; " if plan.reason else "") + "fused epilogue"
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    plans.sort(key=lambda p: order.get(p.name, len(order)))
    carry_forward_hooks_(model, hooks, fused)
    native_attention = None  # issue 16: a transformer's attention on the compiled kernel, when it wins end to end
    given_attention, given_split = _given_choice(given, "attention"), _given_choice(given, "batch_split")
    any_sparse = any(p.path != DENSE for p in plans)
    if (model_timer is not None or given_attention) and any_sparse:
        native_attention = attention.switch_attention_(
            model, example_input, model_timer, ATTENTION_MIN_SPEEDUP, call_model, given_attention
        )
    split = None  # issue 16: a batch a sample per thread, when the model allows it and it wins end to end
    if (model_timer is not None or given_split) and any_sparse:
        split = batch_split.split_batches_(model, example_input, model_timer, min_speedup, call_model, given_split)
    shape = _example_shape(example_input)
    plan = AccelerationPlan(plans, torch.get_num_threads(), shape, fused, chains, whole, split, native_attention)
    setattr(model, PLAN_ATTRIBUTE, plan)
    return model.eval()


PathsSpec = None | Mapping[str, str] | AccelerationPlan


def _planner(
    timer: Timer | None,
    kernels: Sequence[str] | None,
    layouts: Sequence[str] | None,
    min_speedup: float,
    max_density: float,
    paths: PathsSpec,
) -> Planner:
    planner = Planner(
        timer=timer or default_timer,
        min_speedup=min_speedup,
        max_density=max_density,
        paths=dict(paths.paths() if isinstance(paths, AccelerationPlan) else paths or {}),
    )
    if kernels is not None:
        planner.kernels = _choices("kernels", kernels, ops.KERNELS)
    if layouts is not None:
        planner.layouts = _choices("layouts", layouts, ops.CONV_LAYOUTS)
    return planner


def _choices(option: str, given: str | Sequence[str], valid: Sequence[str]) -> tuple[str, ...]:
    """``given`` (one name or several) as a tuple, each one of ``valid``."""
    chosen = (given,) if isinstance(given, str) else tuple(given)
    unknown = [name for name in chosen if name not in valid]
    if unknown or not chosen:
        raise ValueError(
            f"{option}={given!r}: {'unknown ' + repr(unknown) if unknown else 'empty'}; choose among {list(valid)}"
        )
    return chosen


def _model_timer(
    check: bool | None, model_timer: Timer | None, timer: Timer | None, paths: PathsSpec, min_speedup: float
) -> tuple[Timer | None, float]:
    """(the timer of the end-to-end check or None for no check, its margin): see accelerate()'s end_to_end."""
    if check is None:
        check = model_timer is not None or (timer is None and not paths)
    return (model_timer or default_model_timer) if check else None, min_speedup


def _given_choice(paths: PathsSpec, step: str) -> bool:
    """Whether a plan given as ``paths`` chose ``step`` ("batch_split": batch_split.py, "attention":
    attention.py): the rebuilt model takes it too (the batch split after its checks)."""
    return isinstance(paths, AccelerationPlan) and bool((getattr(paths, step) or {}).get("chosen"))


def _check_model(model: nn.Module) -> None:
    devices = {t.device.type for t in [*model.parameters(), *model.buffers()]} - {"cpu", "meta"}
    if devices:
        raise ValueError(
            f"fxsparse.accelerate runs on CPU; the model has tensors on {sorted(devices)}: pass model.cpu()"
        )


def _check_materialized(model: nn.Module) -> None:
    """accelerate() needs the model's values: a skeleton() model is built from its checkpoint instead."""
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if empty:
        raise ValueError(
            f"the model's {empty[0]!r}{f' and {len(empty) - 1} more' if len(empty) > 1 else ''} are on the meta "
            "device (no values, e.g. built inside fxsparse.inference.skeleton()): build the accelerated model from "
            "its CSR checkpoint with fxsparse.accelerate_checkpoint(path, model, example_input), or load its weights "
            "first"
        )


def _check_example(example_input: Any) -> None:
    tensors = (
        list(example_input.values())
        if isinstance(example_input, Mapping)
        else (list(example_input) if isinstance(example_input, (tuple, list)) else [example_input])
    )
    if not any(isinstance(t, torch.Tensor) for t in tensors):
        raise TypeError(
            "example_input must be a tensor, a tuple of positional inputs or a dict of keyword inputs; "
            f"got {type(example_input).__name__}"
        )
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            raise ValueError(
                f"fxsparse.accelerate runs on CPU; the example input is on {t.device}: pass a CPU tensor "
                "and a CPU model"
            )


def accelerate(
    model: nn.Module,
    example_input: Any,
    *,
    exclude: ExcludeSpec = None,
    timer: Timer | None = None,
    kernels: Sequence[str] | None = None,
    layouts: Sequence[str] | None = None,
    min_speedup: float = 1.05,
    max_density: float = 0.6,
    paths: PathsSpec = None,
    progress: bool = False,
    end_to_end: bool | None = None,
    model_timer: Timer | None = None,
) -> nn.Module:
    """An inference copy of ``model`` whose sparse conv and linear layers run on sparse CPU kernels.

    model: a folded model (a sparsified one is folded on a copy first; a dense one gains nothing).
    example_input: what the model is called with at deployment (tensor, tuple of args or dict of kwargs),
      at the batch size and resolution to optimise for; each layer is timed on its activations.
    exclude: module names (glob patterns) or a callable(name, module) kept as they are.
    timer: callable({path: run}) -> {path: seconds} deciding each layer (default: interleaved medians).
    kernels / layouts: restrict the candidates (ops.KERNELS = ("ebag", "mkl"), ops.CONV_LAYOUTS).
    min_speedup: a sparse path replaces dense only when at least this much faster.
    max_density: denser layers stay dense without being timed.
    paths: {layer name: path} (or a previous model's fxsparse_plan) taken without timing, e.g. to rebuild on
      the deployment machine what was measured once (a plan's batch split, after its checks, and its
      attention choice too).
    end_to_end: time the whole model against its dense twin (BatchNorms folded) after the per-layer choice
      and keep only what wins by ``min_speedup`` (the layers that saved most, or none: a model never runs
      slower than dense). None (default): on unless ``paths`` is given or a custom ``timer`` decides the
      layers without a ``model_timer`` (a deterministic policy stays deterministic).
    model_timer: like ``timer``, for the whole-model candidates "dense", "sparse", "top k"
      (default: fxsparse.inference.end_to_end.default_model_timer). With an example batch of 2 or more, it
      also decides whether a batch-independent traced model runs its batches one sample per thread
      (batch_split.py; ``plan.batch_split`` says what was measured and why), and whether a transformer's
      attention runs on the compiled AVX-512 or AVX2 kernel (attention.py; ``plan.attention``).
    The returned model's ``fxsparse_plan`` (an AccelerationPlan) holds every layer's timings and choice.
    """
    _check_example(example_input)
    _check_model(model)
    _check_materialized(model)
    hooks = forward_hooks(model)
    model = fold(model) if is_sparsified(model) else copy.deepcopy(model)
    remove_forward_hooks_(model)
    model.eval()
    planner = _planner(timer, kernels, layouts, min_speedup, max_density, paths)
    kept_dense = _install_sparse_layers_(model, planner, _exclude_filter(exclude, model))
    check = _model_timer(end_to_end, model_timer, timer, paths, min_speedup)  # issue 16
    return _plan_(model, example_input, kept_dense, progress, hooks, *check, given=paths)


def accelerate_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | str | None,
    example_input: Any,
    *,
    exclude: ExcludeSpec = None,
    timer: Timer | None = None,
    kernels: Sequence[str] | None = None,
    layouts: Sequence[str] | None = None,
    min_speedup: float = 1.05,
    max_density: float = 0.6,
    paths: PathsSpec = None,
    progress: bool = False,
    end_to_end: bool | None = None,
    model_timer: Timer | None = None,
) -> nn.Module:
    """accelerate() straight from a CSR checkpoint: its sparse weights never become dense tensors.

    model: the architecture, best built inside ``fxsparse.inference.skeleton()`` (parameters on the meta
      device, so peak memory is the CSR parts plus activations); or a built-in / timm name or
      "module:callable", built so; or None to use the checkpoint's "architecture" metadata, which may only name
      a built-in or timm model (a "module:callable" read from a file is refused: it would run code). Every
      tensor of the checkpoint must match the model's state_dict (names, shapes and floating dtypes), checked
      before anything is loaded.
    Layers that stay dense (denser than max_density, or dense faster) are densified one at a time, and
    timing a layer builds its dense weight for a moment; with ``paths`` (a previous plan) nothing is timed,
    so peak memory is the CSR parts, the kernels' index arrays and the activations.
    """
    _check_example(example_input)
    checkpoint = CsrReader(path)  # the whole header checked, nothing else read
    if model is None or isinstance(model, str):
        model = _build_architecture(checkpoint, model)
    _check_model(model)
    hooks = forward_hooks(model)
    remove_forward_hooks_(model)
    model.eval()
    _check_against_model(checkpoint, model)
    planner = _planner(timer, kernels, layouts, min_speedup, max_density, paths)
    exclude_filter = _exclude_filter(exclude, model)
    with checkpoint:
        kept_dense = _install_sparse_layers_(model, planner, exclude_filter, checkpoint)
        replaced = {
            f"{n}.{k}" if n else k
            for n, m in model.named_modules()
            if isinstance(m, (SparseConv2d, SparseLinear))
            for k in ("weight", "bias")
        }
        state = {}
        for name in checkpoint.entries:
            if name in replaced or _materialized_parameter(model, name):
                continue
            state[name] = checkpoint.tensor(name)  # densified with its own layout (e.g. a ConvTranspose weight)
        model.load_state_dict(state, strict=False, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ValueError(
            f"{checkpoint.path!r} leaves {left[:5]}{' ...' if len(left) > 5 else ''} of the model "
            "without values; was it written for another architecture?"
        )
    kept_dense = _install_sparse_layers_(model, planner, exclude_filter, kept_dense=kept_dense)
    check = _model_timer(end_to_end, model_timer, timer, paths, min_speedup)  # issue 16
    return _plan_(model, example_input, kept_dense, progress, hooks, *check, given=paths)


def _build_architecture(checkpoint: CsrReader, name: str | None) -> nn.Module:
    """The skeleton of the model ``name`` (typed by the caller: any name build_model takes), or of the
    checkpoint's "architecture" (read from the file: only a name fxsparse knows, never an import)."""
    typed = name is not None
    name = name if typed else checkpoint.document.get("architecture")
    if not name:
        raise ValueError(
            f"{checkpoint.path!r} does not record its architecture: pass the model (built inside "
            "fxsparse.inference.skeleton()) or its timm name"
        )
    try:
        with skeleton():
            return build_model(name, allow_import=typed)
    except UntrustedModelName as error:
        raise UntrustedModelName(
            f"{checkpoint.path!r} names its architecture {name!r}, which fxsparse does not import from a file (it "
            f"would run the code it names); if you trust it, pass it yourself: "
            f"accelerate_checkpoint(path, {name!r}, example_input)"
        ) from error


def _materialized_parameter(model: nn.Module, name: str) -> bool:
    """A parameter that already holds real values (a layer densified while installing the sparse ones)."""
    try:
        return model.get_parameter(name).device.type != "meta"
    except AttributeError:
        return False


def _check_against_model(checkpoint: CsrReader, model: nn.Module) -> None:
    """Names and shapes of the checkpoint against the model, before anything is read or allocated."""
    tensors = model.state_dict(keep_vars=True)
    expected = {name: tuple(t.shape) for name, t in tensors.items()}
    for name, stored in checkpoint.entries.items():
        if name in expected and stored.shape != expected[name]:
            raise ValueError(
                f"tensor {name!r} has shape {list(stored.shape)} in {checkpoint.path!r} but "
                f"{list(expected[name])} in the model; was the checkpoint made for another architecture "
                "(or another num_classes)?"
            )
        # the checkpoint's tensors replace the model's (assign): a float dtype the model does not have would
        # fail at the first call, far from here
        if name in tensors and tensors[name].is_floating_point() and stored.dtype != tensors[name].dtype:
            raise ValueError(
                f"tensor {name!r} is {stored.dtype} in {checkpoint.path!r} but {tensors[name].dtype} in the model: "
                f"build the model in {stored.dtype} (e.g. model.to({stored.dtype}) inside skeleton()), or save the "
                "checkpoint in the model's dtype"
            )
    missing = [k for k in expected if k not in checkpoint.entries]
    unexpected = [k for k in checkpoint.entries if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint.path!r} does not match {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; was it made for another architecture?"
        )


def dense_baseline(model: nn.Module) -> nn.Module:
    """The folded model with its BatchNorms folded into the convs: what accelerate() is compared with."""
    model = fold(model) if is_sparsified(model) else copy.deepcopy(model)
    return fold_batchnorms_(model.eval())[0].eval()


def measure_speedup(
    model: nn.Module,
    example_input: Any,
    *,
    repeats: int = 15,
    accelerated: nn.Module | None = None,
    **accelerate_kwargs,
) -> dict[str, Any]:
    """Accelerate ``model`` (folded or sparsified) and time it end to end against its dense baseline.

    Both run eagerly in the same process under torch.inference_mode, interleaved, median of ``repeats``,
    each sample after untimed calls of the same model (end_to_end.SETTLE_S), at the current thread count,
    wall clock with more than one thread; the speed-up is the paired one (timing.paired_ratios) and
    accelerated_ms the dense median over it. Returns JSON-ready figures: dense_ms,
    accelerated_ms, speedup, threads, example_shape, sparse_layers, layers, end_to_end (what accelerate
    measured on the whole model), and the per-layer plan. When no layer runs sparse the accelerated model is
    the dense baseline (the same modules), timed once: speedup 1.0.
    """
    dense = dense_baseline(model)
    fast = accelerated if accelerated is not None else accelerate(model, example_input, **accelerate_kwargs)
    plan: AccelerationPlan = getattr(fast, PLAN_ATTRIBUTE)
    candidates = {"dense": lambda: call_model(dense, example_input)}
    if plan.sparse_layers:  # issue 16: with none, the accelerated model is the dense baseline: one figure
        candidates["accelerated"] = lambda: call_model(fast, example_input)
    with torch.inference_mode():
        times = interleaved_medians(
            candidates, repeats=repeats, warmup=2, min_sample_s=0.0, settle_s=SETTLE_S, paired=True
        )
    times.setdefault("accelerated", times["dense"])
    return {
        "dense_ms": 1e3 * times["dense"],
        "accelerated_ms": 1e3 * times["accelerated"],
        "speedup": times["dense"] / times["accelerated"],
        "end_to_end": plan.end_to_end,
        "threads": torch.get_num_threads(),
        "example_shape": plan.example_shape,
        "sparse_layers": len(plan.sparse_layers),
        "layers": len(plan.layers),
        "plan": plan.to_dict(),
    }
