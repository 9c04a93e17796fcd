"""benchmarks/box_errors.py: greedy matching and the size / centre error figures it reports."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "box_errors.py"
_spec = importlib.util.spec_from_file_location("box_errors", _PATH)
box_errors = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(box_errors)


def test_matching_is_greedy_by_score_one_to_one_and_above_the_threshold():
    gt = np.array([[0, 0, 40, 40], [100, 100, 140, 140]], float)
    det = np.array([[2, 2, 42, 42], [0, 0, 40, 40], [100, 100, 150, 150], [300, 300, 340, 340]], float)
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    pairs = box_errors.matched_pairs(gt, det, scores, threshold=0.75)
    # the 0.9 box takes the first crown before the exact 0.8 one; the 0.7 box is below the threshold
    assert len(pairs) == 1 and np.array_equal(pairs[0][0], det[0]) and np.array_equal(pairs[0][1], gt[0])
    pairs = box_errors.matched_pairs(gt, det, scores, threshold=0.5)
    assert [p[1].tolist() for p in pairs] == [gt[0].tolist(), gt[1].tolist()]
    assert pairs[1][2] == pytest.approx(1600 / 2500)


def test_a_uniform_size_bias_shows_in_the_median_and_the_correction_removes_it():
    rng = np.random.default_rng(0)
    centres = np.stack(np.meshgrid(np.arange(8) * 100 + 50, np.arange(5) * 100 + 50), -1).reshape(40, 2)  # apart
    sizes = rng.uniform(20, 60, (40, 1))
    gt = np.concatenate([centres - sizes / 2, centres + sizes / 2], 1)
    det = box_errors.resized(gt, 1.2, 1.2) + np.array([2.0, 0.0, 2.0, 0.0])  # 20% too big, 2 px right
    stats = box_errors.error_stats(box_errors.matched_pairs(gt, det, np.ones(40), 0.5))
    assert stats["n_matched"] == 40
    assert stats["median_log_w_ratio"] == pytest.approx(np.log(1.2), abs=1e-4)
    assert stats["std_log_w_ratio"] == pytest.approx(0.0, abs=1e-4)
    assert stats["median_dx"] > 0 and stats["median_dy"] == pytest.approx(0.0, abs=1e-6)
    fixed = box_errors.resized(det, 1 / 1.2, 1 / 1.2)
    assert np.allclose(fixed[:, 1::2], gt[:, 1::2]) and np.allclose(fixed[:, ::2] - 2.0, gt[:, ::2])
