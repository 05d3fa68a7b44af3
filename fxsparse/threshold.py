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

Every pass walks the pool chunk by chunk; the extra memory stays within about 8% of the pool's bytes
(see `_budget`), plus one layer's scores when ``score_fn`` is not elementwise. The result is exact
whichever path runs: a window only decides how much work is done, never the value.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

ScoreFn = Callable[[int, Tensor], Tensor]

__all__ = [
    "ScoreFn",
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
    window as in `global_quantile`; ``group`` as there (every rank passes the same qs)."""
    if len(qs) != len(tensors):
        raise ValueError(f"layer_quantiles: {len(qs)} sparsities for {len(tensors)} tensors")
    device = next((t.device for t in tensors if t.numel()), torch.device("cpu"))
    out = torch.zeros(len(tensors), dtype=torch.float32, device=device)
    # chunks and windows sized for the whole pool (memory bound as one pool pass): small layers are walked in
    # one chunk, not many. Sharded: each rank must take the same decisions, so the per-layer sizes stay.
    budget = None if group is not None else sum(t.numel() * t.element_size() for t in tensors)
    for index, (tensor, q) in enumerate(zip(tensors, qs)):
        if q > 0.0:
            hint = None if hints is None else hints[index]
            score = _single_layer(score_fn, index)
            out[index] = _global_quantile([tensor], q, score, group, hint, budget_bytes=budget)
    return out


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
        offset, step = 0, self.chunk
        into = getattr(self.score_fn, "score_into", None) if self.elementwise else None
        buffer = torch.empty(step, dtype=torch.float32, device=self.device) if into is not None else None
        for i, t in enumerate(self.tensors):
            n = t.numel()
            if n == 0:
                continue
            if self.elementwise:
                flat = _flat(t.detach())
                for start in range(0, n, step):
                    piece = flat[start : start + step]
                    if into is not None and piece.device == self.device:
                        yield offset + start, into(i, piece, buffer[: piece.numel()])
                    else:
                        yield offset + start, self._check(i, piece, self.score_fn(i, piece))
            else:
                scores = self._check(i, t, self.score_fn(i, t))
                for start in range(0, n, step):
                    yield offset + start, scores[start : start + step]
                del scores
            offset += n

    def sample(self, stride: int) -> Tensor | None:
        """Scores of every stride-th entry of the local pool, scoring nothing else: only for an
        elementwise score_fn (else None: sampling costs a pass, see `_sample_pass`)."""
        if not self.elementwise:
            return None
        parts, offset = [], 0
        for i, t in enumerate(self.tensors):
            first = (-offset) % stride
            if first < t.numel():
                piece = _flat(t.detach())[first::stride]
                parts.append(self._check(i, piece, self.score_fn(i, piece)))
            offset += t.numel()
        return torch.cat(parts) if parts else _empty_scores(self.device)

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

    def first_non_finite(self) -> str | None:
        """Describe the first local layer with a NaN/Inf score (slow: only after an alarm)."""
        for i, t in enumerate(self.tensors):
            if t.numel() == 0:
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


def _raise_if_non_finite(pool: _Pool, local_alarm: bool, any_alarm: bool, comm: _Comm) -> None:
    """An alarm is a non-finite fp32 sum of a rank's scores: a NaN/Inf score, or (false alarm) huge
    finite scores overflowing the sum. A per-layer scan tells them apart; all ranks agree."""
    if not any_alarm:
        return
    found = pool.first_non_finite() if local_alarm else None
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
        lt = s < a
        n_lt = int(torch.count_nonzero(lt))
        below += n_lt
        mask = s <= b
        if tie or overflow:
            inside += int(torch.count_nonzero(mask)) - n_lt
            continue
        mask.logical_xor_(lt)  # a <= s <= b, as s < a implies s <= b
        window = s.index_select(0, mask.nonzero().view(-1))  # masked_select casts the mask to int64
        inside += window.numel()
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
    if not (below <= r_lo and r_hi < below + inside):
        return None
    if a == b:
        value = torch.tensor(a, dtype=torch.float32)
        return value, value
    if window is None:  # too many scores inside to gather
        return None
    window = comm.all_gather_cat(window)
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


def _global_quantile(
    tensors, q, score_fn, group, hint, strategy: str | None = None, budget_bytes: int | None = None
) -> Tensor:
    """`global_quantile` with the strategy forced ("window" or "radix") for tests and benchmarks; ``budget_bytes``:
    size chunks and windows for a pool of that many bytes (`layer_quantiles`: the whole pool, one layer at a time)."""
    if isinstance(tensors, Tensor):
        tensors = [tensors]
    try:
        qf = float(q)
    except (TypeError, ValueError):
        raise ValueError(f"q must be a number in [0, 1] (the fraction to prune), got {q!r}") from None
    if not 0.0 <= qf <= 1.0:  # also rejects NaN
        raise ValueError(f"q must be in [0, 1] (the fraction of the pool to prune), got {q!r}")
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
