"""The window grid: where tiles (and prediction windows) start along a scene's axes.

One home for the grid that tiling cuts and scene prediction slides over, so the two always agree.
"""

from __future__ import annotations

from pipeline.errors import SatdetError


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Offsets of tiles along one axis: regular stride, the last one shifted inward to end at `length`.

    A scene shorter than a tile gets one tile at 0 (padded by the caller).
    """
    if tile <= overlap:
        raise SatdetError(f"tile size ({tile}) must be larger than the overlap ({overlap}); fix tiling.overlap")
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)  # shifted inward rather than padded
    return starts


def tile_windows(width: int, height: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(col_off, row_off) of every tile of a scene, row by row."""
    cols, rows = tile_starts(width, tile, overlap), tile_starts(height, tile, overlap)
    return [(c, r) for r in rows for c in cols]
