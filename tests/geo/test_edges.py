import numpy as np
import pytest

from pipeline.geo.edges import EdgePolicy

REGION = (0.0, 0.0, 10.0, 10.0)
BOXES = np.array([
    [2, 2, 4, 4],      # inside
    [8, 0, 12, 2],     # half inside (x 8..10 of 8..12)
    [9, 0, 13, 2],     # a quarter inside
    [4, 4, 14, 14],    # 36% inside (6×6 of 10×10)
    [10, 0, 12, 2],    # touches the edge only: not visible
], dtype=float)


@pytest.mark.parametrize("min_visibility, kept", [
    (0.0, [0, 1, 2, 3]),
    (0.3, [0, 1, 3]),
    (0.5, [0, 1]),
    (1.0, [0]),
])
def test_box_kept_only_at_or_above_min_visibility(min_visibility, kept):
    res = EdgePolicy(min_visibility).apply(BOXES, REGION)
    assert res.index.tolist() == kept
    assert res.n_dropped == 4 - len(kept)


def test_kept_boxes_are_clipped_to_the_region():
    res = EdgePolicy(0.3).apply(BOXES, REGION)
    assert res.boxes.tolist() == [[2, 2, 4, 4], [8, 0, 10, 2], [4, 4, 10, 10]]
    assert res.clipped.tolist() == [False, True, True]
    assert res.n_clipped == 2


def test_visibility_fractions():
    vis = EdgePolicy.visibility(BOXES, REGION)
    assert np.allclose(vis, [1.0, 0.5, 0.25, 0.36, 0.0])


def test_min_visibility_outside_unit_interval_is_refused():
    with pytest.raises(ValueError):
        EdgePolicy(1.5)
