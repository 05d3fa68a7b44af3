"""The truth test (issue 10): fxsparse's reports agree with what the forward actually multiplies.

For a model sparsified at 90% (st3sigma, constant schedule) and for its fold, tests/truth.py records the
weight operand of every convolution and matmul at the aten level, independently of fxsparse. Checks:
  forward       the sparsified model runs the original's products (same MACs, same weights) and draws the
                original's random numbers: none in eval (no dropout or DropPath), the same in train; a
                mixture-of-experts stack's products are compared by their total (the sparsified model routes
                its tokens to other experts, but every routed token still passes each stack once);
  flops         fxsparse.flops(): every weight row's dense and sparse MACs and density, and the totals,
                equal the recorded ops' (rows matched to ops by the parameter the operand comes from);
                a weight the forward multiplies has a row, and no row claims zeros the operand lacks;
                the activation-by-activation MACs equal the recorded non-weight products;
  pool          the weights the pass pooled are zero exactly where the ORIGINAL operand's score is <= tau,
                tau numpy's "linear" 0.9-quantile of all pooled scores computed here (the tie rule of
                tests/test_ties.py: ties with tau are pruned too); the weights it left dense are named in
                the warning and multiplied unchanged; layer_densities() and realized_sparsity() equal the
                zeros of the operands multiplied (distinct weights once; eval forward, and train forward
                for train-only branches); a weight multiplied but neither pooled nor left dense is named
                in a warning; an expert stack is checked expert by expert (``<stack>[e]``, each expert's
                matrix a layer: every expert must receive tokens in the recorded forwards);
  fold          the folded model multiplies the same operands (same zeros), draws no random numbers in eval
                and gives the sparsified model's eval outputs;
  flops-folded  the flops check on the folded model.

Run one model's checks and see the numbers: ``python tests/test_truth.py timm/nf_resnet26-scaledstdconv``
(no name: the whole zoo, as a table).
"""

from __future__ import annotations

import copy
import math
import re
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fxsparse

from truth import MulOp, ParamNames, Truth, expert_of, record
from truth_zoo import ZOO, ZOO_BY_NAME

METHOD, SPARSITY = "st3sigma", 0.9
CHECKS = ("forward", "flops", "pool", "fold", "flops-folded")
SHOWN = 6  # problems listed per check


# ------------------------------------------------------------------------------------------------
# the checks: each returns the list of disagreements, worded with the claimed and the true numbers
# ------------------------------------------------------------------------------------------------
def _n(value: int) -> str:
    return f"{value:,}"


def _signature(truth: Truth) -> list[tuple]:
    """The products in order; an expert stack's as one total per stack (its routing depends on the weights)."""
    products, stacks = [], defaultdict(int)
    for op in truth.ops:
        expert = expert_of(op.param)
        if expert is not None:
            stacks[expert[0]] += op.dense_macs
        else:
            products.append((op.kind, op.dense_macs, op.weight_shape and math.prod(op.weight_shape), op.param))
    return products + [("experts", macs, None, stack) for stack, macs in sorted(stacks.items())]


def check_forward(original: tuple[Truth, Truth], sparse: tuple[Truth, Truth]) -> list[str]:
    """(eval, train) recordings: the sparsified model multiplies what the original multiplies, and draws the
    random numbers the original draws, in eval (none) and in train."""
    problems = []
    ours, theirs = _signature(sparse[0]), _signature(original[0])
    if ours != theirs:
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        problems.append(
            f"the sparsified model runs {len(ours)} products, the original {len(theirs)}; first "
            f"difference at product {first}: {ours[first] if first < len(ours) else None} vs "
            f"{theirs[first] if first < len(theirs) else None}"
        )
    for mode, a, b in (("eval", sparse[0], original[0]), ("train", sparse[1], original[1])):
        if a.random != b.random:
            problems.append(f"{mode} forward draws random numbers {dict(a.random)}, the original's {dict(b.random)}")
    return problems


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "-"


def check_flops(report: fxsparse.FlopReport, truth: Truth) -> list[str]:
    """Totals first (claimed vs true, sparse as a share of dense), then each disagreeing row."""
    problems = []
    dense_claim, dense_fact = report.weight_dense_macs, truth.weight_dense_macs
    if dense_claim != dense_fact:
        problems.append(f"total weight dense MACs: claimed {_n(dense_claim)}, true {_n(dense_fact)}")
    sparse_claim, sparse_fact = report.weight_sparse_macs, truth.weight_sparse_macs
    if sparse_claim != sparse_fact:
        problems.append(
            f"total weight sparse MACs: claimed {_n(sparse_claim)} ({_share(sparse_claim, dense_claim)} of "
            f"dense), true {_n(sparse_fact)} ({_share(sparse_fact, dense_fact)} of dense)"
        )
    if report.activation_macs != truth.other_macs:
        problems.append(f"total activation MACs: claimed {_n(report.activation_macs)}, true {_n(truth.other_macs)}")
    claimed: dict[str, list] = {}
    for row in report.weight_rows:
        numel = math.prod(row.weight_shape) if row.weight_shape is not None else None
        param = truth.names.resolve(row.name, numel)
        if param is None:
            problems.append(f"row {row.name!r} names no parameter of the model")
            continue
        claimed.setdefault(param, []).append(row)
    true = truth.by_param()
    for param in sorted(set(claimed) | set(true), key=lambda p: (p not in true, p)):
        rows, use = claimed.get(param, []), true.get(param)
        if use is None:
            macs = sum(r.dense_macs for r in rows)
            problems.append(f"{rows[0].name}: a weight row of {_n(macs)} MACs, but no op multiplies this weight")
            continue
        if not rows:
            problems.append(
                f"{param}: multiplied ({use.calls} op(s), {_n(use.dense_macs)} MACs, density "
                f"{use.densities[0]:.4f}) but no weight row"
            )
            continue
        dense, sparse = sum(r.dense_macs for r in rows), sum(r.sparse_macs for r in rows)
        density = rows[0].density
        if dense != use.dense_macs or sparse != use.sparse_macs or abs(density - use.densities[0]) > 1e-9:
            problems.append(
                f"{rows[0].name}: claimed dense {_n(dense)} sparse {_n(sparse)} density {density:.4f}, true dense "
                f"{_n(use.dense_macs)} sparse {_n(use.sparse_macs)} density {use.densities[0]:.4f}"
            )
    return problems


def _mentions(text: str, names: list[str]) -> bool:
    """A warning names a weight by its fqn or by its module's (a parametrization's 'weight.original1' by
    'weight' too)."""
    for name in names:
        attribute = re.sub(r"\.original\d+$", "", name)
        for candidate in (name, attribute, attribute.rpartition(".")[0]):
            if candidate and re.search(rf"(?<![\w.]){re.escape(candidate)}(?![\w])", text):
                return True
    return False


def rule_scores(operand: Tensor, shape: tuple[int, ...], method: str = METHOD) -> np.ndarray:
    """The scores the method ranks globally, computed by hand from the operand multiplied: |w| in fp32, times
    fp32(sqrt(sum of the weight's shape dims)) for st3sigma (``shape``: the stored weight's)."""
    scores = operand.detach().float().abs().reshape(-1).numpy()
    if method == "st3sigma":
        return scores * np.float32(math.sqrt(sum(shape)))
    return scores


def _operands(truths: tuple[Truth, Truth]) -> dict[str, MulOp]:
    """parameter -> its first layer product (`Truth.layer_ops`), from the (eval, train) recordings: eval wins;
    train adds train-only branches (aux heads)."""
    first: dict[str, MulOp] = {}
    for recorded in truths:
        for op in recorded.layer_ops:
            if op.param is not None and not op.param.startswith("?"):
                first.setdefault(op.param, op)
    return first


def check_pool(
    model: nn.Module,
    sparse: tuple[Truth, Truth],
    original: tuple[Truth, Truth],
    warned: str,
    sparsity: float = SPARSITY,
) -> list[str]:
    """(eval, train) recordings with kept weights. The pass's record (pooled / left dense) is checked group by
    group against the truth: the pooled operands are zero exactly where the original operand's score is <= tau,
    tau numpy's "linear" q-quantile of every pooled score (the tie rule, tests/test_ties.py); a weight left dense
    is named in the warning and multiplied unchanged; layer_densities() and realized_sparsity() count the
    operands' real zeros; a weight multiplied but neither pooled nor left dense is named in a warning.
    The totals first, then each disagreeing weight."""
    problems: list[str] = []
    names = sparse[0].names
    for recorded in sparse:
        uses: dict[str, list[MulOp]] = defaultdict(list)
        for op in recorded.layer_ops:
            uses[op.param].append(op)
        for param, ops in uses.items():
            if len({op.density for op in ops}) > 1:
                problems.append(
                    f"{param}: its {len(ops)} uses multiply operands of different densities "
                    f"{sorted({op.density for op in ops})}"
                )
    operands, originals = _operands(sparse), _operands(original)
    densities = fxsparse.layer_densities(model)
    result = fxsparse.get_threshold(model).pass_result
    groups: dict[str, dict[str, str]] = {"pooled": {}, "dense": {}}  # group -> parameter -> fqn
    for group, fqns in (("pooled", result.pooled), ("dense", [layer.fqn for layer in result.dense])):
        for fqn in fqns:
            param = names.resolve(fqn, densities[fqn][1] if fqn in densities else None)
            if param is None:
                problems.append(f"the pass calls {fqn!r} {group}, no parameter of the model")
                continue
            experts = [f"[{e}]" for e in range(len(names.parameter(param)))] if _is_stack(param, operands) else [""]
            for expert in experts:
                if param + expert not in operands or param + expert not in originals:
                    problems.append(f"{fqn}{expert} is {group} but no op multiplies it (eval or train forward)")
                else:
                    groups[group][param + expert] = fqn + expert
    pooled, dense = groups["pooled"], groups["dense"]
    for param in set(pooled) & set(dense):
        problems.append(f"{pooled[param]} is both pooled and left dense")

    listed = set()
    for fqn, (nonzeros, numel) in densities.items():
        param = names.resolve(fqn, numel)
        listed.add(param)
        if param is None:
            problems.append(f"layer_densities names {fqn!r}, no parameter of the model")
        elif param not in pooled and param not in dense:
            problems.append(f"layer_densities lists {fqn}, which the pass neither pooled nor left dense")
        elif (nonzeros, numel) != (operands[param].nonzeros, operands[param].numel):
            op = operands[param]
            problems.append(
                f"{fqn}: layer_densities says {nonzeros}/{numel} nonzero, the operand multiplied has "
                f"{op.nonzeros}/{op.numel}"
            )
    problems += [f"{fqn} is missing from layer_densities" for p, fqn in {**pooled, **dense}.items() if p not in listed]

    summary = []  # listed first
    summary += _check_tie_rule(pooled, operands, originals, names, sparsity, problems)
    for param, fqn in dense.items():
        if not _mentions(warned, names.aliases_of(param)):
            summary.append(f"{fqn} is left dense without a warning naming it")
        ours, theirs = operands[param], originals[param]
        if ours.weight_shape != theirs.weight_shape or not torch.equal(ours.weight == 0, theirs.weight == 0):
            problems.append(
                f"{fqn} is left dense, yet its operand has {ours.zeros} zeros, the original's {theirs.zeros}"
            )

    counted = [(operands[p].nonzeros, operands[p].numel) for p in {**pooled, **dense}]
    total = sum(n for _, n in counted)
    true_zeros = total - sum(nz for nz, _ in counted)
    realized = fxsparse.realized_sparsity(model)
    if total and abs(realized - true_zeros / total) > 1e-9:
        summary.insert(
            0,
            f"realized_sparsity() = {realized:.6f}, the pooled and left-dense operands multiplied are "
            f"{true_zeros / total:.6f} zeros",
        )
    silent = [p for p in operands if p not in pooled and p not in dense and not _mentions(warned, names.aliases_of(p))]
    if silent:
        silent_numel = sum(operands[p].numel for p in silent)
        everything = sum(op.numel for op in operands.values())
        summary.append(
            f"{len(silent)} multiplied weights ({silent_numel / everything:.1%} of all weights multiplied) "
            f"stay dense without a warning naming them: {', '.join(sorted(silent)[:4])}"
            + (", ..." if len(silent) > 4 else "")
        )
    return summary + problems


def _is_stack(param: str, operands: dict[str, MulOp]) -> bool:
    """True when the forward multiplies ``param`` expert by expert (a mixture-of-experts stack)."""
    return any(expert_of(name) is not None and expert_of(name)[0] == param for name in operands)


def _check_tie_rule(
    pooled: dict[str, str],
    operands: dict[str, MulOp],
    originals: dict[str, MulOp],
    names: ParamNames,
    sparsity: float,
    problems: list[str],
) -> list[str]:
    """The pooled operands' zeros are exactly the original scores <= tau (numpy "linear" quantile); the total
    is returned as a summary line, each weight whose zeros lie elsewhere goes to ``problems``."""
    if not pooled:
        return []
    scores = {param: rule_scores(originals[param].weight, tuple(names.parameter(param).shape)) for param in pooled}
    everything = np.concatenate(list(scores.values()))
    tau = np.float32(np.quantile(everything, sparsity, method="linear"))
    expected = int((everything <= tau).sum())
    actual = sum(operands[param].zeros for param in pooled)
    for param, fqn in pooled.items():
        op, original = operands[param], originals[param]
        if op.weight_shape != original.weight_shape:
            problems.append(f"{fqn}: multiplied as {op.weight_shape}, the original as {original.weight_shape}")
            continue
        rule = torch.from_numpy(scores[param] <= tau)
        zeros = op.weight.reshape(-1) == 0
        if not torch.equal(zeros, rule):
            problems.append(
                f"{fqn}: {op.zeros} zeros, the rule gives {int(rule.sum())} ({int((zeros != rule).sum())} "
                "positions differ)"
            )
    if actual == expected:
        return []
    n = everything.size
    floor_rank = math.floor((n - 1) * sparsity) + 1
    return [
        f"the pooled operands multiplied have {_n(actual)} zeros in {_n(n)} weights; the rule (score <= tau = "
        f"numpy's linear {sparsity}-quantile {float(tau):.6g}) gives {_n(expected)} "
        f"({_n(floor_rank)} + {_n(expected - floor_rank)} tied with tau)"
    ]


def _output_tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _output_tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _output_tensors(v)]
    return []


def _outputs_differ(a: Any, b: Any) -> float:
    """The largest absolute difference between two outputs (inf where their structure differs)."""
    xs, ys = _output_tensors(a), _output_tensors(b)
    if len(xs) != len(ys) or any(x.shape != y.shape for x, y in zip(xs, ys)):
        return math.inf
    worst = 0.0
    for x, y in zip(xs, ys):
        if x.is_floating_point():
            close = torch.allclose(x, y, rtol=1e-4, atol=1e-5)
            worst = max(worst, 0.0 if close else float((x - y).abs().max()))
        elif not torch.equal(x, y):
            worst = math.inf
    return worst


def check_fold(truth: Truth, folded: Truth, rerun: Callable[[], Any], original: Truth) -> list[str]:
    problems = []
    ours, theirs = truth.weight_ops, folded.weight_ops
    if len(ours) != len(theirs):
        problems.append(f"the folded model runs {len(theirs)} weight ops, the sparsified one {len(ours)}")
    for a, b in zip(ours, theirs):
        if a.weight_shape != b.weight_shape:
            problems.append(
                f"weight op {a.index} ({a.param}): shape {a.weight_shape} sparsified vs {b.weight_shape} folded"
            )
        elif not torch.equal(a.weight == 0, b.weight == 0):
            problems.append(f"weight op {a.index} ({a.param}): {a.zeros} zeros sparsified vs {b.zeros} folded")
        elif not torch.allclose(a.weight, b.weight, rtol=1e-5, atol=1e-6):
            diff = float((a.weight - b.weight).abs().max())
            problems.append(f"weight op {a.index} ({a.param}): same zeros, values differ by up to {diff:.3g}")
    if folded.random != original.random:
        problems.append(
            f"the folded model's eval forward draws random numbers {dict(folded.random)}, the "
            f"original's {dict(original.random)}"
        )
    diff = _outputs_differ(truth.output, folded.output)
    if diff:
        again = _outputs_differ(truth.output, rerun())
        why = " (the sparsified model's eval forward is not deterministic: dropout in eval?)" if again else ""
        problems.append(f"eval outputs differ by up to {diff:.3g}{why}")
    return problems


# ------------------------------------------------------------------------------------------------
# one model, every check
# ------------------------------------------------------------------------------------------------
def _forward(model: nn.Module, inputs: Any) -> Any:
    with torch.no_grad():
        return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _calibrate_batchnorm(model: nn.Module, inputs: Any) -> None:
    """Give every batch norm the running statistics of one batch of ``inputs``.

    At initialisation, running statistics are (0, 1): a network whose weights are 90% pruned then loses its
    signal layer after layer in eval, and outputs that no longer depend on the input would hide a random
    (dropout) or wrong (fold) eval forward."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: after one batch, that batch's statistics
    if norms:
        _forward(model.train(), inputs)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()


def _guard(problems: dict[str, list[str]], check: str, run: Callable[[], list[str]]) -> None:
    try:
        problems[check] = run()
    except Exception as exc:  # one check's crash must not hide the others
        problems[check] = [f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"]


def audit(model: nn.Module, inputs: Any, in_place: bool = False) -> dict[str, list[str]]:
    """Sparsify ``model`` (train mode, as built) at 90% and run every check; check -> disagreements.
    ``in_place``: with fxsparse.sparsify_ (the original is recorded on a copy first).

    Inputs given as a dict are passed to fxsparse.flops() as a dict, as its API for keyword inputs will
    take them."""
    problems: dict[str, list[str]] = {}
    original = (
        record(copy.deepcopy(model).eval(), inputs, keep_weights=True),
        record(copy.deepcopy(model).train(), inputs, keep_weights=True),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if in_place:
                fxsparse.sparsify_(model, METHOD, SPARSITY, fxsparse.Constant())
                sparse = model
            else:
                sparse = fxsparse.sparsify(model, METHOD, SPARSITY, fxsparse.Constant())
        except Exception as exc:
            return {check: [f"sparsify raised {type(exc).__name__}: {exc}"] for check in CHECKS}
    warned = "\n".join(str(w.message) for w in caught)
    _calibrate_batchnorm(sparse, inputs)
    truth = record(sparse, inputs, keep_weights=True)
    train_truth = record(copy.deepcopy(sparse).train(), inputs, keep_weights=True)
    opaque = sorted(set(truth.opaque + train_truth.opaque + original[0].opaque))
    if opaque:
        problems["recorder"] = [f"fused ops hide products from the recorder: {opaque}"]
    _guard(problems, "forward", lambda: check_forward(original, (truth, train_truth)))
    _guard(problems, "flops", lambda: check_flops(fxsparse.flops(sparse, inputs), truth))
    _guard(problems, "pool", lambda: check_pool(sparse, (truth, train_truth), original, warned))
    folded: list[tuple[nn.Module, Truth]] = []

    def fold() -> list[str]:
        model = fxsparse.fold(sparse).eval()
        folded.append((model, record(model, inputs, keep_weights=True)))
        return check_fold(truth, folded[0][1], lambda: _forward(sparse, inputs), original[0])

    _guard(problems, "fold", fold)
    if folded:
        _guard(problems, "flops-folded", lambda: check_flops(fxsparse.flops(folded[0][0], inputs), folded[0][1]))
    else:
        problems["flops-folded"] = ["not run: fold failed"]
    return problems


def failures(problems: dict[str, list[str]]) -> str:
    lines = []
    for check, found in problems.items():
        if found:
            lines.append(
                f"[{check}] "
                + "; ".join(found[:SHOWN])
                + (f"; ... {len(found) - SHOWN} more" if len(found) > SHOWN else "")
            )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# the zoo (slow) and tiny cases (default suite)
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("entry", ZOO, ids=str)
def test_zoo_model_agrees_with_the_truth(entry):
    if entry.name.startswith("hf/"):
        pytest.importorskip("transformers")
    torch.manual_seed(0)
    problems = audit(*entry.build())
    assert not failures(problems), failures(problems)


class _TinyConvNet(nn.Module):
    """Conv, grouped and depthwise convs, a linear head: the plain case."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.depthwise(F.relu(self.grouped(x))))
        return self.head(x.mean((2, 3)))


class _TinyAttention(nn.Module):
    """A pre-norm attention block on tokens: linears on 3-d inputs, q @ k^T and attn @ v, an MLP."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = self.embed(x)
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        attention = (q @ k.transpose(-2, -1) / 4.0).softmax(-1)
        x = x + self.proj(attention @ v)
        return x + self.mlp(self.norm(x))


class _TiedLanguageModel(nn.Module):
    """An LM head tied to its input embedding (left dense by default, with a warning) whose padding row is
    zero: the weight left dense has real zeros, which the reports must count."""

    def __init__(self, vocab: int = 12, dim: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        x = self.embed(tokens)
        return self.head(x + self.mlp(x))


def _channels_last() -> tuple[nn.Module, Tensor]:
    model = _TinyConvNet().to(memory_format=torch.channels_last)
    return model, torch.randn(2, 3, 12, 12).contiguous(memory_format=torch.channels_last)


_TINY = {
    "convnet": lambda: (_TinyConvNet(), torch.randn(2, 3, 12, 12)),
    "attention": lambda: (_TinyAttention(), torch.randn(2, 5, 6)),
    "channels-last": _channels_last,
    "tied-lm-head": lambda: (_TiedLanguageModel(), torch.randint(0, 12, (2, 7))),
    "moe-experts": lambda: ZOO_BY_NAME["hf/mixtral-moe"].build(),  # transformers' 3-D expert stacks, grouped_mm
}


@pytest.mark.parametrize("in_place", [False, True], ids=["sparsify", "sparsify_"])
@pytest.mark.parametrize("name", list(_TINY))
def test_tiny_model_agrees_with_the_truth(name, in_place):
    """The zoo's checks on tiny models, also for what the zoo does not cover: sparsify_ in place, a
    channels_last model, a weight left dense with real zeros, a mixture-of-experts model."""
    if name.startswith("moe"):
        pytest.importorskip("transformers")
        torch.manual_seed(0)
    problems = audit(*_TINY[name](), in_place=in_place)
    assert not failures(problems), failures(problems)


def test_every_weight_tied_with_tau_is_pruned_and_the_check_counts_it():
    """Weights on a grid of 1/64: many fp32 scores tie with tau, and all of them are zeros (more than
    floor((N-1) q) + 1); the pool check holds fxsparse to exactly that."""
    torch.manual_seed(0)
    model, x = _TinyConvNet(), torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.copy_((module.weight * 64).round() / 64)
    problems = audit(copy.deepcopy(model), x)
    assert not failures(problems), failures(problems)
    sparse = fxsparse.sparsify(model, METHOD, SPARSITY)
    original = record(model.eval(), x, keep_weights=True)
    scores = np.concatenate(
        [rule_scores(op.weight, tuple(original.names.parameter(op.param).shape)) for op in original.weight_ops]
    )
    floor_rank = math.floor((scores.size - 1) * SPARSITY) + 1
    zeros = sum(op.zeros for op in record(sparse.eval(), x).weight_ops)
    assert zeros > floor_rank


def test_checks_catch_a_report_that_lies(monkeypatch):
    model, x = _TinyConvNet(), torch.randn(2, 3, 12, 12)
    original = record(copy.deepcopy(model).eval(), x, keep_weights=True)
    sparse = fxsparse.sparsify(model, METHOD, SPARSITY).eval()
    truth = record(sparse, x, keep_weights=True)
    report = fxsparse.flops(sparse, x)
    assert check_flops(report, truth) == []
    report.rows[0].sparse_macs += 1
    del report.rows[1]
    found = check_flops(report, truth)
    assert any(p.startswith("stem.weight: claimed dense") for p in found)
    assert any(p.startswith("grouped.weight: multiplied") for p in found)
    assert any(p.startswith("total weight sparse MACs") for p in found)
    assert check_pool(sparse, (truth, truth), (original, original), warned="") == []
    # one weight too many pruned (a tie at tau mishandled): the total is one off, and where
    head = next(op for op in truth.weight_ops if op.param == "head.weight")
    head.weight[torch.unravel_index(head.weight.abs().argmax(), head.weight.shape)] = 0.0
    head.nonzeros -= 1
    found = check_pool(sparse, (truth, truth), (original, original), warned="")
    assert any(p.startswith("the pooled operands multiplied have") for p in found)
    assert any(p.startswith("head.weight: ") and "(1 positions differ)" in p for p in found)
    lie = dict(fxsparse.layer_densities(sparse), **{"head.weight": (80, 80)})
    monkeypatch.setattr(fxsparse, "layer_densities", lambda m: lie)
    found = check_pool(sparse, (truth, truth), (original, original), warned="")
    assert any(p.startswith("head.weight: layer_densities says 80/80") for p in found)


def test_zoo_has_sixty_models_across_three_libraries():
    libraries = {entry.name.split("/")[0] for entry in ZOO}
    assert len(ZOO) >= 60 and libraries == {"timm", "tv", "hf"}
    assert len(ZOO_BY_NAME) == len(ZOO)


# ------------------------------------------------------------------------------------------------
# the recorder itself (default suite)
# ------------------------------------------------------------------------------------------------
def test_recorder_totals_equal_torch_flop_counter():
    """Independent of the taint: every product is found, with FlopCounterMode's count (FLOPs = 2 x MACs)."""
    from torch.utils.flop_counter import FlopCounterMode

    class Sdpa(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.out = nn.Linear(8, 24), nn.ConvTranspose1d(8, 4, 3, stride=2)

        def forward(self, x):
            q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            return self.out(y.transpose(1, 2))

    from torch.nn.attention import SDPBackend, sdpa_kernel

    for model, x in (
        (_TinyConvNet().eval(), torch.randn(2, 3, 12, 12)),
        (_TinyAttention(), torch.randn(2, 5, 6)),
        (Sdpa(), torch.randn(2, 7, 8)),
    ):
        with sdpa_kernel(SDPBackend.MATH):  # FlopCounterMode does not count the fused CPU attention op
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                model(x)
            decomposed = record(model, x)
        assert 2 * sum(op.dense_macs for op in decomposed.ops) == counter.get_total_flops()
        fused = record(model, x)  # the fused attention op counts what its decomposition counts
        assert sum(op.dense_macs for op in fused.ops) == sum(op.dense_macs for op in decomposed.ops)
    assert [op.op for op in fused.ops] == ["mm", "sdpa", "conv_transpose1d"]


def test_recorder_names_the_operand_each_op_multiplies():
    """A linear's W^T view, a standardized conv weight, a tied weight used twice, activations written into a
    constant buffer, attention (activation x activation) and a product of constants."""

    class Edge(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, bias=False)
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight
            self.register_buffer("table", torch.arange(6.0).view(2, 3))

        def forward(self, x):
            w = self.conv.weight
            w = (w - w.mean((1, 2, 3), keepdim=True)) / w.std((1, 2, 3), keepdim=True)  # weight standardization
            h = F.conv2d(x, w).mean((2, 3))  # (2, 4)
            padded = torch.zeros(2, 3, 4)
            padded[:, :2] = torch.stack([h, h], 1)  # activations written into a constant tensor
            tokens = self.b(self.a(padded))
            attention = tokens @ tokens.transpose(1, 2)
            constant = self.table @ self.table.t()
            return attention.sum() + constant.sum()

    model = Edge()
    with torch.no_grad():
        model.a.weight[0] = 0.0
    truth = record(model, torch.randn(2, 3, 6, 6))
    assert [(op.op, op.kind, op.param) for op in truth.ops] == [
        ("conv2d", "weight", "conv.weight"),
        ("mm", "weight", "a.weight"),
        ("mm", "weight", "a.weight"),
        ("bmm", "activation", None),
        ("mm", "constant", None),
    ]
    conv, linear = truth.ops[0], truth.ops[1]
    assert conv.dense_macs == 2 * 4 * 3 * 9 * 16 and conv.nonzeros == 108
    assert linear.weight_shape == (4, 4) and linear.zeros == 4 and linear.dense_macs == 6 * 4 * 4
    assert truth.uses()["a.weight"] == 2 and truth.tied() == {"a.weight": ["a.weight", "b.weight"]}
    assert truth.names.resolve("b.weight") == "a.weight"


# ------------------------------------------------------------------------------------------------
# python tests/test_truth.py [name ...]: the per-model table
# ------------------------------------------------------------------------------------------------
def main(names: list[str]) -> None:
    from tabulate import tabulate

    torch.set_num_threads(1)
    rows = []
    for entry in [ZOO_BY_NAME[n] for n in names] if names else ZOO:
        torch.manual_seed(0)
        start = time.perf_counter()
        try:
            problems = audit(*entry.build())
        except Exception as exc:  # a broken zoo entry (build or recording): name it and go on
            problems = {"forward": [f"the audit raised {type(exc).__name__}: {exc}"]}
        seconds = time.perf_counter() - start
        cells = ["ok" if not problems.get(c) else problems[c][0][:120] for c in CHECKS]
        rows.append([entry.name, *cells, f"{seconds:.1f}"])
        print(entry.name, "PASS" if not failures(problems) else "FAIL\n" + failures(problems), flush=True)
    print(tabulate(rows, ["model", *CHECKS, "s"], tablefmt="github"))


if __name__ == "__main__":
    main(sys.argv[1:])
