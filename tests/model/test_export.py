"""pipeline/model/export.py: SavedModel export with normalisation inside, reload reproduces detections."""

import json

import numpy as np
import pytest

from pipeline.data.stats import normalize
from pipeline.errors import SatdetError
from pipeline.model.detector import build_detector
from pipeline.model.export import export_model, load_exported

STATS = {"dtype": "uint8", "bands": [1, 2, 3], "channels": 3, "nodata": None, "tile_size": 96,
         "percentiles": [1, 99], "low": [5.0, 10.0, 0.0], "high": [250.0, 240.0, 255.0],
         "mean": [100.0, 110.0, 90.0], "std": [40.0, 35.0, 50.0]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from pipeline.config import ModelConfig

    cfg = ModelConfig(backbone="tiny", fpn_channels=16, head_dim=32, min_level=2, max_level=5,
                      anchor_sizes=[16, 32, 64, 128], rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100,
                      max_detections=30, score_threshold=0.0)
    model = build_detector(cfg, num_classes=2, bands=3)
    out = export_model(model, STATS, ["square", "circle"], tmp_path_factory.mktemp("run") / "export", tile_size=96)
    return model, out


def test_export_writes_the_documented_files(exported):
    _, out = exported
    assert {"saved_model.pb", "variables", "labels.json", "model_info.json", "model.weights.h5"} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / "labels.json").read_text()) == {"1": "square", "2": "circle"}
    info = json.loads((out / "model_info.json").read_text())
    assert info["tile_size"] == 96 and info["classes"] == ["square", "circle"] and info["stats"] == STATS
    assert info["predict"] is None  # no test-time settings given
    assert not list(out.parent.glob(".*tmp"))  # written atomically, no leftovers


def test_reloaded_export_reproduces_detections_from_raw_pixels(exported):
    model, out = exported
    raw = np.random.default_rng(0).integers(0, 256, (2, 96, 96, 3)).astype(np.uint8)
    want = {k: v.numpy() for k, v in model(normalize(raw, STATS), training=False).items()}
    detector = load_exported(out)
    got = detector.predict(raw)
    assert int(want["num_detections"].sum()) > 0
    np.testing.assert_array_equal(got["num_detections"], want["num_detections"])
    np.testing.assert_array_equal(got["classes"], want["classes"])
    np.testing.assert_allclose(got["boxes"], want["boxes"], atol=1e-4)
    np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-6)
    assert detector.info["classes"] == ["square", "circle"]


def test_smaller_windows_are_padded_and_larger_ones_refused(exported):
    _, out = exported
    detector = load_exported(out)
    single = detector.predict(np.full((50, 70, 3), 120, np.uint8))
    assert single["boxes"].shape == (30, 4)
    assert np.all(single["boxes"][:, [0, 2]] <= 70) and np.all(single["boxes"][:, [1, 3]] <= 50)
    with pytest.raises(SatdetError, match="exceeds the exported tile size"):
        detector.predict(np.zeros((1, 128, 96, 3), np.uint8))


def test_a_directory_that_is_not_an_export_is_a_user_error(tmp_path):
    with pytest.raises(SatdetError, match="not a satdet model export"):
        load_exported(tmp_path)


def test_export_stores_the_runs_test_time_settings(exported, tmp_path):
    from pipeline.predict.exported import stored_test_time_settings

    model, _ = exported
    settings = {"normalize": "train", "adapt_bn": False, "tta": True}
    out = export_model(model, STATS, ["square", "circle"], tmp_path / "export", tile_size=96, predict=settings)
    assert json.loads((out / "model_info.json").read_text())["predict"] == {
        "normalize": "train", "adapt_bn": False, "tta": True}
    assert stored_test_time_settings(tmp_path) == {"normalize": "train", "adapt_bn": False, "tta": True}
