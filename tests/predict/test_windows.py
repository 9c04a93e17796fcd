"""pipeline/predict/windows.py: the window plan on the tiling grid, with each window's interior seams."""

from __future__ import annotations

from pipeline.geo.grid import tile_starts
from pipeline.predict.windows import plan_windows, usable_overlap


def test_last_window_is_shifted_inward_and_a_small_region_is_one_window():
    wins = plan_windows((0, 0, 200, 50), 64, 16)
    assert [w.col for w in wins] == [0, 48, 96, 136]
    assert len(wins) == 4 and all(w.row == 0 and w.height == 50 and w.width == 64 for w in wins)
    assert wins[0].left_end is None and wins[0].right_start == 48 and wins[-1].right_start is None
    [small] = plan_windows((10, 20, 50, 40), 64, 16)
    assert (small.col, small.row, small.width, small.height) == (10, 20, 50, 40)
    assert small.left_end is small.right_start is small.top_end is small.bottom_start is None


def test_windows_of_a_region_lie_on_the_tiling_grid_shifted_to_the_region():
    wins = plan_windows((13, 7, 333, 250), 64, 16)
    cols = sorted({w.col for w in wins})
    rows = sorted({w.row for w in wins})
    assert cols == [13 + s for s in tile_starts(333, 64, 16)] and cols[-1] + 64 == 13 + 333
    assert rows == [7 + s for s in tile_starts(250, 64, 16)] and rows[-1] + 64 == 7 + 250
    assert len(wins) == len(cols) * len(rows)


def test_interior_seams_name_the_neighbours_edges():
    wins = plan_windows((0, 0, 150, 150), 64, 16)  # columns and rows at 0, 48, 86
    middle = wins[4]
    assert (middle.col, middle.row) == (48, 48)
    assert (middle.left_end, middle.right_start, middle.top_end, middle.bottom_start) == (64, 86, 64, 86)
    corner = wins[0]
    assert corner.left_end is None and corner.top_end is None and corner.right_start == 48


def test_an_overlap_of_a_whole_window_falls_back_to_a_quarter(caplog):
    assert usable_overlap(16, 64) == 16
    assert usable_overlap(64, 64) == 16
    assert "using 16" in caplog.text
