"""The exact global threshold: the linearly interpolated q-quantile of every score in the pool.

Both papers (ST-3 Sec. 3, Feather Sec. 3.2) rank all sparsified weights of the model together and
threshold at the quantile that gives the requested sparsity, with numpy's "linear" interpolation
(Hyndman & Fan 1996, definition 7: position (N-1)*q between the two neighbouring order statistics).
Scores and tau are always fp32.

`global_quantile` finds the two order statistics without concatenating or sorting the pool:

* window selection (CPU): one pass counts the scores below a window [a, b] and gathers the few
  scores inside it; `torch.kthvalue` on the window gives the ranks. The window comes from ``hint``
  (the previous tau: tau moves little per training step) or, cold, from a systematic sample of the
  pool. A window that misses the ranks or holds too many scores falls back to:
* radix selection (CUDA, and the CPU fallback): scores map to int32 keys in float order; a
  65536-bin histogram of the top 16 key bits over the pool, then one of the low 16 bits inside the
  selected bin(s), gives the exact keys of both ranks. Two passes, no data-dependent shapes, one host
  sync, and the histograms add up across ranks with all_reduce.

`layer_quantiles` takes one exact quantile per layer in the same way, every layer in the same pass: each chunk
(of one layer) is compared with that layer's window, then a small selection per layer follows.
`capped_threshold` is the shared threshold of a global ranking whose layers have bounds on their pruned counts
(the global distribution with caps): a window pass around the previous one, radix selection as the fallback.

Every pass walks the pool chunk by chunk; the extra memory stays within about 8% of the pool's bytes
(see `_budget`), plus one layer's scores when ``score_fn`` is not elementwise. The result is exact
whichever path runs: a window only decides how much work is done, never the value.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

ScoreFn = Callable[[int, Tensor], Tensor]

__all__ = [
    "ScoreFn",
    "capped_threshold",
    "global_quantile",
    "layer_quantiles",
    "layer_scaled_abs",
    "lerp_like_numpy",
    "quantile_position",
    "reference_quantile",
]


def _abs_score(index: int, tensor: Tensor) -> Tensor:
    return tensor.detach().abs().float()


def _abs_into(index: int, piece: Tensor, out: Tensor) -> Tensor:
    """_abs_score(index, piece) written into the fp32 buffer ``out`` (no allocation per chunk)."""
    if piece.dtype == torch.float32:
        return torch.abs(piece, out=out)
    return out.copy_(piece).abs_()  # rounding to fp32 commutes with abs


# ``elementwise = True`` promises that score_fn(i, x) scores each entry of x on its own (it may
# depend on the layer index i, not on x's shape), so the pool can be scored slice by slice.
_abs_score.elementwise = True  # type: ignore[attr-defined]
_abs_score.score_into = _abs_into  # type: ignore[attr-defined]


def layer_scaled_abs(scales: Sequence[float]) -> ScoreFn:
    """Score |w| * scales[l] in fp32 (ST-3-sigma: scales[l] = sqrt(S_l)), marked elementwise."""
    factors = [float(s) for s in scales]

    def score(index: int, tensor: Tensor) -> Tensor:
        return tensor.detach().abs().float() * factors[index]

    def score_into(index: int, piece: Tensor, out: Tensor) -> Tensor:
        return _abs_into(index, piece, out).mul_(factors[index])

    score.elementwise = True  # type: ignore[attr-defined]
    score.score_into = score_into  # type: ignore[attr-defined]
    return score


def lerp_like_numpy(low: Tensor, high: Tensor, frac: float) -> Tensor:
    """numpy's _lerp: a + (b-a)*t, computed from the upper end when t >= 0.5 (monotone, exact at ends)."""
    diff = high - low
    if frac >= 0.5:
        return high - diff * (1.0 - frac)
    return low + diff * frac


def quantile_position(count: int, q: float) -> tuple[int, int, float]:
    """0-based ranks of the two order statistics around quantile q of ``count`` values, and the weight."""
    position = (count - 1) * q
    low = int(position // 1)
    low = min(max(low, 0), count - 1)
    high = min(low + 1, count - 1)
    return low, high, position - low


def reference_quantile(tensors: Sequence[Tensor], q: float, score_fn: ScoreFn = _abs_score) -> Tensor:
    """Sort-and-interpolate on the concatenated scores: what the reference code does (slow, 2x memory)."""
    scores = torch.cat([score_fn(i, t).reshape(-1) for i, t in enumerate(tensors)])
    ordered, _ = torch.sort(scores)
    low, high, frac = quantile_position(ordered.numel(), q)
    return lerp_like_numpy(ordered[low], ordered[high], frac)


def global_quantile(
    tensors: Sequence[Tensor],
    q: float,
    score_fn: ScoreFn = _abs_score,
    group: object | None = None,
    hint: float | None = None,
) -> Tensor:
    """Exact linearly interpolated q-quantile of ``score_fn(i, tensors[i])`` over all tensors, fp32 scalar.

    Bit-identical to `reference_quantile` and to ``numpy.quantile(scores, q, method="linear")``.
    ``score_fn`` maps (tensor index, tensor) to fp32 scores of the same numel; it is called lazily
    (possibly more than once per tensor), so at most one layer's scores are alive at a time, and only
    a slice of them when ``score_fn.elementwise`` is true (as for the default |w|, see
    `layer_scaled_abs`). ``group``: a torch.distributed process group whose ranks each hold a shard of
    the pool (any split, even inside a layer); every rank gets the quantile of the union. ``hint``: a
    value near the answer, typically the previous step's tau: a window around it is tried first (one
    pass); a wrong hint costs one more pass and never changes the result. Pass the same hint on every
    rank; CUDA pools ignore it. On CPU the call runs on the calling thread (intra-op threads are set
    to 1 for its duration, then restored). Raises ValueError for q outside [0, 1], an empty pool, or
    a NaN/Inf score.
    """
    return _global_quantile(tensors, q, score_fn, group, hint)


def layer_quantiles(
    tensors: Sequence[Tensor],
    qs: Sequence[float],
    score_fn: ScoreFn = _abs_score,
    group: object | None = None,
    hints: Sequence[float | None] | None = None,
) -> Tensor:
    """One exact quantile per tensor: entry l is `global_quantile` of ``score_fn(l, tensors[l])`` alone at
    ``qs[l]`` (bit-identical to numpy's "linear" quantile of that layer's scores), and 0 where ``qs[l] <= 0``
    (prune nothing). fp32, shape (len(tensors),). ``hints[l]`` (the previous tau_l) narrows layer l's
    window as in `global_quantile`; ``group`` as there (every rank passes the same qs and hints).

    On CPU every layer is selected in the same pass over the pool: each chunk (of one layer) is compared with
    that layer's window, and a small selection per layer follows; layers whose window missed get a second
    pass, then radix selection, as in `global_quantile`."""
    if len(qs) != len(tensors):
        raise ValueError(f"layer_quantiles: {len(qs)} sparsities for {len(tensors)} tensors")
    if hints is not None and len(hints) != len(tensors):
        raise ValueError(f"layer_quantiles: {len(hints)} hints for {len(tensors)} tensors")
    levels = [_check_q(q) if q > 0.0 else 0.0 for q in qs]
    pool = _Pool(tensors, score_fn)
    comm = _Comm(group, pool)
    out = torch.zeros(len(tensors), dtype=torch.float32, device=pool.device)
    active = [index for index, q in enumerate(levels) if q > 0.0]
    if not active:
        return out
    with torch.no_grad(), _one_thread(pool.device.type == "cpu"):
        sizes = comm.all_reduce(
            torch.tensor([[t.numel(), t.numel() * t.element_size()] for t in pool.tensors], dtype=torch.int64)
        ).tolist()
        for index in active:
            if sizes[index][0] == 0:
                raise ValueError(f"layer_quantiles: tensors[{index}] is empty; there is no quantile to take")
        ranks = {index: quantile_position(sizes[index][0], levels[index]) for index in active}
        found: dict[int, tuple[Tensor, Tensor]] = {}
        pool_bytes = sum(nbytes for _, nbytes in sizes)
        if pool.device.type == "cpu":
            pool.chunk, _ = _budget(pool_bytes, pool.device, "window")
            layer_hints = {i: None if hints is None or hints[i] is None else float(hints[i]) for i in active}
            found = _layer_window_select(pool, comm, active, sizes, levels, ranks, layer_hints)
        for index in active:
            if index not in found:  # window missed or overflowed: this layer alone, by radix selection
                layer = _Pool([pool.tensors[index]], _single_layer(score_fn, index))
                layer.chunk, _ = _budget(pool_bytes, layer.device, "radix")
                found[index] = _radix_select(layer, _Comm(group, layer), ranks[index][0], ranks[index][1])
        for index in active:
            lo, hi = found[index]
            out[index] = lerp_like_numpy(lo.to(pool.device), hi.to(pool.device), ranks[index][2])
    return out


def capped_threshold(
    tensors: Sequence[Tensor],
    lows: Sequence[int],
    highs: Sequence[int],
    count: int,
    score_fn: ScoreFn = _abs_score,
    group: object | None = None,
    hint: float | None = None,
    held: Mapping[int, tuple[float, float, bool]] | None = None,
) -> tuple[Tensor, list[int | None], dict[int, Tensor]]:
    """One shared threshold over a pool whose layers' pruned counts are bounded (docs/METHODS.md sec. 8, caps with
    the global distribution): the smallest score t with

        g(t) = sum_l clamp(c_l(t), lows[l], highs[l]) >= count,    c_l(t) = #{scores of layer l <= t},

    and each layer's c_l(t). A layer with lows[l] <= c_l(t) <= highs[l] prunes its scores <= t; the others are held
    at their bound (their own threshold, `layer_quantiles`). With distinct scores g(t) = count exactly: ``count``
    weights pruned in all. g(t) - sum(lows) counts the scores of layer l whose rank in the layer lies in
    (lows[l], highs[l]], so t is the (count - sum(lows))-th smallest of those, ties included.
    Needs sum(lows) < count <= sum(highs) (else ValueError). fp32 scalar t, like `global_quantile`; ``hint`` (the
    previous t) tries a window around it first (one pass), else exact radix selection on g (four passes of
    8-bit digits, per-layer histograms); ``group`` as there.

    ``held``: {layer: (q, its previous threshold, held at its maximum)} for the layers the previous step held at a
    bound, q the quantile of that bound (`layer_quantiles`' convention). In the same pass each is compared with a
    window around its own previous threshold instead of the shared one, which gives its own threshold at q
    (bitwise `layer_quantiles`' value; the third result) when the window holds it. A layer whose bound's order
    statistic lies beyond the shared window is held whatever t is: its count is returned as None; the others get
    one more pass over them with the shared window. Ignored on the radix path."""
    if not (len(lows) == len(highs) == len(tensors)):
        raise ValueError(f"capped_threshold: {len(lows)} lows and {len(highs)} highs for {len(tensors)} tensors")
    if not sum(lows) < count <= sum(highs):
        raise ValueError(
            f"capped_threshold: count={count} is outside (sum(lows), sum(highs)] = ({sum(lows)}, {sum(highs)}]"
        )
    pool = _Pool(tensors, score_fn)
    comm = _Comm(group, pool)
    with torch.no_grad(), _one_thread(pool.device.type == "cpu"):
        sizes = comm.all_reduce(
            torch.tensor([[t.numel(), t.numel() * t.element_size()] for t in pool.tensors], dtype=torch.int64)
        ).tolist()
        for index, ((n, _), low, high) in enumerate(zip(sizes, lows, highs)):
            if not 0 <= low <= high <= n:
                raise ValueError(f"capped_threshold: layer {index} has bounds [{low}, {high}] for {n} scores")
        pool_bytes = sum(nbytes for _, nbytes in sizes)
        found = None
        if pool.device.type == "cpu" and hint is not None and math.isfinite(hint):
            pool.chunk, _ = _budget(pool_bytes, pool.device, "window")
            bounds = _Bounds(list(lows), list(highs), count, sizes)
            found = _capped_window(pool, comm, bounds, float(hint), _usable_held(held, sizes))
        if found is None:
            pool.chunk, _ = _budget(pool_bytes, pool.device, "radix")
            tau, counts = _capped_radix(pool, comm, list(lows), list(highs), count)
            found = tau, counts, {}
        tau, counts, own = found
        return tau.to(pool.device), counts, {i: t.to(pool.device) for i, t in own.items()}


def _usable_held(held, sizes) -> dict[int, tuple[float, float, bool]]:
    """The held layers whose bound is strictly inside the layer (0 < q < 1) and whose previous threshold is finite."""
    usable = {}
    for index, (q, previous, at_max) in (held or {}).items():
        if 0.0 < q < 1.0 and previous is not None and math.isfinite(previous) and sizes[index][0] > 1:
            usable[index] = (_check_q(q), float(previous), bool(at_max))
    return usable


def _single_layer(score_fn: ScoreFn, index: int) -> ScoreFn:
    """score_fn seen from a pool of the one tensor ``index`` (its elementwise promise kept)."""

    def score(_: int, tensor: Tensor) -> Tensor:
        return score_fn(index, tensor)

    score.elementwise = getattr(score_fn, "elementwise", False)  # type: ignore[attr-defined]
    into = getattr(score_fn, "score_into", None)
    if into is not None:
        score.score_into = lambda _, piece, out: into(index, piece, out)  # type: ignore[attr-defined]
    return score


# ----------------------------------------------------------------------------------------------
# internals

_HALF = 1 << 16  # radix digit: 16 bits per histogram level
_SAMPLE_TARGET = 1 << 16  # scores in the systematic sample of a cold call
_HINT_WIDTH = 1.0 / 64  # window around a hint h: [h - |h|/64, h + |h|/64]
_SIGMAS = 6.0  # half-width of a sample window, in binomial standard deviations of the sample rank
_TINY = 1 << 14  # scores: below this the memory budget is a constant
_CPU_CHUNK = 1 << 16  # scores per chunk of a CPU window pass (cache-resident)


def _budget(pool_bytes: int, device: torch.device, strategy: str) -> tuple[int, int]:
    """(chunk, window cap) in scores, for extra memory within ~8% of the pool's bytes: a chunk's
    temporaries (< 24 bytes per score) take <= 3% while the window is gathered (4 bytes per score,
    <= 4%); selecting in the window holds it twice (<= 8%). Tiny pools get a constant ~1 MiB."""
    largest = _CPU_CHUNK if (strategy == "window" and device.type == "cpu") else 1 << 23
    chunk = max(_TINY, min(pool_bytes * 3 // 100 // 24, largest))
    cap = max(_TINY, pool_bytes // 100)
    return chunk, cap


def _sample_stride(n: int, pool_bytes: int) -> int:
    """Sample every stride-th score: about _SAMPLE_TARGET scores, and their 8 bytes each (the sample
    and kthvalue's copy) within 5% of the pool's bytes."""
    return max(16, -(-n // _SAMPLE_TARGET), -(-160 * n // max(pool_bytes, 1)))


@contextlib.contextmanager
def _one_thread(enabled: bool):
    """Run the CPU selection on the calling thread. Its ops are on cache-sized chunks, so intra-op
    threads gain nothing, while on a busy CPU every parallel region may wait a scheduler time slice
    for its workers (measured on a loaded 2-core box: kthvalue of 300K scores 16 ms with 2 threads,
    3 ms with 1). The caller's thread count is restored on exit."""
    threads = torch.get_num_threads()
    if not enabled or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _flat(t: Tensor) -> Tensor:
    """A 1-D view of t's elements in memory order (a copy only for overlapping or gappy layouts)."""
    if t.is_contiguous():
        return t.view(-1)
    order = sorted(range(t.dim()), key=lambda d: (t.stride(d), t.size(d)), reverse=True)
    permuted = t.permute(order)
    return permuted.view(-1) if permuted.is_contiguous() else t.reshape(-1)


def _fp32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def _empty_scores(device: torch.device) -> Tensor:
    return torch.empty(0, dtype=torch.float32, device=device)


class _Pool:
    """The local shard of the pool, scored chunk by chunk."""

    def __init__(self, tensors: Sequence[Tensor], score_fn: ScoreFn):
        self.tensors = list(tensors)
        for i, t in enumerate(self.tensors):
            if not isinstance(t, Tensor):
                raise TypeError(f"tensors[{i}] is a {type(t).__name__}, expected a torch.Tensor")
        self.score_fn = score_fn
        self.elementwise = bool(getattr(score_fn, "elementwise", False))
        self.numel = sum(t.numel() for t in self.tensors)
        self.nbytes = sum(t.numel() * t.element_size() for t in self.tensors)
        live = [t for t in self.tensors if t.numel()]
        self.device = live[0].device if live else torch.device("cpu")
        self.chunk = _TINY

    def chunks(self) -> Iterator[tuple[int, Tensor]]:
        """Yield (offset of the chunk in the local pool, its 1-D fp32 scores). The scores may live in
        a buffer that the next chunk overwrites: copy what must outlive the iteration."""
        offsets = self.offsets()
        for i, start, scores in self.layer_chunks():
            yield offsets[i] + start, scores

    def offsets(self) -> list[int]:
        """Offset of each local tensor in the local pool."""
        out, offset = [], 0
        for t in self.tensors:
            out.append(offset)
            offset += t.numel()
        return out

    def layer_chunks(self, layers: Sequence[int] | None = None) -> Iterator[tuple[int, int, Tensor]]:
        """Yield (tensor index, offset of the chunk in that tensor, its 1-D fp32 scores), over ``layers`` (default:
        all) in pool order; a chunk never spans two tensors. The buffer caveat of `chunks` applies."""
        step = self.chunk
        into = getattr(self.score_fn, "score_into", None) if self.elementwise else None
        buffer = torch.empty(step, dtype=torch.float32, device=self.device) if into is not None else None
        for i in range(len(self.tensors)) if layers is None else layers:
            t = self.tensors[i]
            n = t.numel()
            if n == 0:
                continue
            if self.elementwise:
                flat = _flat(t.detach())
                for start in range(0, n, step):
                    piece = flat[start : start + step]
                    if into is not None and piece.device == self.device:
                        yield i, start, into(i, piece, buffer[: piece.numel()])
                    else:
                        yield i, start, self._check(i, piece, self.score_fn(i, piece))
            else:
                scores = self._check(i, t, self.score_fn(i, t))
                for start in range(0, n, step):
                    yield i, start, scores[start : start + step]
                del scores

    def sample(self, stride: int) -> Tensor | None:
        """Scores of every stride-th entry of the local pool, scoring nothing else: only for an
        elementwise score_fn (else None: sampling costs a pass, see `_sample_pass`)."""
        if not self.elementwise:
            return None
        parts = [self.layer_sample(i, stride, offset) for i, offset in enumerate(self.offsets())]
        parts = [p for p in parts if p.numel()]
        return torch.cat(parts) if parts else _empty_scores(self.device)

    def layer_sample(self, i: int, stride: int, offset: int = 0) -> Tensor:
        """Scores of tensor i's entries at pool positions offset + j that are multiples of stride (elementwise)."""
        t = self.tensors[i]
        first = (-offset) % stride
        if first >= t.numel():
            return _empty_scores(self.device)
        piece = _flat(t.detach())[first::stride]
        return self._check(i, piece, self.score_fn(i, piece))

    def _check(self, i: int, given: Tensor, scores: Tensor) -> Tensor:
        if not isinstance(scores, Tensor) or scores.numel() != given.numel():
            got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(
                f"score_fn(index={i}) returned {got} for a tensor of shape "
                f"{tuple(given.shape)}; it must return one score per weight"
            )
        if scores.dtype != torch.float32:
            raise TypeError(
                f"score_fn(index={i}) returned {scores.dtype} scores; they must be "
                f"float32 (end the score function with .float())"
            )
        return scores.reshape(-1)

    def first_non_finite(self, layers: Sequence[int] | None = None) -> str | None:
        """Describe the first local layer (of ``layers``, default all) with a NaN/Inf score (slow: only after an
        alarm)."""
        for i, t in enumerate(self.tensors):
            if t.numel() == 0 or (layers is not None and i not in layers):
                continue
            scores = self._check(i, t, self.score_fn(i, t))
            finite = torch.isfinite(scores)
            if not bool(finite.all()):
                n_nan = int(torch.isnan(scores).sum())
                n_inf = int((~finite).sum()) - n_nan
                return (
                    f"layer index {i}, shape {tuple(t.shape)}, {t.dtype}: {n_nan} NaN and "
                    f"{n_inf} Inf scores out of {t.numel()}"
                )
        return None


def _non_finite_error(where: str) -> ValueError:
    return ValueError(
        f"non-finite weight in the sparsity pool ({where}), so the global threshold is undefined. "
        f"The weights diverged: fix the divergence or lower the learning rate (or clip gradients)."
    )


class _Comm:
    """The few collectives of a sharded pool; identities without a process group."""

    def __init__(self, group, pool: _Pool):
        self.group = group
        self.world = 1
        self.device = pool.device
        if group is not None:
            import torch.distributed as dist

            self.world = dist.get_world_size(group)
            if dist.get_backend(group) == "nccl":
                if pool.device.type != "cuda":
                    self.device = torch.device("cuda", torch.cuda.current_device())
            elif pool.device.type != "cpu":
                self.device = torch.device("cpu")

    def all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        if self.group is None:
            return t
        import torch.distributed as dist

        buf = t.to(self.device)
        dist.all_reduce(buf, op=getattr(dist.ReduceOp, op.upper()), group=self.group)
        return buf.to(t.device)

    def all_gather_rows(self, row: Tensor) -> Tensor:
        """One fixed-size 1-D row per rank -> a (world, len) tensor, in rank order."""
        if self.group is None:
            return row[None]
        import torch.distributed as dist

        rows = [torch.empty_like(row, device=self.device) for _ in range(self.world)]
        dist.all_gather(rows, row.to(self.device), group=self.group)
        return torch.stack(rows).to(row.device)

    def all_gather_cat(self, t: Tensor) -> Tensor:
        """Concatenation in rank order of every rank's 1-D tensor (lengths differ: padded)."""
        if self.group is None:
            return t
        import torch.distributed as dist

        lengths = [int(k) for k in self.all_gather_rows(torch.tensor([t.numel()], dtype=torch.int64))[:, 0]]
        if max(lengths) == 0:
            return t
        padded = torch.zeros(max(lengths), dtype=t.dtype, device=self.device)
        padded[: t.numel()] = t.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:k] for p, k in zip(parts, lengths)]).to(t.device)


def _raise_if_non_finite(
    pool: _Pool, local_alarm: bool, any_alarm: bool, comm: _Comm, layers: Sequence[int] | None = None
) -> None:
    """An alarm is a non-finite fp32 sum of a rank's scores (of ``layers``, default all): a NaN/Inf score, or
    (false alarm) huge finite scores overflowing the sum. A per-layer scan tells them apart; all ranks agree."""
    if not any_alarm:
        return
    found = pool.first_non_finite(layers) if local_alarm else None
    anywhere = comm.all_reduce(torch.tensor([int(found is not None)], dtype=torch.int64), "max")
    if found is not None:
        raise _non_finite_error(found)
    if bool(anywhere[0]):
        raise _non_finite_error("on another rank")


# -- window selection (CPU) ---------------------------------------------------------------------


def _sample_pass(pool: _Pool, comm: _Comm, stride: int) -> Tensor:
    """For a score_fn that needs whole layers: the finiteness check and every stride-th score."""
    total = torch.zeros((), dtype=torch.float32, device=pool.device)
    parts: list[Tensor] = []
    for offset, s in pool.chunks():
        total += s.sum()  # NaN/Inf anywhere make it non-finite
        first = (-offset) % stride
        if first < s.numel():
            parts.append(s[first::stride].clone())
    alarm = not bool(torch.isfinite(total))
    _raise_if_non_finite(pool, alarm, bool(comm.all_reduce(torch.tensor([int(alarm)]), "max")[0]), comm)
    return comm.all_gather_cat(torch.cat(parts) if parts else _empty_scores(pool.device))


def _split_chunk(s: Tensor, a: float, b: float, gather: bool) -> tuple[int, int, Tensor | None]:
    """How many of the chunk's scores are < a and in [a, b], and (if ``gather`` and any) those in [a, b]. A chunk
    with none inside costs two comparisons and two counts; masked_select is about twice as fast as index_select on
    nonzero() when some are (it casts the mask to int64: 8 bytes per score of the chunk)."""
    lt = s < a
    n_lt = int(torch.count_nonzero(lt))
    mask = s <= b
    n_in = int(torch.count_nonzero(mask)) - n_lt
    if not gather or n_in == 0:
        return n_lt, n_in, None
    mask.logical_xor_(lt)  # a <= s <= b, as s < a implies s <= b
    return n_lt, n_in, s.masked_select(mask)


def _window_pass(
    pool: _Pool,
    comm: _Comm,
    a: float,
    b: float,
    cap: int,
    check_finite: bool,
    samples: list[Tensor] | None = None,
    stride: int = 0,
):
    """One pass: how many scores are < a and in [a, b] (fp32 bounds), and the scores in [a, b] when
    there are at most ``cap`` of them (else None). Global over ranks. Appends every stride-th score
    to ``samples`` if given. Reads counts on the host per chunk, so it is for CPU pools."""
    below = inside = 0
    parts: list[Tensor] = []
    overflow = False
    tie = a == b
    total = torch.zeros((), dtype=torch.float32, device=pool.device)
    for offset, s in pool.chunks():
        if check_finite:
            total += s.sum()  # NaN/Inf anywhere make it non-finite
        if samples is not None and (-offset) % stride < s.numel():
            samples.append(s[(-offset) % stride :: stride].clone())
        n_lt, n_in, window = _split_chunk(s, a, b, not (tie or overflow))
        below += n_lt
        inside += n_in
        if window is None:
            continue
        if inside > cap:
            overflow, parts = True, []
        else:
            parts.append(window)
    alarm = check_finite and not bool(torch.isfinite(total))
    row = torch.tensor([below, inside, float(overflow), float(alarm), a, b], dtype=torch.float64)
    rows = comm.all_gather_rows(row)
    _raise_if_non_finite(pool, alarm, bool(rows[:, 3].any()), comm)
    if not (bool((rows[:, 4] == a).all()) and bool((rows[:, 5] == b).all())):
        raise ValueError(
            "global_quantile: ranks passed different hints; pass the same hint (the previous tau) on every rank"
        )
    below, inside = int(rows[:, 0].sum()), int(rows[:, 1].sum())
    if tie or bool(rows[:, 2].any()) or inside > cap:
        return below, inside, None
    return below, inside, torch.cat(parts) if parts else _empty_scores(pool.device)


def _select_in_window(
    comm: _Comm, below: int, inside: int, window: Tensor | None, a: float, b: float, r_lo: int, r_hi: int
) -> tuple[Tensor, Tensor] | None:
    """The order statistics r_lo, r_hi if the window (this rank's part of it) holds them, else None.
    The decision rests on global counts, so every rank takes it alike."""
    if not _window_holds(below, inside, window, a, b, r_lo, r_hi):
        return None
    if a == b:
        value = torch.tensor(a, dtype=torch.float32)
        return value, value
    return _order_statistics(comm.all_gather_cat(window), below, r_lo, r_hi)


def _window_holds(below: int, inside: int, window: Tensor | None, a: float, b: float, r_lo: int, r_hi: int) -> bool:
    """True when ranks r_lo..r_hi lie in the window [a, b] and its scores are at hand (or all equal a == b)."""
    return below <= r_lo and r_hi < below + inside and (a == b or window is not None)


def _order_statistics(window: Tensor, below: int, r_lo: int, r_hi: int) -> tuple[Tensor, Tensor]:
    """Order statistics r_lo and r_hi (r_hi <= r_lo + 1) of the pool, from the whole window above ``below`` scores."""
    k = r_lo - below  # 0-based rank inside the window
    lo = torch.kthvalue(window, k + 1).values
    if r_hi == r_lo or int(torch.count_nonzero(window <= lo)) > k + 1:
        return lo, lo  # rank r_hi ties with r_lo
    return lo, torch.where(window > lo, window, math.inf).amin()  # the next larger score


def _window_from_sample(sample: Tensor, q: float) -> tuple[float, float]:
    """A window holding quantile q of the pool with overwhelming odds: the sample's order statistics
    _SIGMAS binomial standard deviations either side of q (open-ended at the extremes)."""
    m = sample.numel()
    if m == 0:
        return -math.inf, math.inf
    p = q * (m - 1)
    margin = int(_SIGMAS * math.sqrt(m * q * (1.0 - q))) + 8
    j_lo, j_hi = math.floor(p) - margin, math.ceil(p) + margin
    a = float(torch.kthvalue(sample, j_lo + 1).values) if j_lo >= 0 else -math.inf
    b = float(torch.kthvalue(sample, j_hi + 1).values) if j_hi < m else math.inf
    return a, b


def _window_select(
    pool: _Pool, comm: _Comm, n: int, nbytes: int, q: float, r_lo: int, r_hi: int, cap: int, hint: float | None
) -> tuple[Tensor, Tensor] | None:
    """Warm: one pass over a window around the hint. Cold, or a missed hint: a window from a sample
    (read off the raw weights when score_fn is elementwise, else one more pass), then one pass.
    None when the window missed or overflowed: the caller falls back to radix selection."""
    check_finite = True
    stride = _sample_stride(n, nbytes)
    samples: list[Tensor] | None = None
    if hint is not None and math.isfinite(hint):
        h = _fp32(hint)
        a, b = _fp32(h - abs(h) * _HINT_WIDTH), _fp32(h + abs(h) * _HINT_WIDTH)
        # a whole-layer score_fn cannot be sampled for free: sample on the way, in case the hint missed
        samples = None if pool.elementwise else []
        below, inside, window = _window_pass(pool, comm, a, b, cap, check_finite, samples, stride)
        found = _select_in_window(comm, below, inside, window, a, b, r_lo, r_hi)
        if found is not None:
            return found
        del window
        check_finite = False
    if samples is not None:
        sample = comm.all_gather_cat(torch.cat(samples) if samples else _empty_scores(pool.device))
    elif pool.elementwise:
        sample = comm.all_gather_cat(pool.sample(stride))
    else:
        sample = _sample_pass(pool, comm, stride)
        check_finite = False
    a, b = _window_from_sample(sample, q)
    del sample
    below, inside, window = _window_pass(pool, comm, a, b, cap, check_finite)
    return _select_in_window(comm, below, inside, window, a, b, r_lo, r_hi)


# -- window selection of every layer's quantile in one pass (CPU; layer_quantiles) -----------------


def _gather_per_layer(comm: _Comm, parts: list[Tensor]) -> list[Tensor]:
    """Every rank's parts[j] concatenated in rank order, for each j: three collectives whatever len(parts)."""
    if comm.group is None or not parts:
        return parts
    lengths = comm.all_gather_rows(torch.tensor([p.numel() for p in parts], dtype=torch.int64)).tolist()
    flat = comm.all_gather_cat(torch.cat(parts))
    pieces: list[list[Tensor]] = [[] for _ in parts]
    offset = 0
    for row in lengths:  # rank by rank, its parts in order
        for j, count in enumerate(row):
            pieces[j].append(flat[offset : offset + count])
            offset += count
    return [torch.cat(p) for p in pieces]


def _layer_window_pass(
    pool: _Pool,
    comm: _Comm,
    layers: list[int],
    bounds: dict[int, tuple[float, float]],
    caps: dict[int, int],
    check: set[int],
    samples: dict[int, list[Tensor]] | None = None,
    strides: dict[int, int] | None = None,
) -> dict[int, tuple[int, int, Tensor | None]]:
    """`_window_pass` for many layers at once: one pass over ``layers``, each chunk (of one layer l) compared with
    l's window bounds[l] = [a_l, b_l]. Returns l -> (scores < a_l, scores in the window, the window's scores or
    None past caps[l]), global over ranks. Checks the scores of the layers in ``check`` for NaN/Inf; appends
    every strides[l]-th score of layer l to samples[l] if given."""
    below = dict.fromkeys(layers, 0)
    inside = dict.fromkeys(layers, 0)
    parts: dict[int, list[Tensor]] = {i: [] for i in layers}
    overflow: set[int] = set()
    total = torch.zeros((), dtype=torch.float32, device=pool.device)
    for i, start, s in pool.layer_chunks(layers):
        if i in check:
            total += s.sum()  # NaN/Inf anywhere make it non-finite
        if samples is not None and i in samples and (-start) % strides[i] < s.numel():
            samples[i].append(s[(-start) % strides[i] :: strides[i]].clone())
        a, b = bounds[i]
        n_lt, n_in, window = _split_chunk(s, a, b, not (a == b or i in overflow))
        below[i] += n_lt
        inside[i] += n_in
        if window is None:
            continue
        if inside[i] > caps[i]:
            overflow.add(i)
            parts[i] = []
        else:
            parts[i].append(window)
    alarm = bool(check) and not bool(torch.isfinite(total))
    row = [below[i] for i in layers] + [inside[i] for i in layers] + [float(i in overflow) for i in layers]
    row += [float(alarm)] + [bounds[i][0] for i in layers] + [bounds[i][1] for i in layers]
    rows = comm.all_gather_rows(torch.tensor(row, dtype=torch.float64))
    _raise_if_non_finite(pool, alarm, bool(rows[:, 3 * len(layers)].any()), comm, sorted(check))
    if not bool((rows == rows[:1]).all(0)[3 * len(layers) + 1 :].all()):
        raise ValueError("layer_quantiles: ranks passed different hints; pass the same hints on every rank")
    counts = rows[:, : 3 * len(layers)].sum(0).tolist()
    result = {}
    for j, i in enumerate(layers):
        n_below, n_inside, overflowed = int(counts[j]), int(counts[len(layers) + j]), counts[2 * len(layers) + j]
        window = None if overflowed or n_inside > caps[i] or bounds[i][0] == bounds[i][1] else parts[i]
        result[i] = (n_below, n_inside, window)
    return result


def _layer_select(
    comm: _Comm,
    device: torch.device,
    passed: dict[int, tuple[int, int, Tensor | list[Tensor] | None]],
    bounds: dict[int, tuple[float, float]],
    ranks: dict[int, tuple[int, int, float]],
) -> dict[int, tuple[Tensor, Tensor]]:
    """`_select_in_window` for every layer of a `_layer_window_pass`: the layers whose window holds their ranks."""
    found: dict[int, tuple[Tensor, Tensor]] = {}
    gather = []
    for i, (below, inside, window) in passed.items():
        a, b = bounds[i]
        if not _window_holds(below, inside, window, a, b, ranks[i][0], ranks[i][1]):
            continue
        if a == b:
            value = torch.tensor(a, dtype=torch.float32)
            found[i] = value, value
        else:
            gather.append(i)
    local = [torch.cat(passed[i][2]) if passed[i][2] else _empty_scores(device) for i in gather]
    for i, window in zip(gather, _gather_per_layer(comm, local)):
        found[i] = _order_statistics(window, passed[i][0], ranks[i][0], ranks[i][1])
    return found


def _layer_window_select(
    pool: _Pool,
    comm: _Comm,
    layers: list[int],
    sizes: list[list[int]],
    levels: list[float],
    ranks: dict[int, tuple[int, int, float]],
    hints: dict[int, float | None],
) -> dict[int, tuple[Tensor, Tensor]]:
    """`_window_select` for every layer in ``layers`` at once: one pass over them with each layer's window (around
    its hint, else from its sample), then one pass over the layers whose hinted window missed, with windows from
    their samples. Returns the order statistics of the layers found; the others need radix selection."""
    strides = {i: _sample_stride(sizes[i][0], sizes[i][1]) for i in layers}
    caps = {i: max(_TINY, sizes[i][1] // 100) for i in layers}  # ~4% of the layer's scores, as for a pool
    hinted = [i for i in layers if hints[i] is not None and math.isfinite(hints[i])]
    cold = [i for i in layers if i not in hinted]
    bounds: dict[int, tuple[float, float]] = {}
    for i in hinted:
        h = _fp32(hints[i])
        bounds[i] = _fp32(h - abs(h) * _HINT_WIDTH), _fp32(h + abs(h) * _HINT_WIDTH)
    checked: set[int] = set()
    if cold:
        bounds.update(_sample_windows(pool, comm, cold, strides, levels, checked))
    # a whole-layer score_fn cannot be sampled for free: sample on the way, in case a hint missed
    samples = None if pool.elementwise else {i: [] for i in hinted}
    passed = _layer_window_pass(pool, comm, layers, bounds, caps, set(layers) - checked, samples, strides)
    found = _layer_select(comm, pool.device, passed, bounds, ranks)
    missed = [i for i in hinted if i not in found]
    if missed:
        if samples is not None:
            local = [torch.cat(samples[i]) if samples[i] else _empty_scores(pool.device) for i in missed]
            gathered = _gather_per_layer(comm, local)
            bounds = {i: _window_from_sample(sample, levels[i]) for i, sample in zip(missed, gathered)}
        else:
            bounds = _sample_windows(pool, comm, missed, strides, levels, checked)
        passed = _layer_window_pass(pool, comm, missed, bounds, caps, set())
        found.update(_layer_select(comm, pool.device, passed, bounds, ranks))
    return found


def _sample_windows(
    pool: _Pool, comm: _Comm, layers: list[int], strides: dict[int, int], levels: list[float], checked: set[int]
) -> dict[int, tuple[float, float]]:
    """Each layer's window from a sample of its scores: read off the raw weights when score_fn is elementwise, else
    one sampling pass over ``layers`` (which also checks them for NaN/Inf: added to ``checked``)."""
    if pool.elementwise:
        local = [pool.layer_sample(i, strides[i]) for i in layers]
    else:
        parts: dict[int, list[Tensor]] = {i: [] for i in layers}
        total = torch.zeros((), dtype=torch.float32, device=pool.device)
        for i, start, s in pool.layer_chunks(layers):
            total += s.sum()  # NaN/Inf anywhere make it non-finite
            first = (-start) % strides[i]
            if first < s.numel():
                parts[i].append(s[first :: strides[i]].clone())
        alarm = not bool(torch.isfinite(total))
        any_alarm = bool(comm.all_reduce(torch.tensor([int(alarm)]), "max")[0])
        _raise_if_non_finite(pool, alarm, any_alarm, comm, layers)
        checked.update(layers)
        local = [torch.cat(parts[i]) if parts[i] else _empty_scores(pool.device) for i in layers]
    samples = _gather_per_layer(comm, local)
    return {i: _window_from_sample(sample, levels[i]) for i, sample in zip(layers, samples)}


# -- the shared threshold of a pool with per-layer bounds (capped_threshold) ------------------------


def _clamped(counts: Sequence[int], lows: Sequence[int], highs: Sequence[int]) -> int:
    """g at a point where layer l counts counts[l] scores at or below it: sum_l clamp(counts[l], lows[l], highs[l])."""
    return sum(min(max(c, lo), hi) for c, lo, hi in zip(counts, lows, highs))


class _Bounds(NamedTuple):
    """What `capped_threshold` selects: per-layer bounds on the counts, the pool's count, the layers' sizes."""

    lows: list[int]
    highs: list[int]
    count: int
    sizes: list[list[int]]


def _hint_window(hint: float) -> tuple[float, float]:
    h = _fp32(hint)
    return _fp32(h - abs(h) * _HINT_WIDTH), _fp32(h + abs(h) * _HINT_WIDTH)


def _capped_window(
    pool: _Pool, comm: _Comm, bounds: _Bounds, hint: float, held: dict[int, tuple[float, float, bool]]
) -> tuple[Tensor, list[int | None], dict[int, Tensor]] | None:
    """`capped_threshold` from one pass over a window around ``hint`` (the ``held`` layers around their own), or
    None when the window misses t."""
    a, b = _hint_window(hint)
    layers = list(range(len(pool.tensors)))
    caps = {i: max(_TINY, bounds.sizes[i][1] // 100) for i in layers}
    windows = {i: _hint_window(held[i][1]) if i in held else (a, b) for i in layers}
    passed = _layer_window_pass(pool, comm, layers, windows, caps, set(layers))
    own: dict[int, Tensor] = {}
    proven: set[int] = set()
    if held:  # each held layer's own order statistics, and whether they keep it held across [a, b]
        ranks = {i: quantile_position(bounds.sizes[i][0], q) for i, (q, _, _) in held.items()}
        stats = _layer_select(comm, pool.device, {i: passed[i] for i in held}, windows, ranks)
        for i, (lo, hi) in stats.items():
            own[i] = lerp_like_numpy(lo, hi, ranks[i][2])
            if (held[i][2] and float(hi) < a) or (not held[i][2] and float(lo) > b):
                proven.add(i)
        recount = [i for i in held if i not in proven]  # not proven held: the shared window for them too
        if recount:
            passed.update(_layer_window_pass(pool, comm, recount, dict.fromkeys(recount, (a, b)), caps, set()))
    free = [i for i in layers if i not in proven]
    fixed = sum(bounds.highs[i] if held[i][2] else bounds.lows[i] for i in proven)  # g's part from proven-held
    below = {i: passed[i][0] for i in free}
    lows, highs = [bounds.lows[i] for i in free], [bounds.highs[i] for i in free]
    base = fixed + _clamped([below[i] for i in free], lows, highs)  # g just below a
    top = {i: passed[i][0] + passed[i][1] for i in free}
    if not base < bounds.count <= fixed + _clamped([top[i] for i in free], lows, highs):
        return None
    if a == b:  # every score in the window equals a
        counts = [top.get(i) for i in layers]
        return torch.tensor(a, dtype=torch.float32), counts, own
    if any(passed[i][2] is None for i in free):  # a window too full to gather
        return None
    local = [torch.cat(passed[i][2]) if passed[i][2] else _empty_scores(pool.device) for i in free]
    gathered = dict(zip(free, _gather_per_layer(comm, local)))
    bands = []
    for i in free:
        # the window's j-th smallest score has rank below + j + 1 in its layer: in the band if in (low, high]
        window = gathered[i]
        first, last = max(bounds.lows[i] - below[i], 0), min(bounds.highs[i] - below[i], window.numel())
        if first < last:
            bands.append(window if last - first == window.numel() else torch.sort(window).values[first:last])
    tau = torch.kthvalue(torch.cat(bands), bounds.count - base).values
    counts = [below[i] + int(torch.count_nonzero(gathered[i] <= tau)) if i in gathered else None for i in layers]
    return tau, counts, own


def _capped_radix(pool: _Pool, comm: _Comm, lows: list[int], highs: list[int], count: int) -> tuple[Tensor, list[int]]:
    """`capped_threshold` by radix selection on g: the fp32 key of t, 8 bits per pass, from per-layer histograms of
    the next digit among the scores that share the digits found so far (layers x 256 counts)."""
    layers, dev = len(pool.tensors), pool.device
    prefix = 0  # the key's digits found so far, as an unsigned number
    total = torch.zeros((), dtype=torch.float32, device=dev)
    for shift in (24, 16, 8, 0):
        hist = torch.zeros(layers, 256, dtype=torch.int64, device=dev)
        below = torch.zeros(layers, dtype=torch.int64, device=dev)
        for i, _, s in pool.layer_chunks():
            key = _keys(s).to(torch.int64) + (1 << 31)  # unsigned, in float order
            if shift == 24:
                total += s.sum()  # NaN/Inf anywhere make it non-finite
                digits = key >> 24
            else:
                high = key >> (shift + 8)
                below[i] += torch.count_nonzero(high < prefix)
                digits = (key[high == prefix] >> shift) & 255
            hist[i] += _count(digits, 256)
        if shift == 24:
            alarm = not bool(torch.isfinite(total))
            _raise_if_non_finite(pool, alarm, bool(comm.all_reduce(torch.tensor([int(alarm)]), "max")[0]), comm)
        hist, below = comm.all_reduce(hist), comm.all_reduce(below)
        at_most = (below[:, None] + torch.cumsum(hist, 1)).cpu()  # c_l at the top of each digit's range
        lo = torch.tensor(lows, dtype=torch.int64)[:, None]
        hi = torch.tensor(highs, dtype=torch.int64)[:, None]
        g = torch.minimum(torch.maximum(at_most, lo), hi).sum(0)
        digit = int(torch.searchsorted(g, torch.tensor([count]))[0])  # the first digit with g >= count
        prefix = (prefix << 8) | digit
    key = torch.tensor([prefix - (1 << 31)], dtype=torch.int64).to(torch.int32)
    return _float_of_key(key)[0], at_most[:, digit].tolist()


# -- radix selection (CUDA; the CPU fallback) ---------------------------------------------------


def _keys(s: Tensor) -> Tensor:
    """int32 keys ordered like the fp32 scores: the bits, magnitude bits flipped when negative."""
    bits = s.view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _float_of_key(key: Tensor) -> Tensor:
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(torch.int32).view(torch.float32)


def _scatter_count(idx: Tensor, bins: int) -> Tensor:
    """Histogram of idx in [0, bins) by a scatter-add: no host sync (CUDA's bincount reads max())."""
    ones = torch.ones(1, dtype=torch.int64, device=idx.device).expand(idx.numel())
    return torch.zeros(bins, dtype=torch.int64, device=idx.device).index_add_(0, idx.long(), ones)


def _count(idx: Tensor, bins: int) -> Tensor:
    return torch.bincount(idx, minlength=bins) if idx.device.type == "cpu" else _scatter_count(idx, bins)


def _radix_select(pool: _Pool, comm: _Comm, r_lo: int, r_hi: int) -> tuple[Tensor, Tensor]:
    """Order statistics r_lo and r_hi (r_hi <= r_lo + 1) from two 16-bit radix histograms."""
    dev, mid = pool.device, _HALF // 2
    # level 1: the top 16 key bits (sign, exponent, 7 mantissa bits), shifted to 0..65535
    hist = torch.zeros(_HALF, dtype=torch.int64, device=dev)
    for _, s in pool.chunks():
        hist += _count((_keys(s) >> 16).add_(mid), _HALF).to(dev)
    hist = comm.all_reduce(hist)
    # +-Inf and NaN keys lie beyond the largest finite magnitude 0x7F7FFFFF: bins < 128 or >= 65408
    if bool(hist[: mid - 0x7F80].sum() + hist[mid + 0x7F80 :].sum() > 0):  # the one host sync
        found = pool.first_non_finite()
        raise _non_finite_error(found if found is not None else "on another rank")
    cum = torch.cumsum(hist, 0)
    ranks = torch.tensor([r_lo, r_hi], dtype=torch.int64, device=dev)
    bins = torch.searchsorted(cum, ranks, right=True)  # the bin of each rank
    before = (cum - hist).index_select(0, bins[:1])  # scores in bins below r_lo's
    b_lo, b_hi = bins[0], bins[1]
    # level 2: the low 16 bits in bin b_lo (slots 0..65535) and in b_hi != b_lo (65536..131071);
    # when b_hi != b_lo, r_lo is the last score of b_lo and r_hi the first of b_hi
    hist2 = torch.zeros(2 * _HALF + 1, dtype=torch.int64, device=dev)
    for _, s in pool.chunks():
        key = _keys(s)
        top = (key >> 16).add_(mid)
        low = key & (_HALF - 1)
        slot = torch.where(top == b_lo, low, torch.where(top == b_hi, low + _HALF, 2 * _HALF))
        hist2 += _count(slot, 2 * _HALF + 1).to(dev)
    hist2 = comm.all_reduce(hist2)
    slots = torch.searchsorted(torch.cumsum(hist2[: 2 * _HALF], 0), ranks - before, right=True)
    upper = slots >= _HALF
    key = (torch.where(upper, b_hi, b_lo) - mid) * _HALF + torch.where(upper, slots - _HALF, slots)
    values = _float_of_key(key)
    return values[0], values[1]


def _check_q(q) -> float:
    try:
        qf = float(q)
    except (TypeError, ValueError):
        raise ValueError(f"q must be a number in [0, 1] (the fraction to prune), got {q!r}") from None
    if not 0.0 <= qf <= 1.0:  # also rejects NaN
        raise ValueError(f"q must be in [0, 1] (the fraction of the pool to prune), got {q!r}")
    return qf


def _global_quantile(
    tensors, q, score_fn, group, hint, strategy: str | None = None, budget_bytes: int | None = None
) -> Tensor:
    """`global_quantile` with the strategy forced ("window" or "radix") for tests and benchmarks; ``budget_bytes``:
    size chunks and windows for a pool of that many bytes (`layer_quantiles`: the whole pool, one layer at a time)."""
    if isinstance(tensors, Tensor):
        tensors = [tensors]
    qf = _check_q(q)
    pool = _Pool(tensors, score_fn)
    comm = _Comm(group, pool)
    with torch.no_grad(), _one_thread(pool.device.type == "cpu"):
        sizes = comm.all_reduce(torch.tensor([pool.numel, pool.nbytes], dtype=torch.int64))
        n, nbytes = int(sizes[0]), int(sizes[1])
        if n == 0:
            raise ValueError(
                "global_quantile: the sparsity pool is empty (no tensor has an element); "
                "check that the model has Conv/Linear weights to sparsify"
            )
        r_lo, r_hi, frac = quantile_position(n, qf)
        if strategy is None:
            strategy = "window" if pool.device.type == "cpu" else "radix"
        found = None
        if strategy == "window":
            pool.chunk, cap = _budget(budget_bytes or nbytes, pool.device, "window")
            h = None if hint is None else float(hint)
            found = _window_select(pool, comm, n, nbytes, qf, r_lo, r_hi, cap, h)
        if found is None:
            pool.chunk, _ = _budget(budget_bytes or nbytes, pool.device, "radix")
            found = _radix_select(pool, comm, r_lo, r_hi)
        lo, hi = found
        return lerp_like_numpy(lo.to(pool.device), hi.to(pool.device), frac)
