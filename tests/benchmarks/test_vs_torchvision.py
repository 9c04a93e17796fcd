"""benchmarks/vs_torchvision.py: both sides predict over the same windows; the reference needs no satdet."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.predict.windows import plan_windows

_ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("vs_torchvision", _ROOT / "benchmarks" / "vs_torchvision.py")
vs_torchvision = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vs_torchvision)


class _CountingDetector:
    """Records the windows `predict_region` sends; detects nothing."""

    def __init__(self) -> None:
        self.info = {"tile_size": 400, "channels": 3, "bands": [1, 2, 3], "dtype": "uint8", "classes": ["tree"]}
        self.shapes: list[tuple[int, int]] = []

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.shapes += [image.shape[:2] for image in images]
        b = len(images)
        return {"boxes": np.zeros((b, 1, 4), np.float32), "scores": np.zeros((b, 1), np.float32),
                "classes": np.zeros((b, 1), np.int32), "num_detections": np.zeros(b, np.int32)}


def test_the_reference_gets_the_windows_satdets_predict_reads_and_they_cover_the_scene(tmp_path):
    from pipeline.config import PredictConfig
    from pipeline.geo.synth import make_scene
    from pipeline.predict.scene import predict_region

    windows = vs_torchvision.window_list(1000, 400, 32)
    scene = make_scene(tmp_path, "scene", width=1000, height=1000, seed=0, resolution=0.1).image
    detector = _CountingDetector()
    result = predict_region(detector, scene, PredictConfig(tile_size=400, overlap=32, batch_size=4, score_threshold=0.3))
    assert result.windows == len(windows) == len(detector.shapes) == 9
    assert sorted(detector.shapes) == sorted((h, w) for _, _, w, h in windows)
    assert windows == [[w.col, w.row, w.width, w.height] for w in plan_windows((0, 0, 1000, 1000), 400, 32)]
    covered = np.zeros((1000, 1000), bool)
    for col, row, width, height in windows:
        assert width <= 400 and height <= 400 and col + width <= 1000 and row + height <= 1000
        covered[row : row + height, col : col + width] = True
    assert covered.all()


def test_ratios_divide_satdet_by_the_reference_and_leave_missing_figures_out():
    ours = {"train_img_per_s": 6.0, "mpx_per_s": 0.9}
    assert vs_torchvision.ratios(ours, {"train": {"train_img_per_s": 2.0}, "scene": {"mpx_per_s": 0.3}}) == {
        "train": 3.0, "scene_inference": 3.0}
    assert vs_torchvision.ratios(ours, {"scene": {"mpx_per_s": 0.45}}) == {"train": None, "scene_inference": 2.0}


def test_the_reference_script_imports_neither_satdet_nor_torch_before_its_arguments():
    # it runs in .venv-torch, which has no satdet; --help must work in an environment without torch too
    out = subprocess.run([sys.executable, str(_ROOT / "benchmarks" / "torchvision_reference.py"), "--help"],
                         capture_output=True, text=True, cwd="/", check=False)
    assert out.returncode == 0 and "--windows" in out.stdout
    tree = ast.parse((_ROOT / "benchmarks" / "torchvision_reference.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert {"torch", "torchvision", "rasterio"} <= imported  # the walk sees the imports inside functions
    assert "pipeline" not in imported


def test_the_driver_reads_indented_and_one_line_json_after_stray_output():
    assert vs_torchvision.last_json('note\n{\n  "a": 1,\n  "b": {"c": 2}\n}\n') == {"a": 1, "b": {"c": 2}}
    assert vs_torchvision.last_json('{"a": 1}\nwarning: {x}\n{"a": 2}\n') == {"a": 2}
