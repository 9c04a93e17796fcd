"""The tiling stage: GeoTIFF scenes + labels → TFRecord tiles, manifest, stats, QA and splits.

    run_tiling(config, out_dir=None) -> tiles dir        the whole stage (scenes in parallel processes)
    tile_scene(config, scene_index, work_dir) -> Path    one scene (a Prefect task can map over these), or
                                                         one row block of it (pipeline.geo.blocks merges those)
    finalize_tiling(config, scene_outputs, out_dir)      merge scene outputs into the tiles dir

A scene is read in row strips one tile high by `_StripReader`, a thread that starts decoding at once (while
the labels are read and the tiles chosen) and stays up to LOOKAHEAD_BYTES ahead; reads end on block rows
and rows shared with the previous strip are copied, so every pixel is decoded once. Tiles are cut from the
strip, stored as raw bytes (or PNG, `tiling.encoding`) and handed to `_ShardWriter`, whose thread appends
them to per-split TFRecord parts — without TensorFlow. Memory is bounded by the strip buffers, whatever the
scene size. Everything is written into temporary folders that replace the output only when complete, so a
failure leaves no partial output. A GDAL read error in the reader thread (a corrupt or cut-short file) reaches
the caller, across the process pool too, as one SatdetError naming the file and the rows. Float nodata is
written as NaN (normalisation makes it the band mean: pipeline.data.stats).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import os
import queue
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Self

import cv2
import numpy as np
import rasterio
from rasterio.windows import Window

from pipeline.config import Config
from pipeline.data.records import RecordWriter, encode_tile_chunks, png_capable
from pipeline.data.stats import percentile_stats
from pipeline.errors import SatdetError
from pipeline.files import atomic_dir, atomic_write_json, atomic_write_text
from pipeline.geo.edges import EdgePolicy
from pipeline.geo.labels import read_labels
from pipeline.geo.plan import SPLITS, plan_tiling, splits_json, tile_starts, window_pairs, window_splits
from pipeline.geo.raster import READ_ERRORS, info_from_dataset, nodata_mask, open_raster, read_error

__all__ = ["EdgePolicy", "finalize_tiling", "plan_tiling", "run_tiling", "tile_scene"]

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
Progress = Callable[[int], None]


# ------------------------------------------------------------------------------------------ plan cache
def load_plan(config: Config, work_dir: Path) -> dict[str, Any]:
    """The plan, computed once per work dir (parallel scene tasks read the same file)."""
    path = work_dir / PLAN_FILE
    if path.exists():
        return json.loads(path.read_text())
    plan = plan_tiling(config)
    atomic_write_json(path, plan)
    return plan


# ------------------------------------------------------------------------------------------ one scene
class _ShardWriter:
    """Per-split TFRecord parts of one scene, each at most `shard_size` records.

    Records are written (framed, CRC'd, copied into the page cache) on a background thread, in order,
    while the caller cuts the next tiles: file writes release the GIL. At most `max_pending` records wait
    in memory; a write error is raised by a later `write` (once the queue is trimmed) or by `close`.
    """

    def __init__(self, folder: Path, shard_size: int, max_pending: int = 32) -> None:
        self.folder, self.shard_size, self.max_pending = folder, shard_size, max(2, max_pending)
        self.writers: dict[str, RecordWriter] = {}
        self.counts: dict[str, int] = {}
        self.parts: dict[str, list[str]] = {s: [] for s in SPLITS}
        self._thread = ThreadPoolExecutor(1)
        self._pending: list[Future[None]] = []

    def write(self, split: str, record: list[bytes]) -> str:
        n = self.counts.get(split, 0)
        if n % self.shard_size == 0:
            if split in self.writers:
                self._pending.append(self._thread.submit(self.writers[split].close))
            name = f"{split}-{len(self.parts[split]):05d}.tfrecord"
            self.parts[split].append(name)
            self.writers[split] = RecordWriter(self.folder / name)
        self._pending.append(self._thread.submit(self.writers[split].write, record))
        self.counts[split] = n + 1
        if len(self._pending) > self.max_pending:
            done, self._pending = self._pending[:-self.max_pending // 2], self._pending[-self.max_pending // 2:]
            for fut in done:
                fut.result()
        return self.parts[split][-1]

    def close(self) -> None:
        """Wait for the queued writes and close every file; the first write error is raised."""
        try:
            for fut in self._pending:
                fut.result()
        finally:
            self._thread.shutdown(wait=True)
            with contextlib.ExitStack() as files:  # every file is closed even if one close fails
                for w in self.writers.values():
                    files.callback(w.close)


def _select_tiles(scene: dict[str, Any], plan: dict[str, Any], config: Config, labels: Any
                  ) -> tuple[dict[tuple[int, int], dict[str, Any]], dict[str, int]]:
    """Decide, from geometry alone, which windows become tiles and which boxes they hold."""
    t = config.tiling
    tile = plan["tile_size"]
    width, height = scene["width"], scene["height"]
    cols, rows = tile_starts(width, tile, plan["overlap"]), tile_starts(height, tile, plan["overlap"])
    # every (box, window) touch judged at once; boxes are judged against the part of the window that
    # holds scene pixels (not the pad)
    box, key = window_pairs(labels.boxes, cols, rows, tile)
    wc, wr = np.asarray(cols)[key % len(cols)], np.asarray(rows)[key // len(cols)]
    res = EdgePolicy(t.min_visibility).apply(
        labels.boxes[box], (wc, wr, np.minimum(wc + tile, width), np.minimum(wr + tile, height)))
    n_win = len(cols) * len(rows)
    kept_key = key[res.index]
    n_kept = np.bincount(kept_key, minlength=n_win)
    n_clipped = np.bincount(kept_key, weights=res.clipped, minlength=n_win).astype(int)
    n_dropped = np.bincount(key[res.dropped], minlength=n_win)
    starts = np.concatenate([[0], np.cumsum(n_kept)])  # kept pairs stay sorted by window
    local = res.boxes - np.stack([wc, wr, wc, wr], axis=1)[res.index]
    kept_ids = labels.class_ids[box[res.index]]
    counts = {"straddling_dropped": 0, "empty_dropped": 0}
    candidates: dict[str, dict[str, list[dict[str, Any]]]] = {s: {"pos": [], "neg": []} for s in SPLITS}
    splits = window_splits(scene, cols, rows, tile)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            split = splits[i][j]
            if split is None:
                counts["straddling_dropped"] += 1
                continue
            w = i * len(cols) + j
            a, b = starts[w], starts[w + 1]
            entry = {
                "col": c, "row": r, "split": split, "boxes": local[a:b], "class_ids": kept_ids[a:b],
                "clipped": int(n_clipped[w]), "dropped": int(n_dropped[w]),
            }
            candidates[split]["pos" if b > a else "neg"].append(entry)
    rng = np.random.default_rng([config.seed, scene["index"]])
    selected: dict[tuple[int, int], dict[str, Any]] = {}
    for split in SPLITS:
        pos, neg = candidates[split]["pos"], candidates[split]["neg"]
        if split == "train":
            # Empty tiles per positive tile; a part of a scene without objects keeps that share of its tiles.
            k = min(len(neg), round(t.negative_ratio * (len(pos) or len(neg))))
        else:
            k = len(neg)  # val/test keep every empty tile: tile-level precision needs the real mix
        keep = set(rng.permutation(len(neg))[:k].tolist())
        counts["empty_dropped"] += len(neg) - len(keep)
        for e in pos + [n for i, n in enumerate(neg) if i in keep]:
            selected[(e["col"], e["row"])] = e
    return selected, counts


Strip = tuple[int, np.ndarray, "np.ndarray | None"]
LOOKAHEAD_BYTES = 32 * 2**20  # strip buffers read ahead of the tile writer (at least 3): flat in scene size


class _StripReader:
    """Strips (row_off, data (h, W, C), nodata mask (h, W) | None) of rows `rows[k]..+tile`, in order.

    A thread starts reading at once — while the caller still reads labels and picks tiles — and stays up to
    `LOOKAHEAD_BYTES` of strip buffers ahead; `want(rows)` (once the tiles are picked) makes it skip rows
    that hold no tile. GDAL decodes without the GIL, so reading overlaps the caller's Python work.

    Buffers are pixel-interleaved (the GeoTIFF's usual layout, so a tile is a cheap row-by-row copy rather
    than a band transpose); GDAL decodes into band planes that OpenCV interleaves (`_read_rows`). Reads end
    on block-row boundaries (a buffer holds up to one block row more than a strip), so no block is decoded
    twice, and rows already read for the previous strip are copied, not read again. A yielded strip stays valid until the iterator is advanced again. Close the reader
    (or use it as a context manager) so its thread stops.
    """

    def __init__(self, ds: Any, rows: list[int], tile: int, bands: list[int], dtype: str) -> None:
        self.ds, self.rows, self.tile, self.bands = ds, rows, tile, bands
        self.nan_fill = np.dtype(dtype).kind == "f"  # nodata pixels of float strips become NaN
        self.height, self.width = ds.height, ds.width
        block_h = ds.block_shapes[0][0] if ds.block_shapes else 1
        self.block_h = block_h if 1 < block_h <= tile else 1  # huge strips (untiled files): no alignment
        self.cap = min(self.height, tile + self.block_h - 1)
        nbytes = self.cap * self.width * len(bands) * np.dtype(dtype).itemsize
        n = max(3, min(16, LOOKAHEAD_BYTES // max(1, nbytes)))
        self._free: queue.Queue[np.ndarray] = queue.Queue()
        for _ in range(n):
            self._free.put(np.empty((self.cap, self.width, len(bands)), dtype))
        # band planes the reader decodes into before interleaving (multi-band only)
        self._planes = np.empty((len(bands), self.cap, self.width), dtype) if len(bands) > 1 else None
        self._done: queue.Queue[Any] = queue.Queue()
        self._wanted: set[int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="strip-reader", daemon=True)
        self._thread.start()

    def want(self, rows: set[int]) -> None:
        """From now on read only strips starting at these rows."""
        self._wanted = set(rows)

    def _run(self) -> None:
        prev: tuple[int, int, np.ndarray] | None = None  # (first row, rows held, buffer) of the last strip
        where = ""
        try:
            for r in self.rows:
                buf = self._take()
                if buf is None:
                    return
                wanted = self._wanted  # checked once a buffer is held: `want` may come while waiting for one
                if wanted is not None and r not in wanted:
                    self._free.put(buf)
                    continue
                h = min(r + self.tile, self.height) - r
                end = min(self.height, -(-(r + h) // self.block_h) * self.block_h, r + self.cap)
                start = r
                if prev is not None and prev[0] <= r < prev[0] + prev[1]:  # rows already read: copy
                    keep = min(prev[0] + prev[1], end) - r
                    buf[:keep] = prev[2][r - prev[0]:r - prev[0] + keep]
                    start = r + keep
                where = f"rows {start}-{end - 1}"
                if start < end:
                    self._read_rows(start, end, buf[start - r:end - r])
                prev = (r, end - r, buf)
                data = buf[:h]
                where = f"rows {r}-{r + h - 1} (mask)"
                mask = nodata_mask(self.ds, data.transpose(2, 0, 1), Window(0, r, self.width, h), self.bands)
                if self.nan_fill and mask is not None:
                    data[mask] = np.nan  # float nodata is NaN in the tiles: normalisation makes it the band mean
                self._done.put((r, data, mask, buf))
            self._done.put(None)
        except READ_ERRORS as exc:  # a corrupt or cut-short file: one line naming the rows, not a traceback
            self._done.put(read_error(self.ds.name, exc, where))
        except BaseException as exc:  # noqa: BLE001 (handed to the consumer, raised there)
            self._done.put(exc)

    def _read_rows(self, start: int, end: int, out: np.ndarray) -> None:
        """Rows start..end into `out` (h, W, C). GDAL decodes a pixel-interleaved file fastest into band
        planes (one third less CPU than into a pixel-interleaved buffer, measured); OpenCV interleaves the
        planes (contiguous rows: a SIMD pass). One band, or a dtype OpenCV lacks: GDAL fills `out` itself."""
        window = Window(0, start, self.width, end - start)
        if self._planes is not None:
            planes = self._planes[:, :end - start]
            self.ds.read(self.bands, window=window, out=planes)
            try:
                merged = cv2.merge(list(planes), dst=out)
            except cv2.error:
                merged = None
            if merged is not None and np.shares_memory(merged, out):
                return
            self._planes = None  # this OpenCV cannot interleave the dtype: from now on GDAL does
        self.ds.read(self.bands, window=window, out=out.transpose(2, 0, 1))  # a (C, h, W) view, filled in place

    def _take(self) -> np.ndarray | None:
        while not self._stop.is_set():
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def __iter__(self) -> Iterator[Strip]:
        held: np.ndarray | None = None
        while True:
            item = self._done.get()
            if held is not None:  # the caller is done with the previous strip: its buffer can be refilled
                self._free.put(held)
                held = None
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            r, data, mask, held = item
            yield r, data, mask

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cut(data: np.ndarray, mask: np.ndarray | None, col: int, tile: int, fill: float
         ) -> tuple[np.ndarray, np.ndarray | None, float]:
    """(tile (tile, tile, C) — a view of the strip unless padded —, valid-pixel mask or None when every
    pixel is valid, nodata fraction). Only a scene smaller than a tile is padded, with `fill`."""
    h = data.shape[0]
    piece = data[:, col:col + tile]
    pw = piece.shape[1]
    if h == tile and pw == tile:
        if mask is None:
            return piece, None, 0.0
        valid = ~mask[:, col:col + tile]
        return piece, valid, 1.0 - float(np.count_nonzero(valid)) / (tile * tile)
    out = np.full((tile, tile, data.shape[2]), fill, dtype=data.dtype)
    out[:h, :pw] = piece
    valid = np.zeros((tile, tile), bool)
    valid[:h, :pw] = True if mask is None else ~mask[:, col:col + tile]
    return out, valid, 1.0 - float(np.count_nonzero(valid)) / (tile * tile)


def scene_dir_name(scene_index: int, rows: tuple[int, int] | None = None) -> str:
    """The work folder of a scene (``scene-NNNN``) or of one of its row blocks (``scene-NNNN-rows-F-E``)."""
    return f"scene-{scene_index:04d}" + (f"-rows-{rows[0]:05d}-{rows[1]:05d}" if rows else "")


def sample_rng(config: Config, scene_index: int, draws: int, tile: int, per_tile: int) -> np.random.Generator:
    """The generator of a scene's stats pixel sample after `draws` tiles' draws: the k-th chosen tile of a scene
    gets the k-th draw whichever row block cuts it, so row blocks sample the same pixels as a whole scene."""
    rng = np.random.default_rng([config.seed, scene_index, 1])
    for _ in range(draws):
        rng.integers(0, tile * tile, per_tile)
    return rng


def trim_sample(arr: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """At most `limit` pixels of a scene's sample, picked by `rng` (after all the scene's tile draws)."""
    return arr[rng.permutation(len(arr))[:limit]] if len(arr) > limit else arr


def tile_scene(config: Config, scene_index: int, work_dir: Path, progress: Progress | None = None,
               rows: tuple[int, int] | None = None) -> Path:
    """Tile one scene into ``work_dir/scene-NNNN/`` (TFRecord parts, manifest lines, pixel sample, counts).

    `rows` = (first, end) tile-row indices: only the tiles of those rows, into ``scene-NNNN-rows-F-E/``, with the
    pixel sample untrimmed and the sample generator's state kept (pipeline.geo.blocks merges the blocks)."""
    work_dir = Path(work_dir)
    plan = load_plan(config, work_dir)
    scene = plan["scenes"][scene_index]
    t = config.tiling
    tile, bands = plan["tile_size"], plan["bands"]
    classes = list(config.classes)
    all_rows = tile_starts(scene["height"], tile, plan["overlap"])
    first, end = rows or (0, len(all_rows))
    if not 0 <= first < end <= len(all_rows):
        raise SatdetError(f"{scene['image']}: row block {first}-{end} is outside its {len(all_rows)} tile rows; "
                          "plan the tiling again")
    block_rows = all_rows[first:end]
    out_final = work_dir / scene_dir_name(scene_index, rows)
    # GDAL's block cache would otherwise keep every decoded block of the scene (up to 5% of RAM); strips
    # reuse their own rows, so the cache only needs the block rows under about two strips.
    itemsize = np.dtype(plan["dtype"]).itemsize
    cache_mb = max(64, math.ceil(2 * (tile + 512) * scene["width"] * len(bands) * itemsize / 2**20))
    # Of the cores a scene worker has, one cuts and writes tiles; GDAL decodes on the others (at least one).
    # On two cores one decode thread wins: GDAL's multi-threaded decode costs 60% more CPU (measured).
    cpus = os.cpu_count() or 1
    cores = max(1, cpus // max(1, min(t.workers or cpus, len(plan["scenes"]))))
    gdal_threads = max(1, cores - 1)
    with rasterio.Env(GDAL_CACHEMAX=cache_mb, GDAL_NUM_THREADS=gdal_threads), open_raster(scene["image"]) as ds:
        info = info_from_dataset(ds, scene["image"])
        # the reader starts on the pixels at once; the labels and the tile choice run meanwhile
        with _StripReader(ds, block_rows, tile, bands, plan["dtype"]) as strips:
            labels = read_labels(scene["labels"], info, classes, t.label_field)
            selected, counts = _select_tiles(scene, plan, config, labels)
            # the pad of a scene smaller than a tile: the nodata value (0 without one); NaN in float scenes,
            # like their nodata pixels, so that normalisation turns it into the band mean (0)
            fill = math.nan if np.dtype(plan["dtype"]).kind == "f" else scene["nodata"] or 0
            n_train = sum(e["split"] == "train" for e in selected.values())
            per_tile = math.ceil(t.stats_max_pixels / max(1, n_train))
            rng = sample_rng(config, scene_index, sum(r < block_rows[0] for _, r in selected), tile, per_tile)
            selected = {k: e for k, e in selected.items() if block_rows[0] <= k[1] <= block_rows[-1]}
            qa = {"kept": 0, "clipped": 0, "dropped": 0, "nodata_skipped": 0, "max_boxes": 0,
                  "tiles": {s: 0 for s in SPLITS}, "empty_kept": 0, "class_counts": {c: 0 for c in classes}}
            samples: dict[str, list[np.ndarray]] = {"train": [], "other": []}
            kept_ids: list[np.ndarray] = []
            strips.want({r for (_, r) in selected})
            by_row: dict[int, list[dict[str, Any]]] = {}
            for e in selected.values():
                by_row.setdefault(e["row"], []).append(e)
            skipped_windows = scene["n_windows"] // len(all_rows) * len(block_rows) - len(selected)
            if progress and skipped_windows:
                progress(skipped_windows)
            # PNG encoding is CPU-heavy and releases the GIL: spread it over threads. Raw is a memcpy: inline.
            png = t.encoding == "png" and png_capable(plan["dtype"], len(bands))
            encoders = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) if png else None

            def encode(item: tuple[dict[str, Any], np.ndarray]) -> list[bytes]:
                e, img = item
                return encode_tile_chunks(img, e["boxes"], e["class_ids"], e["id"], scene["scene"], t.encoding)

            with atomic_dir(out_final) as out:
                writer = _ShardWriter(out, t.shard_size)
                manifest: list[str] = []
                a, b, c0, d, e_, f = scene["transform"]
                try:
                    for r, data, mask in strips:
                        if r not in by_row:
                            continue
                        kept: list[tuple[dict[str, Any], np.ndarray]] = []
                        for e in sorted(by_row[r], key=lambda x: x["col"]):
                            col = e["col"]
                            # drawn for every chosen tile, also one skipped below: the k-th tile's draw stays
                            # the k-th however the scene is split into row blocks
                            pick = rng.integers(0, tile * tile, per_tile)
                            img, valid, nodata_fraction = _cut(data, mask, col, tile, fill)
                            if nodata_fraction > t.max_nodata_fraction:
                                qa["nodata_skipped"] += 1
                                continue
                            n = len(e["boxes"])
                            e["id"] = f"{scene['scene']}_{col}_{r}"
                            e["record"] = {
                                "id": e["id"], "scene": scene["scene"], "split": e["split"],
                                "window": [col, r, tile, tile],
                                "transform": [a, b, a * col + b * r + c0, d, e_, d * col + e_ * r + f],
                                "crs": scene["crs"], "n_boxes": n, "nodata_fraction": round(nodata_fraction, 6),
                            }
                            qa["tiles"][e["split"]] += 1
                            qa["empty_kept"] += n == 0
                            qa["kept"] += n
                            qa["clipped"] += e["clipped"]
                            qa["dropped"] += e["dropped"]
                            qa["max_boxes"] = max(qa["max_boxes"], n)
                            kept_ids.append(e["class_ids"])
                            # sampled pixel positions minus nodata ones: no copy of the tile
                            if valid is not None:
                                pick = pick[valid.ravel()[pick]]
                            samples["train" if e["split"] == "train" else "other"].append(img[pick // tile, pick % tile])
                            kept.append((e, img))

                        # every tile of the strip is encoded before the strip buffer can be reused
                        records = list(encoders.map(encode, kept)) if encoders else [encode(k) for k in kept]
                        for (e, _), record in zip(kept, records, strict=True):
                            manifest.append(json.dumps({**e["record"], "shard": writer.write(e["split"], record)}))
                        if progress:
                            progress(len(by_row[r]))
                finally:
                    try:
                        writer.close()
                    finally:
                        if encoders:
                            encoders.shutdown()
                per_class = np.bincount(np.concatenate([np.zeros(0, np.int64), *kept_ids]), minlength=len(classes) + 1)
                qa["class_counts"] = {c: int(per_class[i + 1]) for i, c in enumerate(classes)}
                atomic_write_text(out / "manifest.jsonl", "".join(m + "\n" for m in manifest))
                for key, arrs in samples.items():  # a row block's sample is trimmed when the blocks merge
                    arr = np.concatenate(arrs) if arrs else np.zeros((0, len(bands)), np.float64)
                    np.save(out / f"sample_{key}.npy", arr if rows else trim_sample(arr, t.stats_max_pixels, rng))
                atomic_write_json(out / "scene.json", {
                    "index": scene_index, "scene": scene["scene"], "parts": writer.parts, "qa": qa,
                    "straddling_dropped": counts["straddling_dropped"], "empty_dropped": counts["empty_dropped"],
                    "invalid_geometries": labels.invalid_geometries,
                    "labels_outside_raster": labels.labels_outside_raster,
                    "objects": {c: int((labels.class_ids == i + 1).sum()) for i, c in enumerate(classes)},
                    "warnings": labels.warnings, "rows": [first, end], "sample_rng": rng.bit_generator.state,
                })
    return out_final


# ------------------------------------------------------------------------------------------ merge
# a scene manifest line's shard (tile_scene writes the "shard" key last)
SHARD_KEY = re.compile(r'"shard": "([^"\\]+)"\}$', re.MULTILINE)


def _stats(samples: np.ndarray, plan: dict[str, Any], percentiles: tuple[float, float]) -> dict[str, Any]:
    """Per-band low/high percentiles and mean/std of the clipped pixels (the normalisation contract)."""
    if len(samples):
        low, high, mean, std = percentile_stats(samples, percentiles)
    else:
        low = high = mean = np.zeros(plan["channels"])
        std = np.ones(plan["channels"])
    return {
        "dtype": plan["dtype"], "bands": plan["bands"], "channels": plan["channels"], "nodata": plan["nodata"],
        "tile_size": plan["tile_size"], "percentiles": list(percentiles),
        "low": low.tolist(), "high": high.tolist(), "mean": mean.tolist(), "std": std.tolist(),
        "pixels_sampled": len(samples),
    }


def _link(src: Path, dst: Path) -> None:
    """Hard-link (free, keeps the scene outputs for a retried finalize) or copy across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def finalize_tiling(config: Config, scene_outputs: list[Path], out_dir: Path) -> Path:
    """Merge per-scene outputs into `out_dir`: numbered shards, manifest.jsonl, stats/qa/splits.json."""
    out_dir = Path(out_dir)
    scene_outputs = [Path(p) for p in scene_outputs]
    if not scene_outputs:
        raise SatdetError("config: no scenes were tiled; list scenes under tiling.scenes")
    plan = json.loads((scene_outputs[0].parent / PLAN_FILE).read_text())
    metas = sorted(((json.loads((p / "scene.json").read_text()), p) for p in scene_outputs),
                   key=lambda mp: mp[0]["index"])
    classes = list(config.classes)
    total = sum(sum(m["qa"]["tiles"].values()) for m, _ in metas)
    if total == 0:
        raise SatdetError(f"{config.tiling.scenes[0].image}: no tile was kept (all empty, nodata or straddling); "
                          "raise tiling.negative_ratio / max_nodata_fraction or check the labels")
    with atomic_dir(out_dir) as tmp:
        renames: dict[tuple[int, str], str] = {}
        for split in SPLITS:
            parts = [(m["index"], p / name) for m, p in metas for name in m["parts"][split]]
            for k, (index, src) in enumerate(parts):
                name = f"{split}-{k:05d}-of-{len(parts):05d}.tfrecord"
                _link(src, tmp / name)
                renames[(index, src.name)] = name
        with open(tmp / "manifest.jsonl", "w") as fh:
            for m, p in metas:
                # scene lines end with their part's name ("shard" is written last; JSON escapes quotes inside
                # values, so only that key matches): rename by text, not by decoding and re-encoding each line
                text = (p / "manifest.jsonl").read_text()
                text, n = SHARD_KEY.subn(lambda g, i=m["index"]: f'"shard": "{renames[(i, g[1])]}"}}', text)
                if n != text.count("\n") or (text and not text.endswith("\n")):
                    raise SatdetError(f"{p / 'manifest.jsonl'}: a line lacks its shard; tile the scene again")
                fh.write(text)

        warnings = [w for m, _ in metas for w in m["warnings"]]
        train = [np.load(p / "sample_train.npy") for _, p in metas]
        samples = np.concatenate(train) if train else np.zeros((0, plan["channels"]))
        if len(samples) == 0:
            warnings.append("no training tiles: stats.json computed from the val/test tiles")
            samples = np.concatenate([np.load(p / "sample_other.npy") for _, p in metas])
        atomic_write_json(tmp / "stats.json", _stats(samples, plan, tuple(config.tiling.stats_percentiles)))

        def total_of(key: str) -> int:
            return int(sum(m[key] for m, _ in metas))

        qa = {
            "boxes": {k: int(sum(m["qa"][k] for m, _ in metas)) for k in ("kept", "clipped", "dropped")},
            "tiles": {
                **{s: int(sum(m["qa"]["tiles"][s] for m, _ in metas)) for s in SPLITS},
                "empty_kept": int(sum(m["qa"]["empty_kept"] for m, _ in metas)),
                "empty_dropped": total_of("empty_dropped"),
                "nodata_skipped": int(sum(m["qa"]["nodata_skipped"] for m, _ in metas)),
                "straddling_dropped": total_of("straddling_dropped"),
            },
            "class_counts": {c: int(sum(m["qa"]["class_counts"][c] for m, _ in metas)) for c in classes},
            "objects": {c: int(sum(m["objects"][c] for m, _ in metas)) for c in classes},
            "max_boxes_per_tile": int(max(m["qa"]["max_boxes"] for m, _ in metas)),
            "invalid_geometries": total_of("invalid_geometries"),
            "labels_outside_raster": total_of("labels_outside_raster"),
            "scenes": {m["scene"]: {**m["qa"]["tiles"], "boxes": m["qa"]["kept"]} for m, _ in metas},
            "warnings": warnings,
        }
        atomic_write_json(tmp / "qa.json", qa)
        atomic_write_json(tmp / "splits.json", splits_json(plan))
    return out_dir


# ------------------------------------------------------------------------------------------ whole stage
def _progress_bar(total: int):  # type: ignore[no-untyped-def]
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    return Progress(TextColumn("tiling"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=True, disable=not console.is_terminal), total


def _run_parallel(config: Config, work: Path, n_scenes: int, workers: int, advance: Progress) -> list[Path]:
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold TF/GDAL threads
    with ctx.Manager() as manager, ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        queue = manager.Queue()
        futures = [pool.submit(_tile_scene_queued, config, i, work, queue) for i in range(n_scenes)]
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, timeout=0.2)
                while not queue.empty():
                    advance(queue.get())
                for fut in done:
                    fut.result()  # re-raise a scene's error at once
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
        return [f.result() for f in futures]


def _tile_scene_queued(config: Config, index: int, work: Path, queue: Any) -> Path:
    return tile_scene(config, index, work, progress=queue.put)


def run_tiling(config: Config, out_dir: Path | None = None) -> Path:
    """Tile every scene of `config.tiling` into `out_dir` (default ``config.run_dir/tiles``); returns it.

    Scenes run in parallel processes (``tiling.workers``; paths are passed, never open datasets). On any
    error nothing is left behind: outputs are assembled in temp folders and renamed into place at the end.
    """
    out_dir = Path(out_dir) if out_dir is not None else config.run_dir / "tiles"
    created = [p for p in [out_dir.parent, *out_dir.parent.parents] if not p.exists()]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.work-"))
    try:
        plan = load_plan(config, work)
        n = len(plan["scenes"])
        workers = min(config.tiling.workers or os.cpu_count() or 1, n)
        bar, total = _progress_bar(sum(s["n_windows"] for s in plan["scenes"]))
        with bar:
            task = bar.add_task("tiles", total=total)

            def advance(k: int) -> None:
                bar.advance(task, k)

            if workers <= 1:
                outputs = [tile_scene(config, i, work, progress=advance) for i in range(n)]
            else:
                outputs = _run_parallel(config, work, n, workers, advance)
        finalize_tiling(config, outputs, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        for p in created:  # folders this call made, now empty: leave no trace
            try:
                p.rmdir()
            except OSError:
                break
        raise
    shutil.rmtree(work, ignore_errors=True)
    return out_dir


def summary_lines(tiles_dir: Path) -> list[str]:
    """A short human summary of a tiling run (for the CLI)."""
    qa = json.loads((Path(tiles_dir) / "qa.json").read_text())
    t, b = qa["tiles"], qa["boxes"]
    lines = [
        (
            f"tiles: train {t['train']}, val {t['val']}, test {t['test']} (empty kept {t['empty_kept']}, "
            f"empty dropped {t['empty_dropped']}, nodata skipped {t['nodata_skipped']}, "
            f"straddling dropped {t['straddling_dropped']})"
        ),
        (
            f"boxes: kept {b['kept']} (clipped {b['clipped']}), dropped at edges {b['dropped']}; "
            f"max per tile {qa['max_boxes_per_tile']}"
        ),
        "classes: " + ", ".join(f"{k} {v}" for k, v in qa["class_counts"].items()),
    ]
    if qa["invalid_geometries"] or qa["labels_outside_raster"]:
        lines.append(f"skipped labels: {qa['invalid_geometries']} invalid geometries, "
                     f"{qa['labels_outside_raster']} outside the raster")
    lines += [f"warning: {w}" for w in qa.get("warnings", [])]
    lines.append(f"written: {tiles_dir}")
    return lines
