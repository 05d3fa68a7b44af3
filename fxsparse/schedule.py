"""Sparsity schedules: pure functions of the optimizer step, and small frozen configs around them.

The cubic ramp is Zhu & Gupta (arXiv:1710.01878, eq. 1), used by ST-3 (Sec. 4) and Feather (Sec. 3.3):
    s(i) = S * (1 - (1 - (i - begin) / (end - begin))^3)   for begin <= i < end,
    0 before begin and S from end on.
"""

from __future__ import annotations

import dataclasses


def cubic(step: int, final_sparsity: float, begin: int, end: int) -> float:
    """Zhu & Gupta's cubic ramp from 0 at ``begin`` to ``final_sparsity`` at ``end`` (steps)."""
    if step < begin:
        return 0.0
    if step >= end:
        return float(final_sparsity)
    progress = (step - begin) / (end - begin)
    return float(final_sparsity) * (1.0 - (1.0 - progress) ** 3)


@dataclasses.dataclass(frozen=True)
class Cubic:
    """Cubic ramp over optimizer steps [begin, end); the final sparsity is held after ``end``."""

    begin: int = 0
    end: int = 1

    def __post_init__(self):
        if not (isinstance(self.begin, int) and isinstance(self.end, int)):
            raise TypeError(f"Cubic(begin, end) takes integer step counts, got begin={self.begin!r}, end={self.end!r}")
        if self.begin < 0 or self.end <= self.begin:
            raise ValueError(
                f"Cubic schedule needs 0 <= begin < end (in optimizer steps), got begin={self.begin}, end={self.end}; "
                "for a schedule that starts at the final sparsity use fxsparse.Constant()"
            )

    def __call__(self, step: int, final_sparsity: float) -> float:
        return cubic(step, final_sparsity, self.begin, self.end)


@dataclasses.dataclass(frozen=True)
class Constant:
    """The final sparsity from the first step on (no ramp)."""

    def __call__(self, step: int, final_sparsity: float) -> float:
        return float(final_sparsity)


def paper_schedule(method_name: str, total_steps: int) -> Cubic:
    """The ramp placed as in the method's paper, for a run of ``total_steps`` optimizer steps.

    ST-3 (CIFAR recipe): ramp from epoch 5 to epoch 80 of 160, i.e. 1/32 to 1/2 of training.
    Feather: ramp from step 0 to floor(0.5 * total steps). Baselines (gmp, ste) use Feather's placement.
    """
    if total_steps < 2:
        raise ValueError(f"total_steps must be >= 2 to place a ramp, got {total_steps}")
    end = max(1, total_steps // 2)
    if method_name.startswith("st3"):
        begin = total_steps // 32
        return Cubic(begin=begin, end=max(end, begin + 1))
    return Cubic(begin=0, end=end)
