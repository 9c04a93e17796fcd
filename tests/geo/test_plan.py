import numpy as np
import pytest

from pipeline.errors import SatdetError
from pipeline.geo.grid import tile_starts, tile_windows
from pipeline.geo.plan import block_edges, plan_tiling, window_pairs, window_splits
from pipeline.geo.synth import make_scene

from .conftest import make_config


def test_last_tile_is_shifted_inward_not_padded():
    assert tile_starts(200, 64, 16) == [0, 48, 96, 136]
    assert tile_starts(192, 64, 16) == [0, 48, 96, 128]


def test_scene_smaller_than_a_tile_gets_one_tile():
    assert tile_starts(40, 64, 16) == [0]
    assert tile_windows(40, 100, 64, 16) == [(0, 0), (0, 36)]


def test_tile_not_larger_than_overlap_is_refused():
    with pytest.raises(SatdetError, match="must be larger than the overlap"):
        tile_starts(100, 16, 16)


def _boxes_per_window(boxes, cols, rows, tile):
    """window_pairs grouped by window: {(col_off, row_off): box indices}."""
    box, key = window_pairs(boxes, cols, rows, tile)
    out = {}
    for b, k in zip(box.tolist(), key.tolist(), strict=True):
        out.setdefault((cols[k % len(cols)], rows[k // len(cols)]), []).append(b)
    return {w: np.asarray(idx) for w, idx in out.items()}


def test_window_pairs_match_brute_force():
    rng = np.random.default_rng(0)
    xy = rng.uniform(-30, 330, (300, 2))
    wh = rng.uniform(0, 60, (300, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    boxes[:5, 2:] = boxes[:5, :2]  # degenerate (zero-area) boxes still touch by their edges rule
    cols, rows = tile_starts(300, 64, 16), tile_starts(260, 64, 16)
    got = _boxes_per_window(boxes, cols, rows, 64)
    want = {}
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        for r in rows:
            for c in cols:
                if c < x1 and c + 64 > x0 and r < y1 and r + 64 > y0:
                    want.setdefault((c, r), []).append(i)
    assert sorted(got) == sorted(want)
    for key, idx in want.items():
        assert got[key].tolist() == idx
    assert _boxes_per_window(np.zeros((0, 4)), cols, rows, 64) == {}


def test_thin_block_remainder_joins_its_neighbour():
    assert block_edges(2299, 1104) == [0, 1104, 2299]
    assert block_edges(2800, 1104) == [0, 1104, 2208, 2800]
    assert block_edges(2600, 1104) == [0, 1104, 2600]
    assert block_edges(500, 1104) == [0, 500]


def test_block_split_gives_val_and_test_a_block_even_with_one_scene(tmp_path):
    s = make_scene(tmp_path, "one", 400, 400, seed=0, n_objects=2)
    cfg = make_config(tmp_path, [{"image": s.image, "labels": s.labels}],
                      split={"method": "block", "block_size": 1000, "val_fraction": 0.1, "test_fraction": 0.1})
    plan = plan_tiling(cfg)
    splits = {sp for row in plan["scenes"][0]["block_splits"] for sp in row}
    assert splits == {"train", "val", "test"}


def test_tiles_touching_two_splits_are_straddlers(tmp_path):
    s = make_scene(tmp_path, "one", 400, 400, seed=0, n_objects=2)
    cfg = make_config(tmp_path, [{"image": s.image, "labels": s.labels}],
                      split={"method": "block", "block_size": 96, "val_fraction": 0.3, "test_fraction": 0.3})
    scene = plan_tiling(cfg)["scenes"][0]
    xe, ye = scene["x_edges"], scene["y_edges"]
    cols, rows = tile_starts(400, 64, 16), tile_starts(400, 64, 16)
    splits = window_splits(scene, cols, rows, 64)
    assert {s for row in splits for s in row} >= {None}  # block size 96 < tile + overlap: straddlers exist
    for c, r in tile_windows(400, 400, 64, 16):
        split = splits[rows.index(r)][cols.index(c)]
        touched = {scene["block_splits"][j][i] for j in range(len(ye) - 1) for i in range(len(xe) - 1)
                   if c < xe[i + 1] and c + 64 > xe[i] and r < ye[j + 1] and r + 64 > ye[j]}
        assert split == (touched.pop() if len(touched) == 1 else None)


def test_scene_split_honours_forced_splits(tmp_path):
    a = make_scene(tmp_path, "a", 64, 64, seed=0, n_objects=1)
    b = make_scene(tmp_path, "b", 64, 64, seed=1, n_objects=1)
    cfg = make_config(tmp_path, [{"image": a.image, "labels": a.labels, "split": "test"},
                                 {"image": b.image, "labels": b.labels}])
    plan = plan_tiling(cfg)
    assert [s["block_splits"] for s in plan["scenes"]] == [[["test"]], [["train"]]]


def test_metre_tile_size_is_converted_with_the_pixel_size(tmp_path):
    s = make_scene(tmp_path, "m", 128, 128, seed=0, n_objects=1, resolution=0.5)
    cfg = make_config(tmp_path, [{"image": s.image, "labels": s.labels}], tile_size=32, overlap=8, units="m")
    plan = plan_tiling(cfg)
    assert (plan["tile_size"], plan["overlap"]) == (64, 16)


def test_band_out_of_range_in_config(tmp_path):
    s = make_scene(tmp_path, "b", 64, 64, seed=0, n_objects=1)
    cfg = make_config(tmp_path, [{"image": s.image, "labels": s.labels}], bands=[1, 5])
    with pytest.raises(SatdetError, match="b.tif: band index 5 out of range"):
        plan_tiling(cfg)
