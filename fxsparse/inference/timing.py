"""Timing that survives a busy machine: candidates run interleaved, in rotating order, and the median counts.

With one thread the clock is the calling thread's CPU time (time.thread_time): torch then runs every
kernel on the calling thread, and on a shared machine a wall clock mostly measures how long the thread
waited for a core. With more threads it is the wall clock (time.perf_counter), which is what parallel
speedups are; measure those on a quiet machine. Used to choose each layer's kernel (a Timer is
injectable, so tests choose deterministically) and to measure end-to-end speedups.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

Timer = Callable[[Mapping[str, Callable[[], Any]]], dict[str, float]]


def default_clock() -> Callable[[], float]:
    """time.thread_time with one torch thread, else time.perf_counter (see the module docstring)."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def clock_name(clock: Callable[[], float] | None = None) -> str:
    return "thread CPU time" if (clock or default_clock()) is time.thread_time else "wall clock"


def interleaved_medians(
    candidates: Mapping[str, Callable[[], Any]],
    *,
    repeats: int = 7,
    warmup: int = 1,
    min_sample_s: float = 2e-4,
    settle_s: float = 0.0,
    paired: bool = False,
    clock: Callable[[], float] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each candidate (``clock`` defaults to default_clock()).

    Every candidate runs ``warmup`` times, then ``repeats`` rounds each time every candidate once, the
    order rotating from round to round, so that a burst of load on a shared machine hits all of them.
    A candidate faster than ``min_sample_s`` is called several times per sample. With ``settle_s`` > 0, each
    sample follows untimed calls of the same candidate for that long (one at least), so that it finds its own
    weights in the caches rather than the previous candidate's, as it would when run on its own.
    With ``paired``, a candidate's figure is the first candidate's median times the candidate's paired ratio
    to it (paired_ratios), so that the ratios between the figures are paired ones.
    """
    if not candidates:
        return {}
    clock = clock or default_clock()
    names = list(candidates)
    loops = {}
    for name in names:
        start = clock()
        for _ in range(max(warmup, 1)):
            candidates[name]()
        once = (clock() - start) / max(warmup, 1)
        loops[name] = max(1, int(min_sample_s / max(once, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            fn, n = candidates[name], loops[name]
            if settle_s > 0:
                settle(fn, settle_s)
            start = clock()
            for _ in range(n):
                fn()
            samples[name].append((clock() - start) / n)
    if not paired:
        return {name: statistics.median(values) for name, values in samples.items()}
    base = statistics.median(samples[names[0]])
    return {name: base * ratio for name, ratio in paired_ratios(samples, names[0]).items()}


def settle(call: Callable[[], Any], seconds: float) -> None:
    """Call ``call`` untimed for ``seconds`` (once at least): the threads and caches of whatever ran before are
    then its own, as when it runs alone."""
    until = time.perf_counter() + seconds
    call()
    while time.perf_counter() < until:
        call()


def paired_ratios(samples: Mapping[str, Sequence[float]], reference: str) -> dict[str, float]:
    """Each candidate's median over the rounds of its time divided by ``reference``'s in the same round.

    A shared machine changes speed for seconds to tens of seconds at a time (the project's VM: 1.3-1.8x, docs/
    INFERENCE.md, "Paired"), longer than a round of a few candidates, so a round's ratio compares them at one
    speed and the median ignores the rounds a change of speed splits; a ratio of medians mixes the speeds of a
    whole run. ``samples[name][i]`` is the time of ``name`` in round i."""

    def ratio(t: float, b: float) -> float:  # a clock too coarse for a sample reads 0
        return t / b if b > 0 else (1.0 if t == 0 else math.inf)

    base = samples[reference]
    return {name: statistics.median(ratio(t, b) for t, b in zip(values, base)) for name, values in samples.items()}


def default_timer(candidates: Mapping[str, Callable[[], Any]]) -> dict[str, float]:
    """The per-layer timer of fxsparse.accelerate: 7 interleaved rounds of at least 1 ms per candidate, after
    one warm-up call (a layer of 0.2 ms is timed over 5 calls per round: its noise would decide otherwise)."""
    return interleaved_medians(candidates, repeats=7, warmup=1, min_sample_s=1e-3)


# A switch's first timing within this factor of its threshold is timed again, and the two speed-ups' geometric mean
# decides: on the Intel Xeon VM, ResNet-50 90% at batch 16 timed its batch split at 1.04x of the whole batch (not
# kept: 2.96x end to end) where the run before timed it at 1.20x (kept: 4.52x).
SECOND_TIMING_BAND = 1.10


def time_switch(
    timer: Timer | None,
    switch: Callable[[bool], None],
    call: Callable[[], Any],
    names: tuple[str, str],
    min_speedup: float,
    relative_to: str,
    given: bool = False,
) -> dict[str, Any]:
    """Time ``call`` with ``switch(False)`` and ``switch(True)`` (the candidates ``names`` = (off, on), in the
    timer's interleaved rounds) and leave the switch on only when that is at least ``min_speedup`` faster; a
    speed-up within SECOND_TIMING_BAND of ``min_speedup`` is timed again and the geometric mean of the two decides.
    Returns {"chosen": on or not, "reason": "<speed-up>x of <relative_to> (>= or < min_speedup)[, timed twice:
    a, b]", "ms": {name: ms}}. With no ``timer``, the switch is set as ``given`` (what a plan measured before
    chose), untimed."""
    if timer is None:
        switch(given)
        return {"chosen": given, "reason": "as the given plan chose (not timed)"}

    def candidate(on: bool) -> Callable[[], Any]:
        def run() -> Any:
            switch(on)
            return call()

        return run

    def timed() -> tuple[dict[str, float], float]:
        with torch.no_grad():
            times = dict(timer({names[0]: candidate(False), names[1]: candidate(True)}))
        return times, times[names[0]] / times[names[1]]

    times, speedup = timed()
    twice = ""
    if 1 / SECOND_TIMING_BAND < speedup / min_speedup < SECOND_TIMING_BAND:
        again, second = timed()
        twice = f", timed twice: {speedup:.2f}x and {second:.2f}x"
        speedup = math.sqrt(speedup * second)
        times = {name: math.sqrt(times[name] * again[name]) for name in names}
    on = speedup >= min_speedup
    switch(on)
    relation = ">=" if on else "<"
    return {
        "chosen": on,
        "reason": f"{speedup:.2f}x of {relative_to} ({relation} {min_speedup}{twice})",
        "ms": {name: 1e3 * seconds for name, seconds in times.items()},
    }
