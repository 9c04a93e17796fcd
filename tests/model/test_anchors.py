"""pipeline/model/anchors.py: anchor counts, centres, sizes and ratios."""

import numpy as np

from pipeline.model.anchors import cell_anchors, multilevel_anchors, num_anchors_per_location


def test_anchor_counts_and_centres_per_level():
    shapes = [(8, 10), (4, 5)]
    levels = multilevel_anchors(shapes, [4, 8], [16, 32], [0.5, 1.0, 2.0])
    assert [len(a) for a in levels] == [8 * 10 * 3, 4 * 5 * 3]
    fine = levels[0].reshape(8, 10, 3, 4)
    centres = (fine[..., :2] + fine[..., 2:]) / 2
    # cell (row 2, column 3) of stride 4 covers pixels [12, 16) x [8, 12): centre (14, 10)
    np.testing.assert_allclose(centres[2, 3], [[14.0, 10.0]] * 3)
    coarse = levels[1].reshape(4, 5, 3, 4)
    np.testing.assert_allclose((coarse[0, 0, :, :2] + coarse[0, 0, :, 2:]) / 2, [[4.0, 4.0]] * 3)


def test_anchor_area_and_ratio_h_over_w():
    cell = cell_anchors(32, [0.5, 1.0, 2.0])
    w = cell[:, 2] - cell[:, 0]
    h = cell[:, 3] - cell[:, 1]
    np.testing.assert_allclose(w * h, [32.0**2] * 3, rtol=1e-5)
    np.testing.assert_allclose(h / w, [0.5, 1.0, 2.0], rtol=1e-5)


def test_scales_per_octave_multiply_anchors():
    cell = cell_anchors(16, [1.0], scales_per_octave=2)
    assert num_anchors_per_location([1.0], 2) == 2
    np.testing.assert_allclose(cell[:, 2] - cell[:, 0], [16.0, 16.0 * 2**0.5], rtol=1e-5)
