"""LR schedules, against values computed by hand."""
import math

import pytest

from steprl.recipes.common import cosine_lr, wsd_lr


def test_cosine_lr_by_hand():
    assert cosine_lr(0, 100, 10) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 10) == pytest.approx(1.0)
    # halfway through the cosine part: 0.5 * (1 + cos(pi/2)) = 0.5, then lifted to min_ratio
    assert cosine_lr(55, 100, 10, min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cosine_lr(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)


def test_wsd_lr_by_hand():
    # 100 steps, warm-up 10, the last 20 decay linearly from 1 to 0.1
    assert wsd_lr(4, 100, 10, 0.2, 0.1) == pytest.approx(0.5)
    assert wsd_lr(10, 100, 10, 0.2, 0.1) == 1.0
    assert wsd_lr(79, 100, 10, 0.2, 0.1) == 1.0  # still stable
    assert wsd_lr(80, 100, 10, 0.2, 0.1) == pytest.approx(1.0)  # decay starts here
    assert wsd_lr(90, 100, 10, 0.2, 0.1) == pytest.approx(1.0 - 0.9 * 0.5)
    assert wsd_lr(99, 100, 10, 0.2, 0.1) == pytest.approx(1.0 - 0.9 * 19 / 20)
    assert not math.isclose(wsd_lr(50, 100, 10), cosine_lr(50, 100, 10))

