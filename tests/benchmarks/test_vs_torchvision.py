"""benchmarks/vs_torchvision.py: both sides predict over the same windows; the reference needs no satdet."""

from __future__ import annotations

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


def test_the_reference_gets_satdets_window_plan_and_it_covers_the_scene():
    windows = vs_torchvision.window_list(1000, 400, 32)
    planned = plan_windows((0, 0, 1000, 1000), 400, 32)
    assert windows == [[w.col, w.row, w.width, w.height] for w in planned]
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
    source = (_ROOT / "benchmarks" / "torchvision_reference.py").read_text()
    assert "pipeline" not in [line.split()[1].split(".")[0] for line in source.splitlines()
                              if line.startswith(("import ", "from "))]
