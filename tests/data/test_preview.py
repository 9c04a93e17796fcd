"""`satdet dataset --preview` and the preview grid (pipeline/data/preview.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.data.preview import _display


def test_dataset_command_checks_and_writes_a_preview(rgb_tiles: Path, tmp_path: Path) -> None:
    tiles_dir = Path(shutil.copytree(rgb_tiles, tmp_path / "runs" / "demo" / "tiles"))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"name": "demo", "runs_dir": str(tmp_path / "runs"),
                                   "tiling": {"tile_size": 64, "overlap": 8}, "data": {"batch_size": 2}}))
    result = CliRunner().invoke(app, ["dataset", str(cfg), "--preview", "5", "--set", "data.seed=3"])
    assert result.exit_code == 0, result.output
    assert result.output.split() == [str(tiles_dir / "dataset.json"), str(tiles_dir / "preview.png")]
    assert json.loads((tiles_dir / "dataset.json").read_text())["batch_size"] == 2
    png = mpimg.imread(tiles_dir / "preview.png")
    assert png.ndim == 3 and png.shape[0] > 300 and png[..., :3].std() > 0.05  # a drawn grid, not a blank page


def test_dataset_command_reports_user_errors_in_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"name": "nothing", "runs_dir": str(tmp_path)}))
    result = CliRunner().invoke(app, ["dataset", str(cfg)])
    assert result.exit_code == 2
    assert "stats.json: not found; run the tiling stage" in result.output


def test_display_maps_the_clip_range_to_unit_and_shows_three_bands() -> None:
    stats = {"low": [0, 10, 0, 0], "high": [100, 20, 1, 1], "mean": [50, 15, 0, 0], "std": [50, 5, 1, 1]}
    image = np.array([[[-1.0, 1.0, 0.5, 0.0], [1.0, -1.0, 0.5, 0.0]]], np.float32)  # normalised values
    np.testing.assert_allclose(_display(image, stats), [[[0.0, 1.0, 0.5], [1.0, 0.0, 0.5]]])
