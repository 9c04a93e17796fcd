"""Synthetic scenes with known objects: a UTM GeoTIFF plus labels as GeoJSON in EPSG:4326.

Because the labels are in geographic coordinates and the raster in UTM, every use of a synthetic scene
exercises reprojection. Objects are drawn at exact pixel boxes (returned and written as a pixel CSV),
so tests can compare what tiling recovers against the truth. Deterministic from the seed; the image is
generated and written in row strips, so large benchmark scenes need little memory.

Classes and their look: ``crown`` (round, green, brighter centre), ``roof`` (rectangle, grey or red),
``vehicle`` (small rectangle, bright); any other class name is drawn as a coloured square.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from pipeline.files import atomic_path, atomic_write_text

CELL = 40  # objects are placed one per grid cell of this size, so they never overlap
DEFAULT_CLASSES = ("crown", "roof", "vehicle")
NODATA = 0


@dataclass(frozen=True)
class SyntheticScene:
    """Paths of one synthetic scene and its ground truth in pixels."""

    image: Path
    labels: Path  # GeoJSON, EPSG:4326, property `label`
    pixel_csv: Path  # the same boxes as xmin,ymin,xmax,ymax,label
    boxes_px: np.ndarray  # (N, 4) float64 x0, y0, x1, y1 (pixel edges at integers)
    class_ids: np.ndarray  # (N,) int64, 1-based in `classes` order
    classes: tuple[str, ...]


def _object_patch(kind: str, rng: np.random.Generator, class_index: int) -> tuple[np.ndarray, np.ndarray]:
    """A (h, w) mask and an RGB colour pattern (h, w, 3) float for one object."""
    if kind == "crown":
        r = rng.uniform(5, 14)
        n = int(np.ceil(2 * r))
        yy, xx = np.mgrid[0:n, 0:n] + 0.5
        d = np.hypot(xx - n / 2, yy - n / 2)
        mask = d <= r
        shade = 1.0 - 0.5 * (d / r)  # bright centre, darker rim: looks like a crown from above
        rgb = np.stack([40 + 40 * shade, 110 + 90 * shade, 40 + 30 * shade], -1)
    elif kind == "roof":
        h, w = int(rng.integers(10, 31)), int(rng.integers(10, 31))
        mask = np.ones((h, w), bool)
        base = (170.0, 170.0, 175.0) if rng.random() < 0.5 else (170.0, 60.0, 50.0)
        rgb = np.broadcast_to(np.asarray(base), (h, w, 3)).copy()
        rgb[:, : w // 2] *= 0.8  # the two faces of a gabled roof
    elif kind == "vehicle":
        h, w = int(rng.integers(4, 7)), int(rng.integers(8, 13))
        if rng.random() < 0.5:
            h, w = w, h
        mask = np.ones((h, w), bool)
        rgb = np.broadcast_to(np.asarray((230.0, 230.0, 240.0) if rng.random() < 0.5 else (30, 60, 200.0)),
                              (h, w, 3)).copy()
    else:
        s = int(rng.integers(8, 25))
        mask = np.ones((s, s), bool)
        hue = (class_index * 67) % 255
        rgb = np.broadcast_to(np.asarray((hue, 255 - hue, 128.0)), (s, s, 3)).copy()
    return mask, rgb


def _background(rows: np.ndarray, cols: np.ndarray, phases: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Textured ground (H, W, 3) float: smooth fields (sinusoids) plus fine noise."""
    y = rows[:, None].astype(np.float32)
    x = cols[None, :].astype(np.float32)
    field = (np.sin(x * 0.011 + phases[0]) * np.cos(y * 0.013 + phases[1])
             + 0.5 * np.sin((x + y) * 0.047 + phases[2]) + 0.25 * np.cos((x - y) * 0.09 + phases[3]))
    noise = rng.normal(0, 6, size=(len(rows), len(cols), 1)).astype(np.float32)
    base = np.asarray([120.0, 110.0, 80.0], np.float32)
    return base + 18.0 * field[..., None] + noise


def _place(width: int, height: int, border: int, n_objects: int | None, n_classes: int,
           rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """(cell_col, cell_row, class_index) for each object, one per free grid cell."""
    inner_w, inner_h = width - 2 * border, height - 2 * border
    nx, ny = max(inner_w // CELL, 0), max(inner_h // CELL, 0)
    cells = nx * ny
    if n_objects is None:
        n_objects = max(1, cells // 2) if cells else 0
    if n_objects > cells:
        raise ValueError(f"{n_objects} objects do not fit: the scene has room for {cells} ({CELL}px cells)")
    picks = rng.permutation(cells)[:n_objects]
    classes = np.arange(n_objects) % n_classes  # every class appears when n_objects >= n_classes
    rng.shuffle(classes)
    return [(int(p % nx), int(p // nx), int(c)) for p, c in zip(picks, classes)]


def make_scene(
    out_dir: str | Path,
    name: str,
    width: int = 256,
    height: int = 256,
    seed: int = 0,
    dtype: str = "uint8",
    bands: int = 3,
    n_objects: int | None = None,
    nodata_border: int = 0,
    classes: Sequence[str] = DEFAULT_CLASSES,
    epsg: int = 32633,
    resolution: float = 0.3,
    origin: tuple[float, float] = (500_000.0, 5_000_000.0),
) -> SyntheticScene:
    """Write ``name.tif`` (UTM GeoTIFF), ``name.geojson`` (EPSG:4326 labels) and ``name.pixel.csv``.

    `dtype` uint8 (values 1..255) or uint16 (≈12-bit values); `bands` ≥ 3 (extra bands behave like
    near-infrared: bright on crowns). `nodata_border` pixels around the edge are nodata (value 0, and the
    file's nodata is set); objects stay inside. Returns the exact pixel boxes and 1-based class ids.
    """
    if bands < 3:
        raise ValueError("synthetic scenes need at least 3 bands")
    if dtype not in ("uint8", "uint16"):
        raise ValueError("synthetic scenes are uint8 or uint16")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = tuple(classes)
    objects = _objects(_place(width, height, nodata_border, n_objects, len(classes), rng), classes,
                       nodata_border, rng)
    boxes_px, class_ids = _tight_boxes(objects)
    transform = from_origin(origin[0], origin[1], resolution, resolution)
    profile = {"driver": "GTiff", "width": width, "height": height, "count": bands, "dtype": dtype,
               "crs": f"EPSG:{epsg}", "transform": transform, "tiled": True, "blockxsize": 256,
               "blockysize": 256, "compress": "deflate", "predictor": 2,
               "nodata": NODATA if nodata_border else None}
    phases = rng.uniform(0, 2 * np.pi, 4)
    image_path = out_dir / f"{name}.tif"
    with atomic_path(image_path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        for r0 in range(0, height, _STRIP):
            r1 = min(height, r0 + _STRIP)
            pix = _strip_pixels(r0, r1, width, height, objects, classes, phases, seed, bands, dtype, nodata_border)
            dst.write(np.moveaxis(pix, 2, 0), window=Window(0, r0, width, r1 - r0))

    labels_path = out_dir / f"{name}.geojson"
    atomic_write_text(labels_path, json.dumps(_geojson(boxes_px, class_ids, classes, transform, epsg)))
    csv_path = out_dir / f"{name}.pixel.csv"
    lines = ["xmin,ymin,xmax,ymax,label"] + [
        f"{b[0]:g},{b[1]:g},{b[2]:g},{b[3]:g},{classes[i - 1]}" for b, i in zip(boxes_px, class_ids)
    ]
    atomic_write_text(csv_path, "\n".join(lines) + "\n")
    return SyntheticScene(image_path, labels_path, csv_path, boxes_px, class_ids, classes)


_STRIP = 256  # rows generated and written at a time
_Object = tuple[int, int, np.ndarray, np.ndarray, int]  # x0, y0, mask, rgb, class index


def _objects(placements: list[tuple[int, int, int]], classes: tuple[str, ...], border: int,
             rng: np.random.Generator) -> list[_Object]:
    """Each placed object drawn (mask, colours) at a random offset inside its grid cell."""
    objects = []
    for cx, cy, ci in placements:
        mask, rgb = _object_patch(classes[ci], rng, ci)
        h, w = mask.shape
        x0 = border + cx * CELL + int(rng.integers(0, CELL - w + 1))
        y0 = border + cy * CELL + int(rng.integers(0, CELL - h + 1))
        objects.append((x0, y0, mask, rgb, ci))
    return objects


def _tight_boxes(objects: list[_Object]) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) pixel boxes of the drawn pixels (a round crown's mask may not fill its patch's outer rows)
    and the 1-based class ids."""
    boxes, ids = [], []
    for x0, y0, mask, _, ci in objects:
        ys, xs = np.nonzero(mask)
        boxes.append((x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1))
        ids.append(ci + 1)
    return np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(ids, np.int64)


def _strip_pixels(r0: int, r1: int, width: int, height: int, objects: list[_Object], classes: tuple[str, ...],
                  phases: np.ndarray, seed: int, bands: int, dtype: str, nodata_border: int) -> np.ndarray:
    """Rows r0..r1 of the image (h, W, bands) in `dtype`: ground, the objects over it, the nodata border."""
    srng = np.random.default_rng([seed, r0])  # per-strip noise: same pixels whatever the strip order
    rgb = _background(np.arange(r0, r1), np.arange(width), phases, srng)
    extra = np.full((r1 - r0, width), 60.0, np.float32)  # NIR-like band: dark ground
    for x0, y0, mask, patch, ci in objects:
        h, w = mask.shape
        if y0 + h <= r0 or y0 >= r1:
            continue
        a, b = max(y0, r0), min(y0 + h, r1)
        m = mask[a - y0:b - y0]
        view = rgb[a - r0:b - r0, x0:x0 + w]
        view[m] = patch[a - y0:b - y0][m]
        extra[a - r0:b - r0, x0:x0 + w][m] = 200.0 if classes[ci] == "crown" else 90.0
    pix = np.concatenate([rgb, np.repeat(extra[..., None], bands - 3, axis=2)], axis=2)
    if dtype == "uint16":
        pix = pix * 16.0  # ≈12-bit sensor range
    pix = np.clip(pix, 1, np.iinfo(dtype).max).astype(dtype)  # 0 is reserved for nodata
    if nodata_border:
        rows = np.arange(r0, r1)
        edge_rows = (rows < nodata_border) | (rows >= height - nodata_border)
        pix[edge_rows] = NODATA
        pix[:, :nodata_border] = NODATA
        pix[:, width - nodata_border:] = NODATA
    return pix


def _geojson(boxes: np.ndarray, ids: np.ndarray, classes: Sequence[str], transform, epsg: int) -> dict:  # type: ignore[no-untyped-def]
    """Box rectangles in map coordinates, reprojected to EPSG:4326 (lon, lat order, RFC 7946)."""
    from pyproj import Transformer

    to_wgs84 = Transformer.from_crs(f"EPSG:{epsg}", "EPSG:4326", always_xy=True)
    features = []
    for (x0, y0, x1, y1), cid in zip(boxes, ids):
        corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
        mx, my = zip(*(transform @ c for c in corners))
        lon, lat = to_wgs84.transform(np.asarray(mx), np.asarray(my))
        ring = [[round(float(a), 10), round(float(b), 10)] for a, b in zip(lon, lat)]
        features.append({"type": "Feature", "properties": {"label": classes[cid - 1]},
                         "geometry": {"type": "Polygon", "coordinates": [ring]}})
    return {"type": "FeatureCollection", "features": features}


def make_scenes(out_dir: str | Path, n_scenes: int = 2, size: int = 512, seed: int = 0, dtype: str = "uint8",
                bands: int = 3, nodata_border: int = 0) -> list[SyntheticScene]:
    """Several scenes ``scene-000`` ... with different seeds (the `satdet synth` command)."""
    return [make_scene(out_dir, f"scene-{i:03d}", size, size, seed=seed * 1000 + i, dtype=dtype, bands=bands,
                       nodata_border=nodata_border) for i in range(n_scenes)]
