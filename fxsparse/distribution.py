"""Where the zeros go: per-layer sparsity targets for the pool (docs/METHODS.md sec. 8).

``distribution="global"`` (the default) sets no per-layer target: one threshold over the whole pool decides
how much of each layer is kept. Every other distribution fixes, once, how many weights each pooled layer
prunes at the final sparsity, so that the pool's total is exactly ``round(sparsity * N)``:

* ``"uniform"``: every layer at the target sparsity;
* ``"erk"``: Erdos-Renyi-Kernel (Evci et al., "Rigging the Lottery", ICML 2020, sec. 3): layer density
  proportional to sum(dims) / prod(dims) of the weight, a layer that would exceed density 1 kept dense and
  the others rescaled;
* a mapping {glob pattern on the weight's name: sparsity}: matched layers at their sparsity (the first
  matching pattern wins), the remaining layers sharing what is left of the budget at one sparsity.

With ``"global"`` the caps keep the one global ranking: one shared threshold over the layers it leaves within
their bounds, the others held at their bound, the pool's total still exact (`GlobalCaps`). For the other
distributions ``min_layer_sparsity`` / ``max_layer_sparsity`` bound every layer the mapping does not fix; the
densities are then clamp(eps * a_l, 1 - max, 1 - min) with one eps for the pool (a_l = 1 uniform, sum(dims) /
prod(dims) for ERK), so the capped layers' excess is redistributed over the others in proportion to a_l.
Real-valued kept counts become whole ones by largest remainders (each layer within one weight of its real share).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

from .methods.st3 import shape_sum

DistributionSpec = str | Mapping[str, float]
NAMES = ("global", "uniform", "erk")

__all__ = [
    "DistributionSpec",
    "GlobalCaps",
    "LayerTargets",
    "check_spec",
    "count_quantile",
    "erk_scale",
    "layer_targets",
    "parse_distribution",
    "pruned_count",
]


def erk_scale(shape: Sequence[int]) -> float:
    """ERK's raw density of a weight: sum(dims) / prod(dims) (RigL's erdos_renyi_kernel, power 1).

    The sum of dims is ST-3-sigma's S_l (one definition: `shape_sum`)."""
    return shape_sum(tuple(shape)) / math.prod(shape)


@dataclasses.dataclass(frozen=True)
class LayerTargets:
    """The resolved distribution: how many weights each pooled layer prunes at the final sparsity."""

    name: str  # "uniform", "erk" or "mapping"
    names: tuple[str, ...]  # pooled weights' fqns, in pool order
    numels: tuple[int, ...]
    pruned: tuple[int, ...]  # per layer, at the final sparsity
    patterns: tuple[tuple[str, float], ...] = ()
    min_layer_sparsity: float | None = None
    max_layer_sparsity: float | None = None

    @property
    def sparsities(self) -> tuple[float, ...]:
        """Each layer's final target sparsity, pruned / numel."""
        return tuple(k / n for k, n in zip(self.pruned, self.numels))

    def quantiles(self) -> tuple[float, ...]:
        """The quantile q_l each layer's threshold is taken at for its final target: (k - 1 + 1/16) / (n - 1), so
        that h = (n - 1) q_l has floor k - 1 and fraction 1/16 whatever the rounding: tau_l = x_(k-1) + (x_(k) -
        x_(k-1)) / 16 lies in [x_(k-1), x_(k)) even for adjacent fp32 values, and exactly k weights are pruned
        when the scores are distinct (0: prune nothing; 1: prune all)."""
        return tuple(count_quantile(k, n) for k, n in zip(self.pruned, self.numels))

    def describe(self) -> dict[str, Any]:
        """A JSON-ready record (FLOP report, CSR metadata, layer_densities)."""
        record: dict[str, Any] = {"name": self.name}
        if self.patterns:
            record["patterns"] = dict(self.patterns)
        if self.min_layer_sparsity is not None:
            record["min_layer_sparsity"] = self.min_layer_sparsity
        if self.max_layer_sparsity is not None:
            record["max_layer_sparsity"] = self.max_layer_sparsity
        record["layer_targets"] = {name: k / n for name, k, n in zip(self.names, self.pruned, self.numels)}
        return record


@dataclasses.dataclass(frozen=True)
class GlobalCaps:
    """``distribution="global"`` with min_layer_sparsity / max_layer_sparsity: one global ranking whose layers are
    kept within their bounds (METHODS.md sec. 8). The bounds ramp with the schedule, as every target does: at a
    scheduled sparsity s(t) = schedule(t, q), layer l prunes between ceil(schedule(t, min) * n_l) and
    floor(schedule(t, max) * n_l) weights, and the pool round(s(t) * N)."""

    names: tuple[str, ...]
    numels: tuple[int, ...]
    min_layer_sparsity: float | None = None
    max_layer_sparsity: float | None = None
    name: str = "global"

    def counts(self, sparsity: float, low: float | None, high: float | None) -> tuple[int, list[int], list[int]]:
        """(pruned in the pool, per-layer least, per-layer most) at pool sparsity ``sparsity`` and bounds
        ``low`` / ``high`` (the scheduled caps; None: unbounded)."""
        lows = [math.ceil(Fraction(low) * n) if low is not None else 0 for n in self.numels]
        highs = [math.floor(Fraction(high) * n) if high is not None else n for n in self.numels]
        return pruned_count(sparsity, sum(self.numels)), lows, highs

    def bounds(self) -> tuple[float | None, float | None]:
        """(min_layer_sparsity, max_layer_sparsity) at the final sparsity."""
        return self.min_layer_sparsity, self.max_layer_sparsity

    def describe(self) -> dict[str, Any]:
        """A JSON-ready record (FLOP report, CSR metadata, layer_densities)."""
        record: dict[str, Any] = {"name": self.name}
        if self.min_layer_sparsity is not None:
            record["min_layer_sparsity"] = self.min_layer_sparsity
        if self.max_layer_sparsity is not None:
            record["max_layer_sparsity"] = self.max_layer_sparsity
        return record


def pruned_count(sparsity: float, total: int) -> int:
    """The pool's pruned weights at ``sparsity``: round(sparsity * total), halves up, in exact arithmetic."""
    return math.floor(Fraction(sparsity) * total + Fraction(1, 2))


def count_quantile(pruned: int, numel: int) -> float:
    """The quantile at which ``numel`` distinct scores prune exactly ``pruned`` (see `LayerTargets.quantiles`)."""
    if pruned <= 0:
        return 0.0
    if pruned >= numel:
        return 1.0
    return (pruned - 1 + 1 / 16) / (numel - 1)


def parse_distribution(text: str) -> DistributionSpec:
    """The command line's and TOML's form: "global", "uniform", "erk", or "pattern=sparsity,pattern=sparsity"."""
    if "=" not in text:
        return text
    mapping: dict[str, float] = {}
    for item in text.split(","):
        pattern, sep, value = item.strip().rpartition("=")
        try:
            mapping[pattern.strip()] = float(value)
        except ValueError:
            pattern = ""
        if not sep or not pattern.strip():
            raise ValueError(
                f"distribution {text!r}: write global, uniform, erk, or glob=sparsity pairs separated by commas "
                "(e.g. 'conv1.*=0.5,fc.*=0.8')"
            )
    return mapping


def _check_fraction(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} must be a sparsity in [0, 1], got {value!r}")
    return float(value)


def check_spec(
    distribution: Any, min_layer_sparsity: Any = None, max_layer_sparsity: Any = None
) -> tuple[str | dict[str, float], float | None, float | None]:
    """Validate sparsify()'s distribution arguments (before any work): (spec, min, max)."""
    if isinstance(distribution, str):
        if distribution.lower() not in NAMES:
            raise ValueError(
                f"unknown distribution {distribution!r}; use 'global', 'uniform', 'erk' or a mapping "
                "{glob pattern: sparsity}"
            )
        spec: str | dict[str, float] = distribution.lower()
    elif isinstance(distribution, Mapping):
        if not distribution:
            raise ValueError("distribution mapping is empty; give {glob pattern: sparsity}, e.g. {'fc.*': 0.5}")
        spec = {}
        for pattern, value in distribution.items():
            if not isinstance(pattern, str):
                raise TypeError(f"distribution keys are glob patterns on weight names, got {pattern!r}")
            spec[pattern] = _check_fraction(value, f"distribution[{pattern!r}]")
    else:
        raise TypeError(f"distribution must be 'global', 'uniform', 'erk' or a mapping, got {distribution!r}")
    low = None if min_layer_sparsity is None else _check_fraction(min_layer_sparsity, "min_layer_sparsity")
    high = None if max_layer_sparsity is None else _check_fraction(max_layer_sparsity, "max_layer_sparsity")
    if low is not None and high is not None and low > high:
        raise ValueError(f"min_layer_sparsity={low} is above max_layer_sparsity={high}")
    return spec, low, high


def layer_targets(
    names: Sequence[str],
    shapes: Sequence[Sequence[int]],
    sparsity: float,
    distribution: DistributionSpec,
    min_layer_sparsity: float | None = None,
    max_layer_sparsity: float | None = None,
) -> LayerTargets | GlobalCaps | None:
    """Pruned weights per layer for the pool (``names``/``shapes`` in pool order); None for "global", `GlobalCaps`
    for "global" with caps (checked feasible at the final sparsity)."""
    spec, low, high = check_spec(distribution, min_layer_sparsity, max_layer_sparsity)
    numels = [math.prod(shape) for shape in shapes]
    total = sum(numels)
    if spec == "global":
        if low is None and high is None:
            return None
        caps = GlobalCaps(tuple(names), tuple(numels), low, high)
        pruned_total, lows, highs = caps.counts(sparsity, low, high)
        if not sum(lows) <= pruned_total <= sum(highs):
            kept, least, most = total - pruned_total, total - sum(highs), total - sum(lows)
            _infeasible(kept, least, most, low, high, sparsity, total, False, False)
        return caps
    pruned_total = pruned_count(sparsity, total)
    fixed: dict[int, int] = {}
    patterns: tuple[tuple[str, float], ...] = ()
    if isinstance(spec, dict):
        patterns = tuple(spec.items())
        for pattern, _ in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                examples = ", ".join(repr(n) for n in list(names)[:3])
                raise ValueError(
                    f"distribution pattern {pattern!r} matches no pooled weight; names look like {examples}"
                )
        for i, name in enumerate(names):
            value = next((v for p, v in patterns if fnmatch.fnmatchcase(name, p)), None)
            if value is not None:
                fixed[i] = math.floor(Fraction(value) * numels[i] + Fraction(1, 2))
    free = [i for i in range(len(numels)) if i not in fixed]
    if spec == "erk":
        scale = [erk_scale(shape) for shape in shapes]
    else:
        scale = [1.0] * len(numels)
    kept_budget = total - pruned_total - sum(numels[i] - k for i, k in fixed.items())
    kept = _share(
        [numels[i] for i in free], [scale[i] for i in free], kept_budget, low, high, sparsity, total, bool(fixed)
    )
    pruned = [0] * len(numels)
    for i, k in fixed.items():
        pruned[i] = k
    for i, k in zip(free, kept):
        pruned[i] = numels[i] - k
    return LayerTargets(
        name="mapping" if isinstance(spec, dict) else spec,
        names=tuple(names),
        numels=tuple(numels),
        pruned=tuple(pruned),
        patterns=patterns,
        min_layer_sparsity=low,
        max_layer_sparsity=high,
    )


def _share(
    numels: list[int],
    scale: list[float],
    kept: int,
    low: float | None,
    high: float | None,
    sparsity: float,
    total: int,
    mapping: bool,
) -> list[int]:
    """Whole kept counts per free layer, summing to ``kept``: density clamp(eps * scale, lo, hi), one eps."""
    lo_kept = [math.ceil((1 - Fraction(high)) * n) if high is not None else 0 for n in numels]
    hi_kept = [math.floor((1 - Fraction(low)) * n) if low is not None else n for n in numels]
    least, most = sum(lo_kept), sum(hi_kept)
    if not least <= kept <= most:
        _infeasible(kept, least, most, low, high, sparsity, total, mapping, not numels)
    if not numels:
        return []
    lo_d = [k / n for k, n in zip(lo_kept, numels)]
    hi_d = [k / n for k, n in zip(hi_kept, numels)]

    def kept_at(eps: float) -> float:
        return sum(n * min(max(eps * a, lo), hi) for n, a, lo, hi in zip(numels, scale, lo_d, hi_d))

    a_lo, a_hi = 0.0, max(hi / a for hi, a in zip(hi_d, scale))
    for _ in range(200):  # bisection: kept_at is continuous and non-decreasing in eps
        mid = (a_lo + a_hi) / 2
        if kept_at(mid) < kept:
            a_lo = mid
        else:
            a_hi = mid
    real = [n * min(max(a_hi * a, lo), hi) for n, a, lo, hi in zip(numels, scale, lo_d, hi_d)]
    whole = [min(max(math.floor(x), lo), hi) for x, lo, hi in zip(real, lo_kept, hi_kept)]
    # largest remainders: hand the missing (or surplus) weights to the layers with the largest (smallest) fractions
    missing = kept - sum(whole)
    order = sorted(range(len(real)), key=lambda i: real[i] - whole[i], reverse=missing > 0)
    while missing:
        moved = False
        for i in order:
            if missing > 0 and whole[i] < hi_kept[i]:
                whole[i], missing, moved = whole[i] + 1, missing - 1, True
            elif missing < 0 and whole[i] > lo_kept[i]:
                whole[i], missing, moved = whole[i] - 1, missing + 1, True
            if not missing:
                break
        if not moved:  # pragma: no cover - excluded by the feasibility check above
            raise AssertionError("fxsparse: could not apportion the kept weights")
    return whole


def _infeasible(kept, least, most, low, high, sparsity, total, mapping, no_free) -> None:
    if no_free:
        raise ValueError(
            f"the distribution mapping fixes every pooled layer, and its targets miss sparsity={sparsity} by "
            f"{abs(kept)} weights ({abs(kept) / total:.4%} of the pool); leave some layers unmatched to absorb the "
            "rest, or set sparsity to the mapping's overall sparsity"
        )
    if kept < least:
        by, causes = least - kept, ["the mapping's fixed layers"] if mapping else []
        causes += [f"max_layer_sparsity={high}"] if high is not None else []
        advice = "raise max_layer_sparsity" + (", lower the mapping's sparsities" if mapping else "")
        advice += " or lower sparsity"
        what = "keep"
    else:
        by, causes = kept - most, ["the mapping's fixed layers"] if mapping else []
        causes += [f"min_layer_sparsity={low}"] if low is not None else []
        advice = "lower min_layer_sparsity" + (", raise the mapping's sparsities" if mapping else "")
        advice += " or raise sparsity"
        what = "prune"
    raise ValueError(
        f"infeasible: with {' and '.join(causes)} the layers {what} more weights than sparsity={sparsity} allows: "
        f"the target is missed by {by} weights ({by / total:.4%} of the pool); {advice}"
    )
