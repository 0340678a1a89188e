"""Summary metrics on a hand-computed accuracy matrix."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cl.metrics import AccuracyMatrix


def _matrix() -> AccuracyMatrix:
    # 3 experiences, 10 test samples each except experience 2 with 20.
    #            exp0  exp1  exp2
    # after 0:   9/10
    # after 1:   6/10  8/10
    # after 2:   4/10  5/10  18/20
    m = AccuracyMatrix(3)
    m.set_row(0, [9], [10])
    m.set_row(1, [6, 8], [10, 10])
    m.set_row(2, [4, 5, 18], [10, 10, 20])
    return m


def test_summary_by_hand():
    s = _matrix().summary()
    assert s["last_acc"] == pytest.approx((4 + 5 + 18) / 40)  # sample-weighted
    assert s["avg_acc"] == pytest.approx((0.4 + 0.5 + 0.9) / 3)  # experience-averaged
    assert s["avg_inc_acc"] == pytest.approx((0.9 + 14 / 20 + 27 / 40) / 3)
    # forgetting: exp0 max(0.9, 0.6) - 0.4 = 0.5 ; exp1 max(0.8) - 0.5 = 0.3
    assert s["forgetting"] == pytest.approx((0.5 + 0.3) / 2)
    # bwt: (0.4 - 0.9 + 0.5 - 0.8) / 2
    assert s["bwt"] == pytest.approx((-0.5 - 0.3) / 2)
    assert s["fwt"] is None  # no initial evaluation


def test_fwt_with_initial_row():
    m = AccuracyMatrix(2)
    m.set_initial([1, 2], [10, 10])  # b = [0.1, 0.2]
    m.set_row(0, [9, 5], [10, 10])  # R[0][1] = 0.5 (unseen experience evaluated)
    m.set_row(1, [7, 9], [10, 10])
    assert m.summary()["fwt"] == pytest.approx(0.5 - 0.2)


def test_single_experience_and_state_round_trip():
    m = AccuracyMatrix(1)
    m.set_row(0, [3], [4])
    s = m.summary()
    assert s["last_acc"] == 0.75 and s["forgetting"] is None and s["bwt"] is None
    full = _matrix()
    clone = AccuracyMatrix(3)
    clone.load_state_dict(full.state_dict())
    assert clone.summary() == full.summary()
    np.testing.assert_array_equal(clone.correct, full.correct)


def test_csv_layout():
    csv = _matrix().to_csv().splitlines()
    assert csv[0] == "trained\\evaluated,exp0,exp1,exp2"
    assert csv[1] == "exp0,0.900000,,"
    assert csv[3] == "exp2,0.400000,0.500000,0.900000"
    assert math.isnan(_matrix().matrix()[0, 1])
