"""Full-scene inference: stream overlapping windows through an exported detector, stitch, merge.

    predict_scenes(export_dir, scenes, out, cfg) -> list[Path]        (CLI `satdet predict`)
    predict_region(detector, scene, cfg, region=None) -> SceneDetections  (one scene or a sub-window of it)

Memory is bounded regardless of scene size: a reader thread reads windows with rasterio (one window per
read) into a queue of at most two batches, while the main thread runs the model; only the boxes are
kept for the whole scene. A read error (corrupt or cut-short file) arrives as one SatdetError naming the
file and the window. Nodata pixels of float scenes are handed to the model as the training mean (0 after
normalisation), never as NaN.

Windows: `tile_size` (None → the size the model was trained on) with `overlap`; the last row/column is
shifted inward so every window lies inside the scene (or the region); a scene smaller than a window is
sent as it is (the exported model pads it to its tile size after normalising) and boxes are clipped to it.

Per window, after the model:
1. boxes below `score_threshold` are dropped; boxes are clipped to the pixels actually read;
2. boxes lying mostly over nodata (fraction of the box area > `max_nodata_fraction`) are dropped;
3. the seam rule: a box that touches an *interior* edge of its window (an edge with a neighbouring
   window beyond it; scene/region edges never count) within `edge_tolerance` px, and that lies inside
   the overlap strip along that edge and clear of the strip's far side by more than the tolerance, is
   dropped. The neighbouring window contains that whole strip and more, so it sees the same object at
   least as completely — in full when the object is no larger than the overlap — and, because the box
   is clear of its edge, does not drop it: of two windows sharing a seam at most one drops a box.
   Objects larger than the overlap are seen truncated by every window; their fragments are kept and
   left to the merge (choose `overlap` ≥ the largest object to avoid that);
4. boxes are shifted to scene pixels.
Across windows, boxes that touch an overlap strip (the only places where duplicates can occur) are
merged with class-aware NMS or WBF (`merge`, `merge_iou`); boxes away from the strips pass untouched.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.config import PredictConfig
from pipeline.errors import SatdetError
from pipeline.predict.merge import merge_boxes

log = logging.getLogger(__name__)

WindowProgress = Callable[[int, int, float], None]  # (windows done, windows total, scene pixels done)


class Detector(Protocol):
    """What scene inference needs from a model: `.info` (model_info.json) and batch prediction on raw pixels."""

    info: dict[str, Any]

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]: ...


@dataclass
class SceneDetections:
    """Merged detections of one scene (or region) in scene pixel coordinates, plus its georeferencing."""

    scene: str
    path: str
    boxes: np.ndarray  # (N, 4) float64 x0, y0, x1, y1 scene pixels
    scores: np.ndarray  # (N,)
    labels: np.ndarray  # (N,) int64 1-based
    class_names: list[str]
    crs: str | None
    transform: tuple[float, float, float, float, float, float]
    region: tuple[int, int, int, int]  # col_off, row_off, width, height predicted over
    windows: int = 0
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.boxes)


@dataclass(frozen=True)
class _Window:
    col: int
    row: int
    width: int  # pixels actually read (< size only when the region is smaller than a window)
    height: int
    # Interior seams: where the neighbouring window starts/ends (None at scene/region edges).
    left_end: int | None  # previous column's right edge (scene px)
    right_start: int | None  # next column's left edge
    top_end: int | None
    bottom_start: int | None


def window_offsets(start: int, length: int, size: int, overlap: int) -> list[int]:
    """Window origins covering [start, start+length): stride size-overlap, the last shifted inward."""
    if length <= size:
        return [start]
    stride = max(size - overlap, 1)
    offs = list(range(start, start + length - size, stride))
    offs.append(start + length - size)
    return sorted(set(offs))


def plan_windows(region: tuple[int, int, int, int], size: int, overlap: int) -> list[_Window]:
    """All windows over `region` (col_off, row_off, width, height), row by row."""
    c0, r0, w, h = region
    cols = window_offsets(c0, w, size, overlap)
    rows = window_offsets(r0, h, size, overlap)
    ww, hh = min(size, w), min(size, h)
    out = []
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            out.append(_Window(
                c, r, ww, hh,
                left_end=cols[j - 1] + ww if j > 0 else None,
                right_start=cols[j + 1] if j + 1 < len(cols) else None,
                top_end=rows[i - 1] + hh if i > 0 else None,
                bottom_start=rows[i + 1] if i + 1 < len(rows) else None,
            ))
    return out


# --------------------------------------------------------------------------------------------- model
def resolve_export_dir(path: str | Path) -> Path:
    """Accept an export folder or a model folder holding `export/`; anything else is a SatdetError."""
    path = Path(path)
    for candidate in (path, path / "export"):
        if (candidate / "model_info.json").is_file():
            return candidate
    if not path.exists():
        raise SatdetError(f"{path}: model folder not found; pass runs/<name>/model/export (or runs/<name>/model)")
    raise SatdetError(f"{path}: not a satdet model export (no model_info.json); pass the export/ folder written "
                      "by training (runs/<name>/model/export)")


def load_detector(export_dir: str | Path) -> Detector:
    """Load an exported model (pipeline.model.export.load_exported) after checking it is an export."""
    export_dir = resolve_export_dir(export_dir)  # a clear error before TensorFlow is even imported
    from pipeline.model.export import load_exported

    return load_exported(export_dir)


DEFAULT_OUTPUT_THRESHOLD = 0.3  # for exports without a validation-calibrated threshold


def output_threshold(cfg: PredictConfig, info: dict[str, Any]) -> float:
    """predict.score_threshold, or when unset the export's calibrated threshold (model_info.json), else 0.3."""
    if cfg.score_threshold is not None:
        return float(cfg.score_threshold)
    calibrated = (info.get("output_threshold") or {}).get("score_threshold")
    return float(calibrated) if calibrated is not None else DEFAULT_OUTPUT_THRESHOLD


def model_bands(info: dict[str, Any]) -> list[int]:
    """1-based source band indices the model was trained on."""
    bands = info.get("bands") or (info.get("stats") or {}).get("bands")
    return [int(b) for b in bands] if bands else list(range(1, int(info["channels"]) + 1))


def check_scene(ds: Any, path: str | Path, info: dict[str, Any]) -> list[int]:
    """Band count and dtype of the scene against the model; returns the bands to read."""
    bands = model_bands(info)
    want_dtype = str(info.get("dtype") or (info.get("stats") or {}).get("dtype"))
    if max(bands) > ds.count:
        raise SatdetError(f"{path}: scene has {ds.count} band(s) but the model was trained on bands {bands} "
                          f"({len(bands)} channels); predict on imagery with the training bands")
    if ds.dtypes[0] != want_dtype:
        raise SatdetError(f"{path}: scene dtype is {ds.dtypes[0]} but the model was trained on {want_dtype} "
                          "pixels; convert the scene (e.g. gdal_translate -ot) or retrain on this dtype")
    return bands


# --------------------------------------------------------------------------------------------- reading
def _read_batches(path: str, windows: Sequence[_Window], bands: list[int], size: int, batch: int,
                  out: queue.Queue, stop: threading.Event, fill: Sequence[float] | None = None) -> None:
    """Reader thread: (images, nodata masks, windows) per batch, then None. Errors are forwarded; a GDAL
    read error as a one-line SatdetError naming the window.

    Nodata pixels of float scenes (NaN, the nodata value, masked) get `fill` (per band; None: NaN, which
    `pipeline.data.stats.normalize` turns into the band mean); integer pixels are passed as read.
    """
    from rasterio.windows import Window

    from pipeline.geo.raster import nodata_mask, open_raster, read_window

    try:
        with open_raster(path) as ds:
            floating = np.dtype(ds.dtypes[0]).kind == "f"
            fill_col = (np.full((len(bands), 1), np.nan) if fill is None
                        else np.asarray(fill, np.float64).reshape(-1, 1))
            for k in range(0, len(windows), batch):
                chunk = windows[k:k + batch]
                # Windows are `size` square unless the region is smaller: then the window is the region
                # itself, and padding is left to the detector (the export pads after normalising).
                hh, ww = chunk[0].height, chunk[0].width
                images = np.zeros((len(chunk), hh, ww, len(bands)), ds.dtypes[0])
                masks = np.zeros((len(chunk), hh, ww), bool)
                for n, w in enumerate(chunk):
                    win = Window(w.col, w.row, w.width, w.height)
                    data = read_window(ds, win, bands)  # a read error names the file and the window
                    m = nodata_mask(ds, data, win, bands)
                    if floating and m is not None and m.any():
                        data[:, m] = fill_col  # NaN never reaches the model
                    images[n, :w.height, :w.width] = np.moveaxis(data, 0, -1)
                    masks[n, :w.height, :w.width] = False if m is None else m
                while not stop.is_set():
                    try:
                        out.put((images, masks, chunk), timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        out.put(None)
    except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
        out.put(err)


def _batches(path: str, windows: Sequence[_Window], bands: list[int], size: int, batch: int,
             fill: Sequence[float] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, Sequence[_Window]]]:
    """(images, nodata masks, windows) per batch, read ahead by a thread; its errors are raised here."""
    q: queue.Queue = queue.Queue(maxsize=2)  # at most two batches in flight: flat memory
    stop = threading.Event()
    t = threading.Thread(target=_read_batches, args=(path, windows, bands, size, batch, q, stop, fill),
                         daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join(timeout=5)


def _fill(info: dict[str, Any], bands: list[int]) -> list[float]:
    """Raw per-band value for nodata pixels of float scenes: the training mean (0 after normalisation);
    0 when the model carries no statistics."""
    mean = (info.get("stats") or {}).get("mean")
    if mean is None or len(mean) != len(bands) or not np.all(np.isfinite(mean)):
        return [0.0] * len(bands)
    return [float(v) for v in mean]


# --------------------------------------------------------------------------------------------- per window
def _nodata_fraction(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Fraction of each box's whole pixels that are nodata, via an integral image (boxes in window px)."""
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, 0), 1)
    x0 = np.floor(boxes[:, 0]).astype(int)
    y0 = np.floor(boxes[:, 1]).astype(int)
    x1 = np.maximum(np.ceil(boxes[:, 2]).astype(int), x0 + 1)
    y1 = np.maximum(np.ceil(boxes[:, 3]).astype(int), y0 + 1)
    x1, y1 = np.minimum(x1, mask.shape[1]), np.minimum(y1, mask.shape[0])
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / np.maximum((x1 - x0) * (y1 - y0), 1)


def _seam_drop(b: np.ndarray, w: _Window, tol: float) -> np.ndarray:
    """The seam rule (module docstring, step 3) for boxes `b` in scene pixels."""
    drop = np.zeros(len(b), bool)
    right, bottom = w.col + w.width, w.row + w.height
    # "Inside the strip" is strict by the same tolerance, so the neighbour never counts that box as
    # touching its own facing edge: of two windows sharing a seam, at most one drops a given box.
    if w.right_start is not None:
        drop |= (b[:, 2] >= right - tol) & (b[:, 0] > w.right_start + tol)
    if w.left_end is not None:
        drop |= (b[:, 0] <= w.col + tol) & (b[:, 2] < w.left_end - tol)
    if w.bottom_start is not None:
        drop |= (b[:, 3] >= bottom - tol) & (b[:, 1] > w.bottom_start + tol)
    if w.top_end is not None:
        drop |= (b[:, 1] <= w.row + tol) & (b[:, 3] < w.top_end - tol)
    return drop


def _in_strip(b: np.ndarray, w: _Window) -> np.ndarray:
    """True for boxes touching an overlap strip of `w` (where other windows may report them too)."""
    hit = np.zeros(len(b), bool)
    if w.right_start is not None:
        hit |= b[:, 2] > w.right_start
    if w.left_end is not None:
        hit |= b[:, 0] < w.left_end
    if w.bottom_start is not None:
        hit |= b[:, 3] > w.bottom_start
    if w.top_end is not None:
        hit |= b[:, 1] < w.top_end
    return hit


def _window_boxes(out: dict[str, np.ndarray], n: int, mask: np.ndarray, w: _Window, cfg: PredictConfig
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    k = int(out["num_detections"][n]) if "num_detections" in out else len(out["scores"][n])
    boxes = np.asarray(out["boxes"][n][:k], np.float64).reshape(-1, 4)
    scores = np.asarray(out["scores"][n][:k], np.float64)
    labels = np.asarray(out["classes"][n][:k], np.int64)
    keep = scores >= cfg.score_threshold
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, w.width)  # never report pad pixels
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, w.height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if mask.any() and keep.any():
        keep[keep] = _nodata_fraction(mask, boxes[keep]) <= cfg.max_nodata_fraction
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    boxes = boxes + np.array([w.col, w.row, w.col, w.row], np.float64)
    keep = ~_seam_drop(boxes, w, cfg.edge_tolerance)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    return boxes, scores, labels, _in_strip(boxes, w)


def _stitch(kept: list[tuple[np.ndarray, ...]], seam: list[tuple[np.ndarray, ...]], cfg: PredictConfig
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All windows' boxes, scores and labels: those away from the strips as they are, the strip ones merged."""

    def cat(parts: list[tuple[np.ndarray, ...]], i: int, shape: tuple[int, ...]) -> np.ndarray:
        return np.concatenate([p[i] for p in parts]) if parts else np.zeros(shape)

    sb, ss, sl = merge_boxes(cat(seam, 0, (0, 4)), cat(seam, 1, (0,)), cat(seam, 2, (0,)),
                             cfg.merge, cfg.merge_iou)
    boxes = np.concatenate([cat(kept, 0, (0, 4)), sb])
    scores = np.concatenate([cat(kept, 1, (0,)), ss])
    return boxes, scores, np.concatenate([cat(kept, 2, (0,)), sl]).astype(np.int64)


# --------------------------------------------------------------------------------------------- public
def predict_region(
    detector: Detector,
    scene: str | Path,
    cfg: PredictConfig,
    region: tuple[int, int, int, int] | None = None,
    progress: WindowProgress | None = None,
) -> SceneDetections:
    """Detections over a whole scene, or over `region` (col_off, row_off, width, height) of it.

    Region edges are treated like scene edges (boxes touching them are kept, clipped to the region).
    """
    from pipeline.geo.raster import crs_string, open_raster

    info = detector.info
    if cfg.score_threshold is None:
        cfg = cfg.model_copy(update={"score_threshold": output_threshold(cfg, info)})
    size = int(cfg.tile_size or info["tile_size"])
    with open_raster(scene) as ds:
        bands = check_scene(ds, scene, info)
        t = ds.transform
        crs = crs_string(ds.crs)
        width, height = ds.width, ds.height
    region = region or (0, 0, width, height)
    c0, r0, rw, rh = (int(v) for v in region)
    if rw <= 0 or rh <= 0 or c0 < 0 or r0 < 0 or c0 + rw > width or r0 + rh > height:
        raise SatdetError(f"{scene}: region {region} is not inside the {width}x{height} scene")
    overlap = cfg.overlap
    if overlap >= size:  # e.g. the default 64 px with a 64 px model: keep going with a usable overlap
        overlap = size // 4
        log.warning("predict.overlap %d >= window size %d; using %d", cfg.overlap, size, overlap)
    windows = plan_windows((c0, r0, rw, rh), size, overlap)
    started = time.perf_counter()
    kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    seam: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    done = 0
    for images, masks, chunk in _batches(str(scene), windows, bands, size, cfg.batch_size, _fill(info, bands)):
        out = detector.predict(images)
        out = {k: np.asarray(v) for k, v in out.items()}
        for n, w in enumerate(chunk):
            b, s, lab, strip = _window_boxes(out, n, masks[n], w, cfg)
            kept.append((b[~strip], s[~strip], lab[~strip]))
            seam.append((b[strip], s[strip], lab[strip]))
        done += len(chunk)
        if progress is not None:
            progress(done, len(windows), rw * rh * done / len(windows))

    boxes, scores, labels = _stitch(kept, seam, cfg)
    order = np.argsort(-scores, kind="stable")
    return SceneDetections(
        scene=Path(str(scene)).stem, path=str(scene), boxes=boxes[order], scores=scores[order],
        labels=labels[order], class_names=list(info["classes"]), crs=crs,
        transform=(t.a, t.b, t.c, t.d, t.e, t.f), region=(c0, r0, rw, rh), windows=len(windows),
        seconds=time.perf_counter() - started,
    )


def predict_scenes(
    export_dir: str | Path,
    scenes: list[Path],
    out: Path,
    cfg: PredictConfig,
    fmt: str | None = None,
    per_scene: bool | None = None,
    show_progress: bool = True,
) -> list[Path]:
    """Predict every scene with the exported model and write vector files; returns the paths written.

    `fmt` ('geojson' | 'gpkg') defaults to the suffix of `out` (.gpkg → gpkg), else cfg.format; `per_scene`
    defaults to cfg.per_scene. Per run, `out` is one file (GeoJSON: all scenes in EPSG:4326; GeoPackage: one
    layer per scene in its CRS). Per scene — and whenever `out` has no .geojson/.json/.gpkg suffix (a
    folder) — `out` is a folder with one `<scene>.<ext>` each.
    """
    from pipeline.predict.adapt import load_for_predict, scene_detector
    from pipeline.predict.export import write_detections

    suffix = Path(out).suffix.lower()
    fmt = fmt or ("gpkg" if suffix == ".gpkg" else "geojson" if suffix in (".geojson", ".json") else cfg.format)
    per_scene = cfg.per_scene if per_scene is None else per_scene
    if suffix not in (".geojson", ".json", ".gpkg"):
        per_scene = True
    for s in scenes:
        if "://" not in str(s) and not str(s).startswith("/vsi") and not Path(s).exists():
            raise SatdetError(f"{s}: scene file not found")
    detector = load_for_predict(export_dir, cfg)
    results: list[SceneDetections] = []
    with _SceneProgressBars(show_progress) as bar:
        for s in scenes:
            adapted = scene_detector(detector, s, cfg)
            results.append(predict_region(adapted, s, cfg, progress=bar(Path(str(s)).stem)))
    if per_scene:
        ext = "gpkg" if fmt == "gpkg" else "geojson"
        return [write_detections([r], Path(out) / f"{r.scene}.{ext}", fmt) for r in results]
    return [write_detections(results, Path(out), fmt)]


class _SceneProgressBars:
    """Rich progress (windows done/total, Mpx/s) per scene; a no-op when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None

    def __enter__(self) -> Callable[[str], WindowProgress | None]:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("windows  {task.fields[mpx]:.2f} Mpx/s"), TimeElapsedColumn())
            self._progress.start()
        return self._make

    def _make(self, name: str) -> WindowProgress | None:
        if self._progress is None:
            return None
        task = self._progress.add_task(name, total=None, mpx=0.0)
        start = time.perf_counter()

        def update(done: int, total: int, pixels: float) -> None:
            rate = pixels / 1e6 / max(time.perf_counter() - start, 1e-9)
            self._progress.update(task, completed=done, total=total, mpx=rate)

        return update

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def read_model_info(export_dir: str | Path) -> dict[str, Any]:
    """model_info.json of an export (without loading TensorFlow)."""
    return json.loads((resolve_export_dir(export_dir) / "model_info.json").read_text())
