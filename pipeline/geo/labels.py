"""Labels of one scene → pixel boxes (x0, y0, x1, y1; pixel edges at integers) and 1-based class ids.

Formats, chosen by file content/suffix:
  * any OGR vector (GeoJSON, GeoPackage, Shapefile, FlatGeobuf...) in any CRS — read with pyogrio,
    reprojected into the raster CRS, each polygon's bounds mapped to pixels by the inverse transform;
  * pixel CSV, DeepForest style: ``[image_path,]xmin,ymin,xmax,ymax,label`` (rows for other images skipped);
  * COCO JSON (``images``/``annotations``/``categories``; the image is matched by file name);
  * Pascal VOC XML (``object/name`` and ``object/bndbox``; coordinates taken as written).
Class names match ``config.classes`` case-insensitively (NEON's "Tree" is the class "tree").
"""

from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import SatdetError
from pipeline.geo.raster import RasterInfo

log = logging.getLogger(__name__)

PIXEL_COLUMNS = ("xmin", "ymin", "xmax", "ymax")


@dataclass
class SceneLabels:
    """Boxes of one scene in raster pixels, plus what was skipped on the way."""

    boxes: np.ndarray  # (N, 4) float64 x0, y0, x1, y1
    class_ids: np.ndarray  # (N,) int64, 1-based in config.classes order
    invalid_geometries: int = 0
    labels_outside_raster: int = 0
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.boxes)


def _as_names(names: Sequence[object] | np.ndarray) -> np.ndarray:
    """Label names as a 1-D object array of str (any value is named by its `str`, as in the messages)."""
    out = np.empty(len(names), dtype=object)
    out[:] = [n if type(n) is str else str(n) for n in names]
    return out


def _class_ids(names: np.ndarray, classes: Sequence[str], path: Path) -> np.ndarray:
    """1-based ids of `names` (from `_as_names`) in `classes`, case-insensitively; each distinct name is
    looked up once."""
    lookup = {c.lower(): i + 1 for i, c in enumerate(classes)}
    if len(names) == 0:
        return np.zeros(0, np.int64)
    distinct, inverse = np.unique(names, return_inverse=True)
    distinct_names = distinct.tolist()
    unknown = sorted({n for n in distinct_names if n.lower() not in lookup})
    if unknown:
        raise SatdetError(
            f"{path}: label class(es) {unknown} not in the configured classes {list(classes)}; "
            "add them to `classes` in the config or fix the labels"
        )
    ids = np.asarray([lookup[n.lower()] for n in distinct_names], dtype=np.int64)
    return ids[inverse.reshape(-1)]


def _vector_boxes(path: Path, info: RasterInfo, classes: Sequence[str], label_field: str
                  ) -> tuple[np.ndarray, Sequence[object], int]:
    """Pixel boxes of a vector file's polygons, their class names and how many geometries were invalid."""
    import shapely

    meta, wkb, fields = _read_vector(path)
    if len(wkb) == 0:
        return np.zeros((0, 4)), [], 0
    to_raster = _to_raster_crs(path, meta, info)
    geoms = shapely.from_wkb(wkb)
    ok = _valid_polygons(geoms)
    invalid = int((~ok).sum())
    names = _class_names(path, meta, fields, ok, classes, label_field)
    if not ok.any():
        return np.zeros((0, 4)), names, invalid
    return _pixel_bounds(geoms[ok], info, to_raster), names, invalid


def _read_vector(path: Path) -> tuple[dict[str, Any], np.ndarray, list[np.ndarray]]:
    """The layer's metadata, WKB geometries and attribute columns; a one-line error for an unreadable file."""
    import pyogrio.errors
    import pyogrio.raw

    try:  # pyogrio's arrays, without a GeoDataFrame around them (a third less time for 10k polygons)
        meta, _, wkb, fields = pyogrio.raw.read(path)
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError, OSError) as err:
        raise SatdetError(f"{path}: cannot read labels ({str(err).splitlines()[0][:120]}); give a vector file "
                          "(GeoJSON, GeoPackage, Shapefile...), a pixel CSV, COCO JSON or Pascal VOC XML") from None
    if wkb is None:
        raise SatdetError(f"{path}: the layer has no geometries; give polygon labels (or a pixel CSV)")
    return meta, wkb, fields


def _to_raster_crs(path: Path, meta: dict[str, Any], info: RasterInfo) -> Any:
    """The transformer from the labels' CRS to the raster's, None when they agree (or neither has one);
    a one-line error when only one of them has a CRS."""
    from pyproj import CRS, Transformer

    crs = CRS.from_user_input(meta["crs"]) if meta.get("crs") else None
    if crs is None:
        if info.crs is not None:
            raise SatdetError(f"{path}: labels have no CRS; write the file with a CRS (e.g. a .prj beside a "
                              "shapefile, or ogr2ogr -a_srs EPSG:xxxx)")
        log.warning("%s: neither labels nor raster have a CRS; assuming the same coordinates", path)
    elif info.crs is None:
        raise SatdetError(f"{info.path}: raster has no CRS but the labels {path.name} are in "
                          f"{crs.to_string()}; assign the raster's CRS (gdal_edit.py -a_srs EPSG:xxxx) "
                          "or give pixel labels (CSV/COCO/VOC)")
    elif (raster_crs := CRS.from_user_input(info.crs)) != crs:
        return Transformer.from_crs(crs, raster_crs, always_xy=True)
    return None


def _valid_polygons(geoms: np.ndarray) -> np.ndarray:
    """Which geometries are present, non-empty, valid polygons or multipolygons."""
    import shapely

    kind = shapely.get_type_id(geoms)
    ok = (~shapely.is_missing(geoms)) & (~shapely.is_empty(geoms)) & np.isin(kind, (3, 6))  # Polygon, MultiPolygon
    ok[ok] = shapely.is_valid(geoms[ok])
    return ok


def _class_names(path: Path, meta: dict[str, Any], fields: list[np.ndarray], ok: np.ndarray,
                 classes: Sequence[str], label_field: str) -> Sequence[object]:
    """The class name of every kept geometry, from `label_field` (or the one class when there is one)."""
    names_in_file = list(meta["fields"])
    if label_field in names_in_file:
        return np.asarray(fields[names_in_file.index(label_field)], dtype=object)[ok]
    if len(classes) == 1:
        return [classes[0]] * int(ok.sum())  # single-class labels need no attribute
    raise SatdetError(f"{path}: no attribute {label_field!r} holding the class name (attributes: "
                      f"{names_in_file}); set tiling.label_field")


def _pixel_bounds(geoms: np.ndarray, info: RasterInfo, to_raster: Any) -> np.ndarray:
    """Each polygon's bounds in raster pixels.

    Every vertex is reprojected and mapped to pixel space before the bounds are taken: exact for rotated
    transforms too. Bounds come from the coordinates, not rebuilt geometries, so a vertex the projection
    cannot map (inf/NaN, e.g. projected coordinates in a file that claims EPSG:4326) gives a non-finite box
    that read_labels counts as invalid instead of a GEOS error."""
    import shapely

    inv = ~_affine(info.transform)
    matrix = np.array([[inv.a, inv.d], [inv.b, inv.e]])
    offset = np.array([inv.c, inv.f])
    xy, owner = shapely.get_coordinates(geoms, return_index=True)  # grouped by polygon, in order
    with np.errstate(invalid="ignore"):
        if to_raster is not None:
            xy = np.column_stack(to_raster.transform(xy[:, 0], xy[:, 1]))
        xy = xy @ matrix + offset
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])  # every kept polygon has vertices
    return np.hstack([np.minimum.reduceat(xy, starts), np.maximum.reduceat(xy, starts)])


def _affine(t: Sequence[float]):  # type: ignore[no-untyped-def]
    from affine import Affine

    return Affine(*t[:6])


def _csv_boxes(path: Path, info: RasterInfo) -> tuple[np.ndarray, list[str], int]:
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return np.zeros((0, 4)), [], 0
    missing = [c for c in (*PIXEL_COLUMNS, "label") if c not in df.columns]
    if missing:
        raise SatdetError(f"{path}: pixel CSV lacks column(s) {missing}; expected "
                          "[image_path,]xmin,ymin,xmax,ymax,label")
    if "image_path" in df.columns and len(df):
        image_name = Path(info.path).name
        names = df["image_path"].astype(str).map(lambda p: Path(p).name)
        if not (names == image_name).any():
            raise SatdetError(f"{path}: no rows for image {image_name} (image_path has e.g. "
                              f"{sorted(set(names))[:3]}); fix image_path or the scene's labels entry")
        df = df[names == image_name]
    boxes = df[list(PIXEL_COLUMNS)].to_numpy(dtype=np.float64)
    return boxes, df["label"].astype(str).tolist(), 0


def _coco_boxes(path: Path, data: dict, info: RasterInfo) -> tuple[np.ndarray, list[str], int]:
    images = data.get("images") or []
    image_name = Path(info.path).name
    match = [im for im in images if Path(str(im.get("file_name", ""))).name == image_name]
    if not match and len(images) == 1:
        match = images  # a single-image file needs no matching name
    if not match:
        raise SatdetError(f"{path}: COCO file has no image named {image_name}; fix images[].file_name")
    image_id = match[0]["id"]
    cats = {c["id"]: c["name"] for c in data.get("categories") or []}
    boxes, names = [], []
    for ann in data.get("annotations") or []:
        if ann.get("image_id") != image_id:
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        boxes.append((x, y, x + w, y + h))
        names.append(cats.get(ann["category_id"], str(ann["category_id"])))
    return np.asarray(boxes, np.float64).reshape(-1, 4), names, 0


def _voc_boxes(path: Path) -> tuple[np.ndarray, list[str], int]:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise SatdetError(f"{path}: not valid XML ({err}); give a Pascal VOC annotation file") from None
    boxes, names, invalid = [], [], 0
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        name = obj.findtext("name")
        try:
            coords = tuple(float(bb.findtext(k)) for k in PIXEL_COLUMNS)  # type: ignore[union-attr, arg-type]
        except (AttributeError, TypeError, ValueError):
            invalid += 1
            continue
        boxes.append(coords)
        names.append(str(name))
    return np.asarray(boxes, np.float64).reshape(-1, 4), names, invalid


def read_labels(path: str | Path | None, info: RasterInfo, classes: Sequence[str],
                label_field: str = "label") -> SceneLabels:
    """Read the labels of one scene into raster pixel boxes.

    Non-polygon, empty, invalid or degenerate geometries are skipped and counted; boxes that do not touch
    the raster are counted as outside. Errors (one line, naming the file): missing file, unreadable
    file, CRS problems, unknown classes, and labels of which none overlaps the raster.
    """
    if path is None:
        return SceneLabels(np.zeros((0, 4)), np.zeros((0,), np.int64))
    path = Path(path)
    if not path.exists():
        raise SatdetError(f"{path}: labels file not found; check tiling.scenes[].labels")
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:  # a zero-byte file is an empty label set, not an unreadable one
        boxes, names, invalid = np.zeros((0, 4)), [], 0
    elif suffix == ".csv":
        boxes, names, invalid = _csv_boxes(path, info)
    elif suffix == ".xml":
        boxes, names, invalid = _voc_boxes(path)
    else:
        coco = None
        if suffix == ".json":
            try:
                coco = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                coco = None
            if not (isinstance(coco, dict) and "annotations" in coco and "images" in coco):
                coco = None  # plain GeoJSON with a .json suffix
        if coco is not None:
            boxes, names, invalid = _coco_boxes(path, coco, info)
        else:
            boxes, names, invalid = _vector_boxes(path, info, classes, label_field)

    warnings: list[str] = []
    if len(boxes) == 0 and invalid == 0:
        warnings.append(f"{path}: no labels; every tile of this scene is a negative (empty) tile")
    finite = np.all(np.isfinite(boxes), axis=1) if len(boxes) else np.zeros(0, bool)
    good = finite.copy()
    good[finite] = (boxes[finite, 2] > boxes[finite, 0]) & (boxes[finite, 3] > boxes[finite, 1])
    invalid += int((~good).sum())
    boxes = boxes[good]
    ids = _class_ids(_as_names(names)[good], classes, path)

    inside = ((boxes[:, 2] > 0) & (boxes[:, 0] < info.width) & (boxes[:, 3] > 0) & (boxes[:, 1] < info.height))
    outside = int((~inside).sum())
    if outside and not inside.any():
        raise SatdetError(f"{path}: none of the {outside} labels overlaps the raster {Path(info.path).name} "
                          "(wrong file pair or wrong CRS?); pair each image with its own labels")
    if outside:
        warnings.append(f"{path}: {outside} of {len(boxes)} labels lie outside the raster and are ignored")
    if invalid:
        warnings.append(f"{path}: {invalid} invalid, empty or non-polygon geometries skipped")
    for w in warnings:
        log.warning(w)
    return SceneLabels(boxes[inside], ids[inside], invalid, outside, warnings)
