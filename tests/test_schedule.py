import pytest

import fxsparse
from fxsparse.schedule import cubic


def test_cubic_matches_zhu_gupta():
    assert cubic(0, 0.9, 10, 20) == 0.0 and cubic(9, 0.9, 10, 20) == 0.0
    assert cubic(10, 0.9, 10, 20) == 0.0
    assert cubic(15, 0.9, 10, 20) == pytest.approx(0.9 * (1 - 0.5**3))
    assert cubic(20, 0.9, 10, 20) == 0.9 and cubic(10**6, 0.9, 10, 20) == 0.9
    values = [cubic(i, 0.9, 10, 20) for i in range(25)]
    assert values == sorted(values)


def test_schedule_configs():
    assert fxsparse.Cubic(0, 4)(2, 0.8) == cubic(2, 0.8, 0, 4)
    assert fxsparse.Constant()(0, 0.7) == 0.7
    with pytest.raises(ValueError, match="begin < end"):
        fxsparse.Cubic(begin=10, end=5)


def test_paper_placement():
    # ST-3: epochs 5..80 of 160 -> 1/32 .. 1/2 of the steps; Feather: 0 .. floor(0.5 * total)
    assert fxsparse.paper_schedule("st3", 16000) == fxsparse.Cubic(500, 8000)
    assert fxsparse.paper_schedule("feather", 16001) == fxsparse.Cubic(0, 8000)
