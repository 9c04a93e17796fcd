"""The tiling work folder: the plan every scene task reads, and the folder each scene (or row block) fills.

    work/plan.json                   the tiling plan (pipeline.geo.plan), computed once per work folder
    work/scene-NNNN/                 one scene's TFRecord parts, manifest lines, pixel sample, scene.json
    work/scene-NNNN-rows-F-E/        one row block of it (pipeline.geo.blocks merges those)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.files import atomic_write_json
from pipeline.geo import plan as geo_plan

PLAN_FILE = "plan.json"


def load_plan(config: Config, work_dir: Path) -> dict[str, Any]:
    """The plan, computed once per work dir (parallel scene tasks read the same file)."""
    path = work_dir / PLAN_FILE
    if path.exists():
        return json.loads(path.read_text())
    plan = geo_plan.plan_tiling(config)
    atomic_write_json(path, plan)
    return plan


def scene_dir_name(scene_index: int, rows: tuple[int, int] | None = None) -> str:
    """The work folder of a scene (``scene-NNNN``) or of one of its row blocks (``scene-NNNN-rows-F-E``)."""
    return f"scene-{scene_index:04d}" + (f"-rows-{rows[0]:05d}-{rows[1]:05d}" if rows else "")
