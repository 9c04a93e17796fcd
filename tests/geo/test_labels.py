import json

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
from shapely.geometry import LineString, Point, Polygon, box

from pipeline.errors import SatdetError
from pipeline.geo.labels import read_labels
from pipeline.geo.raster import raster_info

from .conftest import CLASSES, NEON


def test_epsg4326_labels_map_onto_utm_pixels_within_half_a_pixel(scene):
    labels = read_labels(scene.labels, raster_info(scene.image), CLASSES)
    assert len(labels) == len(scene.boxes_px) == 6
    assert np.abs(labels.boxes - scene.boxes_px).max() <= 0.5
    assert labels.class_ids.tolist() == scene.class_ids.tolist()


def test_hand_computed_box_from_utm_corners(tmp_path, scene):
    # A rectangle given in UTM metres: pixel box = (x - x0) / res, (y0 - y) / res (north-up raster).
    info = raster_info(scene.image)
    a, _, x0, _, e, y0 = info.transform
    poly = box(x0 + 10 * a, y0 + 40 * e, x0 + 25 * a, y0 + 30 * e)  # cols 10..25, rows 30..40
    path = tmp_path / "utm.gpkg"
    gpd.GeoDataFrame({"label": ["roof"]}, geometry=[poly], crs=info.crs).to_file(path)
    labels = read_labels(path, info, CLASSES)
    assert np.allclose(labels.boxes, [[10, 30, 25, 40]], atol=1e-6)
    assert labels.class_ids.tolist() == [2]


def test_real_osbs_scene_yields_the_61_trees_of_its_pixel_csv():
    info = raster_info(NEON / "OSBS_029.tif")
    labels = read_labels(NEON / "OSBS_029.geojson", info, ["tree"])  # file says "Tree"
    expected = pd.read_csv(NEON / "OSBS_029.pixel.csv")[["xmin", "ymin", "xmax", "ymax"]].to_numpy(float)
    assert len(labels) == 61
    assert np.abs(labels.boxes - expected).max() <= 0.5
    assert set(labels.class_ids.tolist()) == {1}


def test_pixel_csv_rows_of_other_images_are_skipped(tmp_path, scene):
    path = tmp_path / "boxes.csv"
    pd.DataFrame({
        "image_path": ["s0.tif", "other.tif", "dir/s0.tif"],
        "xmin": [1, 2, 3], "ymin": [1, 2, 3], "xmax": [5, 6, 7], "ymax": [5, 6, 8],
        "label": ["Crown", "roof", "vehicle"],
    }).to_csv(path, index=False)
    labels = read_labels(path, raster_info(scene.image), CLASSES)
    assert labels.boxes.tolist() == [[1, 1, 5, 5], [3, 3, 7, 8]]
    assert labels.class_ids.tolist() == [1, 3]


def test_coco_json(tmp_path, scene):
    path = tmp_path / "coco.json"
    path.write_text(json.dumps({
        "images": [{"id": 7, "file_name": "s0.tif"}, {"id": 8, "file_name": "x.tif"}],
        "categories": [{"id": 1, "name": "vehicle"}],
        "annotations": [{"image_id": 7, "category_id": 1, "bbox": [10, 20, 5, 6]},
                        {"image_id": 8, "category_id": 1, "bbox": [1, 1, 1, 1]}],
    }))
    labels = read_labels(path, raster_info(scene.image), CLASSES)
    assert labels.boxes.tolist() == [[10, 20, 15, 26]]
    assert labels.class_ids.tolist() == [3]


def test_a_class_name_that_is_not_text_gets_the_one_line_error(tmp_path, scene):
    path = tmp_path / "coco.json"
    path.write_text(json.dumps({
        "images": [{"id": 7, "file_name": "s0.tif"}],
        "categories": [{"id": 1, "name": ["tree", "tree"]}, {"id": 2, "name": "vehicle"}],
        "annotations": [{"image_id": 7, "category_id": 1, "bbox": [10, 20, 5, 6]},
                        {"image_id": 7, "category_id": 2, "bbox": [1, 1, 4, 4]}],
    }))
    with pytest.raises(SatdetError, match=r"coco.json: label class\(es\) \[\"\['tree', 'tree'\]\"\] not in"):
        read_labels(path, raster_info(scene.image), CLASSES)


def test_pascal_voc_xml(tmp_path, scene):
    path = tmp_path / "s0.xml"
    path.write_text("<annotation><object><name>roof</name><bndbox><xmin>3</xmin><ymin>4</ymin>"
                    "<xmax>13</xmax><ymax>24</ymax></bndbox></object></annotation>")
    labels = read_labels(path, raster_info(scene.image), CLASSES)
    assert labels.boxes.tolist() == [[3, 4, 13, 24]]
    assert labels.class_ids.tolist() == [2]


def test_invalid_and_non_polygon_geometries_are_skipped_and_counted(tmp_path, scene):
    good = gpd.read_file(scene.labels)
    cx, cy = good.geometry.iloc[0].centroid.coords[0]
    bowtie = Polygon([(cx, cy), (cx + 1e-5, cy + 1e-5), (cx + 1e-5, cy), (cx, cy + 1e-5)])  # self-crossing
    extra = gpd.GeoDataFrame({"label": ["roof", "roof", "roof"]},
                             geometry=[Point(cx, cy), LineString([(cx, cy), (cx + 1e-5, cy)]), bowtie],
                             crs="EPSG:4326")
    path = tmp_path / "mixed.gpkg"
    gpd.GeoDataFrame(pd.concat([good, extra], ignore_index=True), crs="EPSG:4326").to_file(path)
    labels = read_labels(path, raster_info(scene.image), CLASSES)
    assert len(labels) == 6
    assert labels.invalid_geometries == 3
    assert any("3 invalid" in w for w in labels.warnings)


def test_polygons_the_projection_cannot_map_are_counted_as_invalid(tmp_path, scene):
    """Projected metres in a file that says EPSG:4326 (a GeoJSON without a crs member is read as 4326):
    latitudes beyond 90 do not reproject; those polygons are skipped and counted, the rest are kept."""
    good = gpd.read_file(scene.labels)
    wrong = Polygon([(200, 95), (201, 95), (201, 96), (200, 96)])  # lon 200, lat 95: outside the domain
    path = tmp_path / "wrong.gpkg"
    gpd.GeoDataFrame({"label": [*good["label"], "roof"]}, geometry=[*good.geometry, wrong],
                     crs="EPSG:4326").to_file(path)
    labels = read_labels(path, raster_info(scene.image), CLASSES)
    assert len(labels) == len(good) == 6
    assert np.abs(labels.boxes - scene.boxes_px).max() <= 0.5
    assert labels.invalid_geometries == 1


def test_unknown_class_is_an_error_listing_both(scene):
    with pytest.raises(SatdetError, match=r"\['crown', 'roof', 'vehicle'\] not in the configured classes \['tree'\]"):
        read_labels(scene.labels, raster_info(scene.image), ["tree"])


def test_labels_without_crs_are_an_error(tmp_path, scene):
    path = tmp_path / "nocrs.gpkg"
    gpd.GeoDataFrame({"label": ["roof"]}, geometry=[box(0, 0, 1, 1)], crs=None).to_file(path)
    with pytest.raises(SatdetError, match="nocrs.gpkg: labels have no CRS"):
        read_labels(path, raster_info(scene.image), CLASSES)


def test_a_layer_without_geometries_is_an_error(tmp_path, scene):
    path = tmp_path / "table.gpkg"
    pd.DataFrame({"label": ["roof"]}).pipe(gpd.GeoDataFrame).to_file(path, driver="GPKG")
    with pytest.raises(SatdetError, match="table.gpkg: the layer has no geometries"):
        read_labels(path, raster_info(scene.image), CLASSES)


def test_raster_without_crs_with_labels_in_a_crs_is_an_error(tmp_path, scene):
    path = tmp_path / "nocrs.tif"
    with rasterio.open(scene.image) as src:
        profile = {**src.profile, "crs": None}
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(src.read())
    with pytest.raises(SatdetError, match="nocrs.tif: raster has no CRS"):
        read_labels(scene.labels, raster_info(path), CLASSES)


def test_empty_label_file_is_allowed_with_a_warning(tmp_path, scene):
    path = tmp_path / "empty.geojson"
    path.write_text('{"type": "FeatureCollection", "features": []}')
    labels = read_labels(path, raster_info(scene.image), CLASSES)
    assert len(labels) == 0
    assert any("no labels" in w for w in labels.warnings)
    zero = tmp_path / "zero.csv"
    zero.write_text("")
    assert len(read_labels(zero, raster_info(scene.image), CLASSES)) == 0


def test_no_label_overlapping_the_raster_is_an_error(tmp_path, scene):
    path = tmp_path / "far.geojson"
    gpd.GeoDataFrame({"label": ["roof"]}, geometry=[box(10, 50, 10.001, 50.001)], crs="EPSG:4326").to_file(path)
    with pytest.raises(SatdetError, match="none of the 1 labels overlaps the raster"):
        read_labels(path, raster_info(scene.image), CLASSES)


def test_some_labels_outside_the_raster_give_a_counted_warning(tmp_path, scene):
    good = gpd.read_file(scene.labels)
    far = gpd.GeoDataFrame({"label": ["roof", "roof"]},
                           geometry=[box(10, 50, 10.001, 50.001), box(11, 50, 11.001, 50.001)], crs="EPSG:4326")
    path = tmp_path / "some.geojson"
    gpd.GeoDataFrame(pd.concat([good, far], ignore_index=True), crs="EPSG:4326").to_file(path)
    labels = read_labels(path, raster_info(scene.image), CLASSES)
    assert len(labels) == 6
    assert labels.labels_outside_raster == 2
    assert any("2 of 8 labels lie outside" in w for w in labels.warnings)


def test_missing_labels_file(tmp_path, scene):
    with pytest.raises(SatdetError, match="nope.geojson: labels file not found"):
        read_labels(tmp_path / "nope.geojson", raster_info(scene.image), CLASSES)
