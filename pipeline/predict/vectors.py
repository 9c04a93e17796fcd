"""Vector output of scene detections: GeoJSON (EPSG:4326, RFC 7946) or GeoPackage (scene CRS).

Each detection is a polygon (the pixel box's four corners through the raster transform, so rotated
rasters stay exact) with properties ``label`` (class name), ``label_id`` (1-based), ``score`` and
``scene``. Files are written atomically (temp file + rename): a reader never sees half a file.

Per run, the output is one file (GeoJSON: all scenes in EPSG:4326; GeoPackage: one layer per scene in its
CRS); per scene, a folder with one ``<scene>.<ext>`` each (`output_layout`, `write_results`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import SatdetError
from pipeline.files import atomic_path

if TYPE_CHECKING:
    from pipeline.config import PredictConfig
    from pipeline.predict.scene import SceneDetections


def box_polygons(boxes: np.ndarray, transform: tuple[float, ...]) -> Any:
    """Shapely polygons of pixel boxes (N, 4) in map coordinates via the affine (a, b, c, d, e, f)."""
    import shapely

    a, b, c, d, e, f = transform[:6]
    x0, y0, x1, y1 = (boxes[:, i] for i in range(4))
    px = np.stack([x0, x1, x1, x0, x0], 1)
    py = np.stack([y0, y0, y1, y1, y0], 1)
    coords = np.stack([a * px + b * py + c, d * px + e * py + f], -1)
    return shapely.polygons(coords)


def to_geodataframe(det: SceneDetections) -> Any:
    """GeoDataFrame of one scene's detections in the scene CRS."""
    import geopandas as gpd

    names = np.asarray(det.class_names, dtype=object)
    labels = np.asarray(det.labels, np.int64)
    return gpd.GeoDataFrame(
        {
            "label": names[labels - 1] if len(labels) else np.zeros(0, dtype=object),
            "label_id": labels,
            "score": np.asarray(det.scores, np.float64),
            "scene": [det.scene] * len(labels),
        },
        geometry=box_polygons(np.asarray(det.boxes, np.float64).reshape(-1, 4), det.transform),
        crs=det.crs,
    )


def write_detections(results: list[SceneDetections], out: Path, fmt: str = "geojson") -> Path:
    """Write one file holding `results` (GeoJSON: one layer in EPSG:4326; GeoPackage: a layer per scene)."""
    import pandas as pd
    import pyogrio

    out = Path(out)
    frames = [to_geodataframe(r) for r in results]
    if fmt == "geojson":
        missing = [r.scene for r in results if r.crs is None]
        if missing:
            raise SatdetError(f"scene {missing[0]} has no CRS, so it cannot be written as EPSG:4326 GeoJSON; "
                              "use --format gpkg (pixel-transform coordinates) or georeference the scene")
        merged = pd.concat([f.to_crs(4326) for f in frames], ignore_index=True) if frames else None
        with atomic_path(out) as tmp:
            tmp.unlink()  # the driver creates the file itself
            if merged is None or len(merged) == 0:
                # pyogrio cannot infer a geometry type from zero rows; write a valid empty collection
                tmp.write_text('{"type": "FeatureCollection", "features": []}\n')
            else:
                pyogrio.write_dataframe(merged, tmp, driver="GeoJSON", layer=out.stem,
                                        layer_options={"RFC7946": "YES"})
        return out
    if fmt == "gpkg":
        with atomic_path(out, keep_suffix=True) as tmp, warnings.catch_warnings():
            # a scene without a CRS is written in its pixel-transform coordinates, as documented
            warnings.filterwarnings("ignore", message="'crs' was not provided", category=UserWarning)
            tmp.unlink()
            for r, frame in zip(results, frames):
                pyogrio.write_dataframe(frame, tmp, driver="GPKG", layer=r.scene, append=tmp.exists(),
                                        geometry_type="Polygon")
            if not results:
                raise SatdetError(f"{out}: no scenes to write")
        return out
    raise SatdetError(f"unknown output format {fmt!r}; use geojson or gpkg")


def output_layout(out: Path, fmt: str | None, per_scene: bool | None, cfg: PredictConfig) -> tuple[str, bool]:
    """(format, per scene) of a prediction run writing to `out`.

    `fmt` ('geojson' | 'gpkg') defaults to the suffix of `out` (.gpkg → gpkg), else cfg.format; `per_scene`
    defaults to cfg.per_scene, and is forced whenever `out` has no .geojson/.json/.gpkg suffix (a folder).
    """
    suffix = Path(out).suffix.lower()
    fmt = fmt or ("gpkg" if suffix == ".gpkg" else "geojson" if suffix in (".geojson", ".json") else cfg.format)
    per_scene = cfg.per_scene if per_scene is None else per_scene
    if suffix not in (".geojson", ".json", ".gpkg"):
        per_scene = True
    return fmt, per_scene


def write_results(results: list[SceneDetections], out: Path, fmt: str, per_scene: bool) -> list[Path]:
    """Write `results` as one file `out`, or per scene as `out/<scene>.<ext>`; returns the paths written."""
    if per_scene:
        ext = "gpkg" if fmt == "gpkg" else "geojson"
        return [write_detections([r], Path(out) / f"{r.scene}.{ext}", fmt) for r in results]
    return [write_detections(results, Path(out), fmt)]
