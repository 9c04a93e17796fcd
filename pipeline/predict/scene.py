"""Full-scene inference: stream overlapping windows through an exported detector, stitch, merge.

    predict_scenes(export_dir, scenes, out, cfg) -> list[Path]        (CLI `satdet predict`)
    predict_region(detector, scene, cfg, region=None) -> SceneDetections  (one scene or a sub-window of it)

The steps, each in its own module:
- the window plan (pipeline.predict.windows): `tile_size` (None → the size the model was trained on) with
  `overlap`, on the tiling grid; a scene smaller than a window is sent as it is (the exported model pads
  it to its tile size after normalising) and boxes are clipped to it;
- the reader (pipeline.predict.reader): a thread reads batches of windows ahead of the model, so memory is
  bounded regardless of scene size — only the boxes are kept for the whole scene;
- per window and across windows (pipeline.predict.seams): threshold, clipping, nodata, the seam rule, and
  the merge of the boxes in the overlap strips;
- the output (pipeline.predict.vectors): GeoJSON or GeoPackage; progress bars (pipeline.predict.progress).
The model: pipeline.predict.exported (loading, output threshold, scene checks) and pipeline.predict.adapt
(test-time adaptation).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import PredictConfig
from pipeline.errors import SatdetError
from pipeline.geo.raster import exists_or_remote
from pipeline.predict.exported import Detector, check_scene, output_threshold
from pipeline.predict.progress import SceneProgressBars, WindowProgress
from pipeline.predict.reader import nodata_fill, read_batches
from pipeline.predict.resolution import scene_window
from pipeline.predict.seams import Boxes, stitch, window_boxes
from pipeline.predict.windows import Window, plan_windows, usable_overlap


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
class _Header:
    """What scene inference reads of a raster before any pixel: bands to read, size, georeferencing."""

    bands: list[int]
    width: int
    height: int
    crs: str | None
    transform: tuple[float, float, float, float, float, float]


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
    info = detector.info
    if cfg.score_threshold is None:
        cfg = cfg.model_copy(update={"score_threshold": output_threshold(cfg, info)})
    # A Resampled detector (pipeline.predict.resolution) sees the windows at its training pixel size: window
    # and overlap are counted in training pixels, so the overlap covers the same ground objects.
    scale = getattr(detector, "scale", 1.0)
    size = scene_window(int(cfg.tile_size or info["tile_size"]), scale)
    header = _read_header(scene, info)
    region = _checked_region(scene, region, header)
    windows = plan_windows(region, size, usable_overlap(round(cfg.overlap / scale), size))
    started = time.perf_counter()
    kept, seam = _detect_windows(detector, scene, windows, header.bands, cfg, progress, region[2] * region[3])
    boxes, scores, labels = stitch(kept, seam, cfg)
    order = np.argsort(-scores, kind="stable")
    return SceneDetections(
        scene=Path(str(scene)).stem, path=str(scene), boxes=boxes[order], scores=scores[order],
        labels=labels[order], class_names=list(info["classes"]), crs=header.crs,
        transform=header.transform, region=region, windows=len(windows),
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
    from pipeline.predict.vectors import output_layout, write_results

    fmt, per_scene = output_layout(Path(out), fmt, per_scene, cfg)
    _check_scenes_exist(scenes)
    detector = load_for_predict(export_dir, cfg)
    results: list[SceneDetections] = []
    with SceneProgressBars(show_progress) as bar:
        for s in scenes:
            adapted = scene_detector(detector, s, cfg)
            results.append(predict_region(adapted, s, cfg, progress=bar(Path(str(s)).stem)))
    return write_results(results, Path(out), fmt, per_scene)


def _read_header(scene: str | Path, info: dict[str, Any]) -> _Header:
    """The scene's header, after checking its bands and dtype against the model."""
    from pipeline.geo.raster import crs_string, open_raster

    with open_raster(scene) as ds:
        t = ds.transform
        return _Header(check_scene(ds, scene, info), ds.width, ds.height, crs_string(ds.crs),
                       (t.a, t.b, t.c, t.d, t.e, t.f))


def _checked_region(scene: str | Path, region: tuple[int, int, int, int] | None, header: _Header
                    ) -> tuple[int, int, int, int]:
    """`region` as ints (None: the whole scene); a region not inside the scene is a SatdetError."""
    width, height = header.width, header.height
    region = region or (0, 0, width, height)
    c0, r0, rw, rh = (int(v) for v in region)
    if rw <= 0 or rh <= 0 or c0 < 0 or r0 < 0 or c0 + rw > width or r0 + rh > height:
        raise SatdetError(f"{scene}: region {region} is not inside the {width}x{height} scene")
    return c0, r0, rw, rh


def _detect_windows(detector: Detector, scene: str | Path, windows: Sequence[Window], bands: list[int],
                    cfg: PredictConfig, progress: WindowProgress | None, pixels: int
                    ) -> tuple[list[Boxes], list[Boxes]]:
    """Every window through the model: per window, the boxes away from the overlap strips and those in
    them. `progress` is told the share of the region's `pixels` done."""
    kept: list[Boxes] = []
    seam: list[Boxes] = []
    done = 0
    for images, masks, chunk in read_batches(str(scene), windows, bands, cfg.batch_size,
                                             nodata_fill(detector.info, bands)):
        out = {k: np.asarray(v) for k, v in detector.predict(images).items()}
        for n, w in enumerate(chunk):
            b, s, lab, strip = window_boxes(out, n, masks[n], w, cfg)
            kept.append((b[~strip], s[~strip], lab[~strip]))
            seam.append((b[strip], s[strip], lab[strip]))
        done += len(chunk)
        if progress is not None:
            progress(done, len(windows), pixels * done / len(windows))
    return kept, seam


def _check_scenes_exist(scenes: list[Path]) -> None:
    """Local scene files must exist (remote ones, s3:// or /vsi..., are left to the reader)."""
    for s in scenes:
        if not exists_or_remote(s):
            raise SatdetError(f"{s}: scene file not found")
