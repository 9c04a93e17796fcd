"""The tiling plan: tile windows per scene and the train/val/test split of scenes or spatial blocks.

Computed from raster headers only (cheap, deterministic from the config), before any pixel is read, so
every bad input that the headers reveal fails at once, and parallel scene workers agree on the splits.

Block splits: each scene is cut into a grid of square blocks whose edges fall on tile-grid lines
(block size rounded to whole tile strides, a thin remainder merged into its neighbour). Blocks get
splits at random (seeded); a tile whose window touches blocks of two splits is dropped, so overlapping
tiles never straddle train and val/test.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.config import Config, SceneConfig, SplitConfig, TilingConfig
from pipeline.errors import SatdetError
from pipeline.geo.grid import tile_windows
from pipeline.geo.raster import RasterInfo, check_bands, raster_info

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def block_edges(length: int, block: int) -> list[int]:
    """Block edges along one axis; a remainder thinner than half a block joins the previous block."""
    edges = list(range(0, length, block)) + [length]
    if len(edges) > 2 and length - edges[-2] < block / 2:
        del edges[-2]
    return edges


def _pixels(value: float, res: float, units: str) -> int:
    return round(value / res) if units == "m" else int(value)


def _split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """How many of n units go to val and test: at least one each when asked for, at least one for train."""
    n_val = max(1 if val_fraction > 0 else 0, round(val_fraction * n))
    n_test = max(1 if test_fraction > 0 else 0, round(test_fraction * n))
    while n_val + n_test > n - 1 and (n_val or n_test):
        if n_test >= n_val and n_test:
            n_test -= 1
        else:
            n_val -= 1
    return n_val, n_test


def _assign(n: int, val_fraction: float, test_fraction: float, rng: np.random.Generator) -> list[str]:
    n_val, n_test = _split_counts(n, val_fraction, test_fraction)
    order = rng.permutation(n)
    splits = ["train"] * n
    for rank, i in enumerate(order):
        splits[i] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    return splits


def plan_tiling(config: Config) -> dict[str, Any]:
    """Windows, blocks and splits for every scene of `config.tiling` (JSON-able)."""
    t = config.tiling
    if not t.scenes:
        raise SatdetError("config: tiling.scenes is empty; list at least one scene with image (and labels)")
    infos = _scene_infos(t)
    bands, tile, overlap = _common_grid(t, infos)
    scenes = [_scene_entry(i, scene, info, tile, overlap) for i, (scene, info) in enumerate(zip(t.scenes, infos))]
    rng = np.random.default_rng(config.seed)
    if t.split.method == "scene":
        _split_scenes(scenes, t.split, rng)
    else:
        _split_blocks(scenes, t.split, tile, tile - overlap, rng)
    _warn_missing_splits(scenes, t.split)
    return {
        "tile_size": tile, "overlap": overlap, "bands": bands, "dtype": infos[0].dtype, "channels": len(bands),
        "nodata": infos[0].nodata, "method": t.split.method, "scenes": scenes,
    }


def _scene_infos(t: TilingConfig) -> list[RasterInfo]:
    """Every scene's raster header; a one-line error when two scenes share a file stem (their id)."""
    infos = [raster_info(s.image) for s in t.scenes]
    stems = [i.stem for i in infos]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise SatdetError(f"{t.scenes[stems.index(dupes[0])].image}: two scenes share the file name "
                          f"{dupes[0]!r} (scene ids are file stems); rename one of the files")
    return infos


def _common_grid(t: TilingConfig, infos: list[RasterInfo]) -> tuple[list[int], int, int]:
    """(bands, tile size px, overlap px) shared by every scene; a one-line error naming the scene that
    differs in bands, pixel type or pixel size."""
    first = infos[0]
    bands = check_bands(t.bands, first)
    tile = overlap = 0
    for scene, info in zip(t.scenes, infos):
        check_bands(bands, info)
        if info.dtype != first.dtype:
            raise SatdetError(f"{scene.image}: pixel type {info.dtype} differs from {first.dtype} of "
                              f"{t.scenes[0].image}; convert the scenes to one type")
        if t.bands is None and info.count != first.count:
            raise SatdetError(f"{scene.image}: {info.count} bands but {t.scenes[0].image} has {first.count}; "
                              "pick common bands with tiling.bands")
        ts, ov = _pixels(t.tile_size, info.res[0], t.units), _pixels(t.overlap, info.res[0], t.units)
        if ts <= ov or ts < 1:
            raise SatdetError(f"{scene.image}: tile size {ts}px must exceed overlap {ov}px; fix tiling.tile_size")
        if tile and (ts, ov) != (tile, overlap):
            raise SatdetError(f"{scene.image}: {t.tile_size}{t.units} is {ts}px here but {tile}px in "
                              f"{t.scenes[0].image} (different pixel sizes); resample or use units: px")
        tile, overlap = ts, ov
    return bands, tile, overlap


def _scene_entry(index: int, scene: SceneConfig, info: RasterInfo, tile: int, overlap: int) -> dict[str, Any]:
    """A scene's entry in the plan, before its blocks and splits."""
    return {
        "index": index, "scene": info.stem, "image": str(scene.image),
        "labels": None if scene.labels is None else str(scene.labels),
        "width": info.width, "height": info.height, "crs": info.crs, "transform": list(info.transform),
        "nodata": info.nodata, "forced_split": scene.split,
        "n_windows": len(tile_windows(info.width, info.height, tile, overlap)),
    }


def _split_scenes(scenes: list[dict[str, Any]], split: SplitConfig, rng: np.random.Generator) -> None:
    """Whole scenes to splits: each scene one block, the scenes without a forced split assigned at random."""
    auto = [s for s in scenes if s["forced_split"] is None]
    for s, name in zip(auto, _assign(len(auto), split.val_fraction, split.test_fraction, rng)):
        s["forced_split"] = name
    for s in scenes:
        s["x_edges"], s["y_edges"] = [0, s["width"]], [0, s["height"]]
        s["block_splits"] = [[s["forced_split"]]]


def _split_blocks(scenes: list[dict[str, Any]], split: SplitConfig, tile: int, stride: int,
                  rng: np.random.Generator) -> None:
    """Spatial blocks to splits: every scene cut into blocks of whole tile strides (smaller ones when there
    are too few blocks for val and test), the blocks of scenes without a forced split assigned at random."""
    k_min = math.ceil(tile / stride)  # a block must hold at least one whole tile
    k = max(k_min, round(split.block_size / stride))
    needed = 1 + (split.val_fraction > 0) + (split.test_fraction > 0)
    while True:
        for s in scenes:
            s["x_edges"] = block_edges(s["width"], k * stride)
            s["y_edges"] = block_edges(s["height"], k * stride)
        n_auto = sum((len(s["x_edges"]) - 1) * (len(s["y_edges"]) - 1)
                     for s in scenes if s["forced_split"] is None)
        if n_auto >= needed or k == k_min:
            break
        k = max(k_min, k // 2)  # few, small scenes: smaller blocks so val and test get one each
    auto_splits = iter(_assign(n_auto, split.val_fraction, split.test_fraction, rng))
    for s in scenes:
        ny, nx = len(s["y_edges"]) - 1, len(s["x_edges"]) - 1
        s["block_splits"] = [[s["forced_split"] or next(auto_splits) for _ in range(nx)] for _ in range(ny)]
    block_px = k * stride
    if block_px != split.block_size:
        log.info("block size %dpx (tiling.split.block_size %d rounded to %d tile strides)",
                 block_px, split.block_size, k)


def _warn_missing_splits(scenes: list[dict[str, Any]], split: SplitConfig) -> None:
    present = {sp for s in scenes for row in s["block_splits"] for sp in row}
    for name, frac in (("val", split.val_fraction), ("test", split.test_fraction)):
        if frac > 0 and name not in present:
            log.warning("split %r gets no %s: too few scenes/blocks; add scenes or lower "
                        "tiling.split.block_size", name, "blocks" if split.method == "block" else "scenes")


def window_splits(scene: dict[str, Any], cols: Sequence[int], rows: Sequence[int], tile: int
                  ) -> list[list[str | None]]:
    """The split of every tile window (`[row index][col index]`), None where a window touches blocks of
    different splits (a straddler). The block ranges are found for all columns and rows at once; windows
    spanning the same blocks share one answer."""
    xe, ye = scene["x_edges"], scene["y_edges"]
    c, r = np.asarray(cols), np.asarray(rows)
    jx0 = np.searchsorted(xe, c, "right") - 1
    jx1 = np.searchsorted(xe, np.minimum(c + tile, scene["width"]), "left") - 1
    jy0 = np.searchsorted(ye, r, "right") - 1
    jy1 = np.searchsorted(ye, np.minimum(r + tile, scene["height"]), "left") - 1
    xs = list(zip(jx0.tolist(), jx1.tolist(), strict=True))
    blocks = scene["block_splits"]
    memo: dict[tuple[int, int, int, int], str | None] = {}

    def split_of(y0: int, y1: int, x0: int, x1: int) -> str | None:
        found = {blocks[jy][jx] for jy in range(y0, y1 + 1) for jx in range(x0, x1 + 1)}
        return found.pop() if len(found) == 1 else None

    out = []
    for y0, y1 in zip(jy0.tolist(), jy1.tolist(), strict=True):
        row = []
        for x0, x1 in xs:
            key = (y0, y1, x0, x1)
            if key not in memo:
                memo[key] = split_of(*key)
            row.append(memo[key])
        out.append(row)
    return out


def splits_json(plan: dict[str, Any]) -> dict[str, Any]:
    """The public splits.json: per scene its blocks (window + split)."""
    out = []
    for s in plan["scenes"]:
        xe, ye = s["x_edges"], s["y_edges"]
        blocks = [{"window": [xe[jx], ye[jy], xe[jx + 1] - xe[jx], ye[jy + 1] - ye[jy]],
                   "split": s["block_splits"][jy][jx]}
                  for jy in range(len(ye) - 1) for jx in range(len(xe) - 1)]
        out.append({"scene": s["scene"], "image": s["image"], "labels": s["labels"], "width": s["width"],
                    "height": s["height"], "crs": s["crs"], "blocks": blocks})
    return {"method": plan["method"], "tile_size": plan["tile_size"], "overlap": plan["overlap"], "scenes": out}


def window_pairs(boxes: np.ndarray, cols: Sequence[int], rows: Sequence[int], tile: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Every (box, window) touch as two arrays: box index, window number (row_index * len(cols) +
    col_index); sorted by window, boxes ascending within one. Binary search on the tile grid, vectorised."""
    cols_a, rows_a = np.asarray(cols), np.asarray(rows)
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    # tile j touches the box iff start_j < x1 and start_j + tile > x0
    ca, cb = np.searchsorted(cols_a, b[:, 0] - tile, "right"), np.searchsorted(cols_a, b[:, 2], "left")
    ra, rb = np.searchsorted(rows_a, b[:, 1] - tile, "right"), np.searchsorted(rows_a, b[:, 3], "left")
    nc, nr = np.clip(cb - ca, 0, None), np.clip(rb - ra, 0, None)
    n = nc * nr
    box = np.repeat(np.arange(len(b)), n)
    k = np.arange(len(box)) - np.repeat(np.cumsum(n) - n, n)  # pair number within its box
    ncb = np.maximum(np.repeat(nc, n), 1)
    key = (np.repeat(ra, n) + k // ncb) * len(cols_a) + np.repeat(ca, n) + k % ncb
    order = np.argsort(key, kind="stable")  # stable: box indices stay ascending within a window
    return box[order], key[order]
