"""Which windows of a scene become tiles and which boxes they hold — from geometry and labels alone,
before any pixel is read, so every row block of a scene makes the same choice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from pipeline.config import Config
from pipeline.geo.edges import EdgePolicy
from pipeline.geo.grid import tile_starts
from pipeline.geo.plan import SPLITS, window_pairs, window_splits


@dataclass
class ChosenTile:
    """A window chosen to become a tile: where it is, its split, the boxes it holds (tile pixels) and how
    many boxes its edges clipped or dropped."""

    col: int
    row: int
    split: str
    boxes: np.ndarray  # (n, 4) float x0, y0, x1, y1 in the tile's pixels
    class_ids: np.ndarray  # (n,) 1-based
    clipped: int  # boxes kept, cut by the window edge
    dropped: int  # boxes cut by the window edge below tiling.min_visibility


class _WindowBoxes(NamedTuple):
    """The boxes every window keeps: window w holds boxes[starts[w]:starts[w + 1]]."""

    starts: np.ndarray
    boxes: np.ndarray  # window pixels
    class_ids: np.ndarray
    clipped: np.ndarray  # per window
    dropped: np.ndarray  # per window


def select_tiles(scene: dict[str, Any], plan: dict[str, Any], config: Config, labels: Any
                 ) -> tuple[dict[tuple[int, int], ChosenTile], dict[str, int]]:
    """The chosen tiles by (col, row), and the windows left out: {"straddling_dropped", "empty_dropped"}."""
    tile = plan["tile_size"]
    cols = tile_starts(scene["width"], tile, plan["overlap"])
    rows = tile_starts(scene["height"], tile, plan["overlap"])
    judged = _judge_boxes(scene, labels, cols, rows, tile, config.tiling.min_visibility)
    candidates, straddling = _candidates(scene, cols, rows, tile, judged)
    rng = np.random.default_rng([config.seed, scene["index"]])
    selected, empty_dropped = _keep_negatives(candidates, config.tiling.negative_ratio, rng)
    return selected, {"straddling_dropped": straddling, "empty_dropped": empty_dropped}


def _judge_boxes(scene: dict[str, Any], labels: Any, cols: list[int], rows: list[int], tile: int,
                 min_visibility: float) -> _WindowBoxes:
    """Every (box, window) touch judged at once by the edge policy; boxes are judged against the part of
    the window that holds scene pixels (not the pad)."""
    box, key = window_pairs(labels.boxes, cols, rows, tile)
    wc, wr = np.asarray(cols)[key % len(cols)], np.asarray(rows)[key // len(cols)]
    res = EdgePolicy(min_visibility).apply(
        labels.boxes[box], (wc, wr, np.minimum(wc + tile, scene["width"]), np.minimum(wr + tile, scene["height"])))
    n_win = len(cols) * len(rows)
    kept_key = key[res.index]
    n_kept = np.bincount(kept_key, minlength=n_win)
    return _WindowBoxes(
        starts=np.concatenate([[0], np.cumsum(n_kept)]),  # kept pairs stay sorted by window
        boxes=res.boxes - np.stack([wc, wr, wc, wr], axis=1)[res.index],
        class_ids=labels.class_ids[box[res.index]],
        clipped=np.bincount(kept_key, weights=res.clipped, minlength=n_win).astype(int),
        dropped=np.bincount(key[res.dropped], minlength=n_win),
    )


def _candidates(scene: dict[str, Any], cols: list[int], rows: list[int], tile: int, judged: _WindowBoxes
                ) -> tuple[dict[str, dict[str, list[ChosenTile]]], int]:
    """Every window of one split as a candidate, positive (holds a box) or negative, per split; and how
    many windows straddle blocks of two splits (never tiles)."""
    candidates: dict[str, dict[str, list[ChosenTile]]] = {s: {"pos": [], "neg": []} for s in SPLITS}
    straddling = 0
    splits = window_splits(scene, cols, rows, tile)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            split = splits[i][j]
            if split is None:
                straddling += 1
                continue
            w = i * len(cols) + j
            a, b = judged.starts[w], judged.starts[w + 1]
            candidate = ChosenTile(col=c, row=r, split=split, boxes=judged.boxes[a:b],
                                   class_ids=judged.class_ids[a:b], clipped=int(judged.clipped[w]),
                                   dropped=int(judged.dropped[w]))
            candidates[split]["pos" if b > a else "neg"].append(candidate)
    return candidates, straddling


def _keep_negatives(candidates: dict[str, dict[str, list[ChosenTile]]], negative_ratio: float,
                    rng: np.random.Generator) -> tuple[dict[tuple[int, int], ChosenTile], int]:
    """Every positive candidate and a random share of the negative ones; how many negatives were dropped."""
    selected: dict[tuple[int, int], ChosenTile] = {}
    empty_dropped = 0
    for split in SPLITS:
        pos, neg = candidates[split]["pos"], candidates[split]["neg"]
        if split == "train":
            # Empty tiles per positive tile; a part of a scene without objects keeps that share of its tiles.
            k = min(len(neg), round(negative_ratio * (len(pos) or len(neg))))
        else:
            k = len(neg)  # val/test keep every empty tile: tile-level precision needs the real mix
        keep = set(rng.permutation(len(neg))[:k].tolist())
        empty_dropped += len(neg) - len(keep)
        for chosen in pos + [n for i, n in enumerate(neg) if i in keep]:
            selected[(chosen.col, chosen.row)] = chosen
    return selected, empty_dropped
