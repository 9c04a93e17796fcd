"""Normalisation from stats.json (pipeline/data/stats.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from pipeline.data.stats import denormalize, load_stats, normalize
from pipeline.errors import SatdetError

STATS_U16 = {
    "dtype": "uint16", "bands": [1, 2, 3, 4], "channels": 4, "nodata": None, "tile_size": 8,
    "percentiles": [1, 99], "low": [100, 200, 0, 50], "high": [3000, 2500, 4000, 60],
    "mean": [900.0, 1000.0, 2000.0, 55.0], "std": [400.0, 500.0, 1000.0, 0.0],
}


def test_normalize_clips_then_standardises_per_band() -> None:
    x = np.array([[[0, 200, 4000, 50], [65535, 2400, 2000, 70]]], np.uint16)
    expected = np.array([[[(100 - 900) / 400, (200 - 1000) / 500, (4000 - 2000) / 1000, 50 - 55],
                          [(3000 - 900) / 400, (2400 - 1000) / 500, (2000 - 2000) / 1000, 60 - 55]]], np.float32)
    out = normalize(tf.constant(x), STATS_U16)
    assert out.dtype == tf.float32
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6)  # zero std divides by 1, not by 0


def test_normalize_works_in_graph_mode_for_any_dtype() -> None:
    stats = {**STATS_U16, "dtype": "uint8"}
    fn = tf.function(lambda x: normalize(x, stats), input_signature=[tf.TensorSpec([None, 2, 2, 4], tf.uint8)])
    x = np.full((3, 2, 2, 4), 150, np.uint8)
    out = fn(tf.constant(x)).numpy()
    assert out.shape == (3, 2, 2, 4)
    np.testing.assert_allclose(out[0, 0, 0], [(150 - 900) / 400, (200 - 1000) / 500, (150 - 2000) / 1000, 5.0])
    np.testing.assert_allclose(normalize(tf.constant(x, tf.float64), stats).numpy(), out)


def test_denormalize_inverts_normalize_inside_the_clip_range() -> None:
    x = np.array([[[500, 1000, 100, 55]]], np.float32)
    np.testing.assert_allclose(denormalize(normalize(x, STATS_U16).numpy(), STATS_U16), x, rtol=1e-5)


def test_load_stats_reads_a_valid_file(tmp_path: Path) -> None:
    (tmp_path / "stats.json").write_text(json.dumps(STATS_U16))
    assert load_stats(tmp_path)["high"] == STATS_U16["high"]


def test_missing_stats_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(SatdetError, match=r"stats\.json: not found; run the tiling stage"):
        load_stats(tmp_path)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({**STATS_U16, "mean": [1, 2]}), "'mean' must be a list of 4 numbers"),
        (json.dumps({k: v for k, v in STATS_U16.items() if k != "std"}), r"missing keys \['std'\]"),
        (json.dumps({**STATS_U16, "dtype": "pixels"}), "unknown dtype"),
        (json.dumps({**STATS_U16, "low": [5000, 0, 0, 0]}), "'high' must be >= 'low'"),
    ],
)
def test_corrupt_stats_is_a_one_line_error(tmp_path: Path, content: str, problem: str) -> None:
    (tmp_path / "stats.json").write_text(content)
    with pytest.raises(SatdetError, match=problem) as info:
        load_stats(tmp_path)
    assert str(tmp_path / "stats.json") in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_numpy_normalizer_matches_the_tf_definition(dtype: str) -> None:
    from pipeline.data.stats import numpy_normalizer

    stats = {**STATS_U16, "dtype": dtype, "low": [3, 20, 0, 50], "high": [250, 200, 255, 60]}
    if dtype == "uint8":  # every possible value in every band
        image = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 4, 1).reshape(16, 16, 4)
    else:
        image = np.random.default_rng(0).integers(0, 2000, (16, 16, 4)).astype(np.uint16)
    np.testing.assert_allclose(numpy_normalizer(stats)(image), normalize(image, stats).numpy(), rtol=1e-6, atol=1e-6)
    rgb = {**stats, "channels": 1, "low": [3], "high": [250], "mean": [100.0], "std": [20.0]}
    single = image[:, :, :1]
    np.testing.assert_allclose(numpy_normalizer(rgb)(single), normalize(single, rgb).numpy(), rtol=1e-6, atol=1e-6)
