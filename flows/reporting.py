"""Prefect artifacts for a finished training run: a markdown run report, a per-class AP table and a link
to the PR curve. They summarise files the stages already wrote (metrics.json, qa.json, ...); nothing is
computed here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipeline.config import Config
from pipeline.files import atomic_write_text

_HEADLINE = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR")


def slug(name: str) -> str:
    """An artifact key from a run name (Prefect keys allow lowercase letters, digits and dashes)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "run"


def _fmt(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "n/a" if value < 0 else f"{value:.3f}"  # pycocotools uses -1 for "undefined"
    return "n/a" if value is None else str(value)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def per_class_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per class from metrics.json (scene level when present, else tile level)."""
    level = "scene" if (metrics.get("scene") or {}).get("per_class") else "tile"
    rows = []
    for name, m in ((metrics.get(level) or {}).get("per_class") or {}).items():
        rows.append({"class": name, "level": level, **{k: m.get(k) for k in ("AP", "AP50", "AP75", "n_gt", "n_det")}})
    return rows


def run_report(config: Config, run_dir: Path, eval_dir: Path, metrics: dict[str, Any]) -> str:
    """The markdown run report shown in the Prefect UI (and saved beside the run when eval has none)."""
    lines = [f"# satdet run `{config.name}`", "", f"Run folder: `{run_dir}`", ""]
    levels = [lvl for lvl in ("scene", "tile") if isinstance(metrics.get(lvl), dict)]
    if levels:
        lines += [f"## Metrics ({config.evaluate.split} split)", ""]
        lines.append("| metric | " + " | ".join(levels) + " |")
        lines.append("|---|" + "---|" * len(levels))
        for key in _HEADLINE:
            if any(key in metrics[lvl] for lvl in levels):
                lines.append(f"| {key} | " + " | ".join(_fmt(metrics[lvl].get(key)) for lvl in levels) + " |")
        lines.append("")
    rows = per_class_rows(metrics)
    if rows:
        lines += [f"## Per-class AP ({rows[0]['level']} level)", "", "| class | AP | AP50 | AP75 | GT | detections |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['class']} | {_fmt(r['AP'])} | {_fmt(r['AP50'])} | {_fmt(r['AP75'])} | {_fmt(r['n_gt'])} | "
                  f"{_fmt(r['n_det'])} |" for r in rows]
        lines.append("")
    qa = _read_json(run_dir / "tiles" / "qa.json")
    if qa.get("tiles"):
        tiles = qa["tiles"]
        lines += ["## Data", "", "tiles: " + ", ".join(f"{k} {tiles.get(k, 0)}" for k in ("train", "val", "test")),
                  "boxes: " + ", ".join(f"{k} {v}" for k, v in (qa.get("boxes") or {}).items()), ""]
    summary = _read_json(run_dir / "model" / "train_summary.json")
    if summary:
        shown = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))}
        lines += ["## Training", "", *(f"- {k}: {_fmt(v)}" for k, v in shown.items()), ""]
    lines += ["## Files", ""]
    for label, path in (
        ("resolved config", run_dir / "config.yaml"),
        ("evaluation report", eval_dir / "report.md"),
        ("PR curve", eval_dir / "pr_curve.png"),
        ("examples", eval_dir / "examples.png"),
        ("exported model", run_dir / "model" / "export"),
        ("TensorBoard logs", run_dir / "model" / "tensorboard"),
    ):
        if path.exists():
            lines.append(f"- {label}: [{path}]({path.as_uri()})")
    return "\n".join(lines) + "\n"


def publish_artifacts(config: Config, run_dir: Path, eval_dir: Path, metrics: dict[str, Any]) -> Path:
    """Create the run's Prefect artifacts; returns the report a user should read (eval/report.md, or
    run_dir/report.md with the run summary when the evaluation wrote none)."""
    key = slug(config.name)
    markdown = run_report(config, run_dir, eval_dir, metrics)
    create_markdown_artifact(markdown, key=f"{key}-report", description=f"satdet run {config.name}")
    rows = per_class_rows(metrics)
    if rows:
        create_table_artifact(rows, key=f"{key}-per-class-ap", description="Per-class AP (pycocotools)")
    curve = eval_dir / "pr_curve.png"
    if curve.exists():
        # Image artifacts need a URL; for local runs a markdown link to the file is what works.
        create_markdown_artifact(
            f"![PR curve]({curve.as_uri()})\n\nPR curve: [{curve}]({curve.as_uri()})\n",
            key=f"{key}-pr-curve",
            description="Precision-recall curve",
        )
    report = eval_dir / "report.md"
    if not report.exists():
        report = atomic_write_text(run_dir / "report.md", markdown)
    return report
