"""benchmarks/cross_site.py's other-site plots (data/neon-eval): every one opens and its labels read as the
benchmark reads them, with the crown counts and image sizes its README states."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.geo.labels import read_labels
from pipeline.geo.raster import raster_info

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "cross_site.py"
_spec = importlib.util.spec_from_file_location("cross_site", _PATH)
cross_site = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cross_site)


def _readme_rows() -> dict[str, tuple[int, int, int]]:
    """file -> (width, height, crowns) from the table of data/neon-eval/README.md."""
    rows = {}
    for line in (cross_site.OTHER_SITES / "README.md").read_text().splitlines():
        m = re.match(r"\| `([^`]+)` \| (\d+) × (\d+), .*? \| (\d+)", line)
        if m:
            rows[m[1]] = (int(m[2]), int(m[3]), int(m[4]))
    return rows


@pytest.mark.parametrize("scene", cross_site.OTHER_SCENES)
def test_every_other_site_plot_reads_with_the_stated_size_and_crowns(scene: str) -> None:
    image = cross_site.OTHER_SITES / scene
    labels = image.with_name(f"{image.stem}.pixel.csv")
    width, height, crowns = _readme_rows()[scene]
    info = raster_info(image)
    assert (info.width, info.height, info.count) == (width, height, 3)
    read = read_labels(labels, info, ["tree"], "label")
    assert len(read.boxes) == crowns and (read.class_ids == 1).all()
    boxes = np.asarray(read.boxes)
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= width).all() and (boxes[:, [1, 3]] <= height).all()


def test_plots_the_config_tiles_are_not_scored_as_other_sites(tmp_path: Path) -> None:
    from pipeline.config import load_config

    config = Path(__file__).resolve().parents[2] / "configs" / "neon-trees-cross-site.yaml"
    cfg = load_config(config)
    assert cross_site.unseen_other_scenes(cfg) == (list(cross_site.OTHER_SCENES), [])
    soap = tmp_path / "copies" / "SOAP_061.png"  # the same plot under another folder still counts as trained on
    scenes = [*cfg.tiling.scenes, cfg.tiling.scenes[0].model_copy(update={"image": soap, "split": "train"})]
    cfg = cfg.model_copy(update={"tiling": cfg.tiling.model_copy(update={"scenes": scenes})})
    unseen, trained_on = cross_site.unseen_other_scenes(cfg)
    assert trained_on == ["SOAP_061.png"] and "SOAP_061.png" not in unseen and len(unseen) == 2
