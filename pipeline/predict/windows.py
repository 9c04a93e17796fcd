"""The window plan of scene inference: overlapping windows over a scene or a region of it.

Windows are `size` square with `overlap` between neighbours, on the same grid as the tiling stage
(pipeline.geo.grid.tile_starts): a regular stride, the last row/column shifted inward so every window
lies inside the scene (or the region). A region smaller than a window is one window of its own size.
Each window knows where its neighbours start and end, for the seam rule (pipeline.predict.seams).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pipeline.geo.grid import tile_starts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Window:
    """One window in scene pixels, with its interior seams (None at scene/region edges)."""

    col: int
    row: int
    width: int  # pixels actually read (< size only when the region is smaller than a window)
    height: int
    left_end: int | None  # previous column's right edge (scene px)
    right_start: int | None  # next column's left edge
    top_end: int | None
    bottom_start: int | None


def usable_overlap(overlap: int, size: int) -> int:
    """`overlap`, or a quarter window when it would leave no stride (e.g. the default 64 px with a 64 px
    model): prediction keeps going with a usable overlap."""
    if overlap < size:
        return overlap
    log.warning("predict.overlap %d >= window size %d; using %d", overlap, size, size // 4)
    return size // 4


def _starts(start: int, length: int, size: int, overlap: int) -> list[int]:
    """Window origins along one axis of [start, start + length): the tiling grid, shifted to `start`."""
    return [start + offset for offset in tile_starts(length, size, overlap)]


def plan_windows(region: tuple[int, int, int, int], size: int, overlap: int) -> list[Window]:
    """All windows over `region` (col_off, row_off, width, height), row by row; `overlap` < `size`."""
    c0, r0, w, h = region
    cols = _starts(c0, w, size, overlap)
    rows = _starts(r0, h, size, overlap)
    ww, hh = min(size, w), min(size, h)
    return [
        Window(c, r, ww, hh,
               left_end=cols[j - 1] + ww if j > 0 else None,
               right_start=cols[j + 1] if j + 1 < len(cols) else None,
               top_end=rows[i - 1] + hh if i > 0 else None,
               bottom_start=rows[i + 1] if i + 1 < len(rows) else None)
        for i, r in enumerate(rows) for j, c in enumerate(cols)
    ]
