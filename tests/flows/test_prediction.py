"""The prediction flow: one cached task per scene for an output folder (the model loaded once), one task
for an output file."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

import pipeline.predict.adapt as adapt_stage
import pipeline.predict.scene as scene_stage
import pipeline.predict.vectors as vectors_stage
from flows.prediction import predict_scenes
from pipeline.cli import app


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    export = tmp_path / "model" / "export"
    export.mkdir(parents=True)
    (export / "model_info.json").write_text(json.dumps({"classes": ["tree"], "tile_size": 64}))
    return tmp_path / "model"


@pytest.fixture
def rasters(tmp_path: Path) -> list[Path]:
    paths = []
    for name in ("a", "b"):
        p = tmp_path / "imagery" / f"{name}.tif"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(name.encode() * 10)  # content only matters to the cache key: the stage is faked
        paths.append(p)
    return paths


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Count model loads (the shared detector of the flow's process starts empty)."""
    from flows import prediction

    counter: Counter = Counter()
    prediction._LOADED.clear()

    def load(export_dir, cfg):
        assert (Path(export_dir) / "model_info.json").exists()
        counter["load"] += 1
        return SimpleNamespace(info={"classes": ["tree"]})

    monkeypatch.setattr(adapt_stage, "load_for_predict", load)
    monkeypatch.setattr(adapt_stage, "scene_detector", lambda base, scene, cfg: base)
    yield counter
    prediction._LOADED.clear()


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch, loads) -> list[list[str]]:
    """Replace the prediction stage by fakes that record the scenes of each call and write files: the
    whole-run stage (an output file) and the per-scene pieces (an output folder)."""
    seen: list[list[str]] = []

    def region(detector, scene, cfg, **kwargs):
        seen.append([Path(scene).name])
        return SimpleNamespace(scene=Path(scene).stem, cfg=cfg)

    def write(results, out, fmt="geojson"):
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"score_threshold": results[0].cfg.score_threshold}))
        return out

    monkeypatch.setattr(scene_stage, "predict_region", region)
    monkeypatch.setattr(vectors_stage, "write_detections", write)

    def fake(export_dir, scenes, out, cfg, **kwargs):
        assert (Path(export_dir) / "model_info.json").exists()
        seen.append([Path(s).name for s in scenes])
        out = Path(out)
        if out.suffix:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"scenes": [Path(s).stem for s in scenes]}))
            return [out]
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for s in scenes:
            f = out / f"{Path(s).stem}.geojson"
            f.write_text(json.dumps({"score_threshold": cfg.score_threshold}))
            written.append(f)
        return written

    monkeypatch.setattr(scene_stage, "predict_scenes", fake)
    return seen


def test_output_folder_predicts_each_scene_once_and_only_changed_scenes_again(prefect_api, model_dir, rasters,
                                                                               tmp_path, calls, loads):
    out = tmp_path / "pred"
    written = predict_scenes(str(model_dir), [str(p) for p in rasters], str(out), predict={"score_threshold": 0.4})
    assert sorted(Path(w).name for w in written) == ["a.geojson", "b.geojson"]
    assert sorted(calls) == [["a.tif"], ["b.tif"]]
    assert loads["load"] == 1  # one SavedModel load for both scene tasks
    assert json.loads((out / "a.geojson").read_text()) == {"score_threshold": 0.4}

    predict_scenes(str(model_dir), [str(p) for p in rasters], str(out), predict={"score_threshold": 0.4})
    assert len(calls) == 2  # both served from cache

    st = rasters[1].stat()
    os.utime(rasters[1], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # new imagery under the same name
    predict_scenes(str(model_dir), [str(p) for p in rasters], str(out), predict={"score_threshold": 0.4})
    assert len(calls) == 3 and calls[-1] == ["b.tif"]


def test_output_file_gets_every_scene_in_one_call(prefect_api, model_dir, rasters, tmp_path, calls):
    out = tmp_path / "pred" / "all.geojson"
    written = predict_scenes(str(model_dir / "export"), [str(p) for p in rasters], str(out))
    assert written == [str(out)]
    assert calls == [["a.tif", "b.tif"]]


def test_cli_reports_missing_model_in_one_line(prefect_api, rasters, tmp_path, calls):
    result = CliRunner().invoke(app, ["predict-flow", str(tmp_path / "nomodel"), str(rasters[0]),
                                      "--out", str(tmp_path / "pred")])
    assert result.exit_code == 2
    assert "no exported model here" in result.output
    assert calls == []


def test_without_predict_settings_the_flow_uses_those_stored_with_the_model(prefect_api, model_dir, rasters, tmp_path,
                                                                             monkeypatch):
    info = {"classes": ["tree"], "tile_size": 64, "predict": {"normalize": "train", "adapt_bn": False, "tta": True}}
    (model_dir / "export" / "model_info.json").write_text(json.dumps(info))
    seen = []

    def fake(export_dir, scenes, out, cfg, **kwargs):
        seen.append(cfg)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("{}")
        return [out]

    monkeypatch.setattr(scene_stage, "predict_scenes", fake)
    predict_scenes(str(model_dir), [str(rasters[0])], str(tmp_path / "p" / "all.geojson"))
    assert seen[-1].tta is True and seen[-1].normalize == "train"
    predict_scenes(str(model_dir), [str(rasters[0])], str(tmp_path / "q" / "all.geojson"), predict={"overlap": 8})
    assert seen[-1].tta is False and seen[-1].normalize == "scene"  # given settings replace the stored ones
