"""pipeline/predict/scene.py: whole-scene inference — seams, nodata, regions, thresholds, band/dtype checks."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import PredictConfig
from pipeline.errors import SatdetError
from pipeline.predict.scene import predict_region

from .fakes import BrightSquareDetector, write_scene


def _sorted(boxes):
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    return boxes[np.lexsort((boxes[:, 1], boxes[:, 0]))]


def test_objects_straddling_seams_are_reported_once_whole(tmp_path):
    # windows 64 px, overlap 24 -> columns/rows start at 0, 40, 80, 120, 136; seams at 40..64, 80..104, ...
    squares = [
        (55, 10, 70, 25),     # straddles the right edge of window 0 (x = 64)
        (35, 58, 50, 73),     # straddles a column seam and a row seam at once
        (100, 100, 118, 118), # inside the overlap of windows 1..3
        (5, 5, 15, 15),       # away from seams
        (180, 120, 200, 140), # touches the scene's right edge (a scene edge, not a seam)
        (130, 60, 142, 70),   # near the shifted-inward last column
    ]
    path = write_scene(tmp_path / "s.tif", 200, 150, squares, class2=[2])
    det = BrightSquareDetector(tile_size=64)
    cfg = PredictConfig(overlap=24, batch_size=3, score_threshold=0.1)
    out = predict_region(det, path, cfg)
    np.testing.assert_allclose(_sorted(out.boxes), _sorted(squares))
    assert out.labels[np.argmin(np.abs(out.boxes[:, 0] - 100))] == 2
    assert out.scene == "s" and out.crs == "EPSG:32617"
    assert out.windows == 5 * 4  # cols 0,40,80,120,136 x rows 0,40,80,86
    assert {s[0] for s in det.batches} == {3, 2}  # batches of 3 plus the remainder


def test_wbf_merge_gives_the_same_whole_objects(tmp_path):
    squares = [(55, 10, 70, 25), (100, 100, 118, 118)]
    path = write_scene(tmp_path / "s.tif", 160, 160, squares)
    cfg = PredictConfig(overlap=24, score_threshold=0.1, merge="wbf")
    out = predict_region(BrightSquareDetector(), path, cfg)
    np.testing.assert_allclose(_sorted(out.boxes), _sorted(squares))


def test_boxes_mostly_over_nodata_are_dropped(tmp_path):
    # nodata = 255: a bright blob of 255 is "detected" but lies over nodata; the 200 square is real
    path = write_scene(tmp_path / "s.tif", 120, 120, [(10, 10, 30, 30)], nodata=255,
                       extra=[(60, 60, 90, 90, 255), (40, 80, 48, 100, 255)])
    # a real square half over nodata: 10 px wide square, left 6 columns nodata -> 60 % nodata
    path2 = write_scene(tmp_path / "t.tif", 120, 120, [(10, 10, 30, 30), (70, 20, 80, 30)], nodata=255,
                        extra=[(70, 20, 76, 30, 255)])
    cfg = PredictConfig(overlap=16, score_threshold=0.1, max_nodata_fraction=0.5)
    out = predict_region(BrightSquareDetector(), path, cfg)
    np.testing.assert_allclose(out.boxes, [[10, 10, 30, 30]])
    out2 = predict_region(BrightSquareDetector(), path2, cfg)
    np.testing.assert_allclose(out2.boxes, [[10, 10, 30, 30]])
    lenient = predict_region(BrightSquareDetector(), path2, cfg.model_copy(update={"max_nodata_fraction": 0.7}))
    assert len(lenient) == 2


def test_small_scene_is_one_window_of_its_own_size(tmp_path):
    path = write_scene(tmp_path / "s.tif", 50, 40, [(40, 30, 50, 40)])
    det = BrightSquareDetector(tile_size=64)
    out = predict_region(det, path, PredictConfig(overlap=16, score_threshold=0.1))
    assert det.batches == [(1, 40, 50, 3)]
    np.testing.assert_allclose(out.boxes, [[40, 30, 50, 40]])


def test_region_prediction_returns_scene_pixels_clipped_to_region(tmp_path):
    path = write_scene(tmp_path / "s.tif", 200, 200, [(20, 20, 30, 30), (95, 95, 110, 105), (150, 150, 160, 160)])
    out = predict_region(BrightSquareDetector(), path, PredictConfig(overlap=16, score_threshold=0.1),
                         region=(90, 90, 100, 100))
    np.testing.assert_allclose(_sorted(out.boxes), _sorted([(95, 95, 110, 105), (150, 150, 160, 160)]))
    assert out.region == (90, 90, 100, 100)
    with pytest.raises(SatdetError, match="not inside"):
        predict_region(BrightSquareDetector(), path, PredictConfig(), region=(150, 150, 100, 100))


def test_score_threshold_filters(tmp_path):
    path = write_scene(tmp_path / "s.tif", 64, 64, [(5, 5, 15, 15)], value=120)  # score 120/255 = 0.47
    assert len(predict_region(BrightSquareDetector(), path, PredictConfig(overlap=16, score_threshold=0.4))) == 1
    assert len(predict_region(BrightSquareDetector(), path, PredictConfig(overlap=16, score_threshold=0.5))) == 0


def test_band_count_and_dtype_mismatch_name_both(tmp_path):
    path = write_scene(tmp_path / "s.tif", 64, 64, [])
    with pytest.raises(SatdetError, match=r"uint8.*uint16"):
        predict_region(BrightSquareDetector(dtype="uint16"), path, PredictConfig(overlap=16))
    with pytest.raises(SatdetError, match=r"3 band\(s\).*\[1, 2, 3, 4\]"):
        predict_region(BrightSquareDetector(bands=4), path, PredictConfig(overlap=16))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_object_up_to_the_overlap_is_reported_exactly_once(tmp_path, seed):
    # random squares (4..24 px, the overlap is 24) on a jittered grid: wherever the seams fall, each
    # comes out once and whole, including squares ending exactly on a window edge
    rng = np.random.default_rng(seed)
    squares = []
    for gy in range(0, 230, 29):
        for gx in range(0, 290, 29):
            s = int(rng.integers(4, 25))
            x0, y0 = gx + int(rng.integers(0, 28 - s)), gy + int(rng.integers(0, 28 - s))
            squares.append((x0, y0, x0 + s, y0 + s))
    squares += [(20, 50, 30, 64), (80, 98, 92, 104)]  # end exactly on window edges x/y = 64 and 104
    squares = [q for q in squares if not any(q != o and q[0] < o[2] + 1 and o[0] < q[2] + 1
                                                 and q[1] < o[3] + 1 and o[1] < q[3] + 1 for o in squares)]
    path = write_scene(tmp_path / "s.tif", 300, 260, squares)
    cfg = PredictConfig(overlap=24, score_threshold=0.1, edge_tolerance=float(seed))
    out = predict_region(BrightSquareDetector(max_det=200), path, cfg)
    np.testing.assert_allclose(_sorted(out.boxes), _sorted(squares))
