"""`satdet experiment clipping`: tiles first when needed, runs the grid, prints the output files; bad
options are one-line errors. Training is stood in for (the real thing is tested in test_study.py)."""

from __future__ import annotations

import csv

from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.study import runner

from .studykit import boom, fake_train_run, tiny_config, write_config


def test_cli_tiles_then_runs_the_study_and_names_its_outputs(tmp_path, study_scenes, monkeypatch):
    monkeypatch.setattr(runner, "train_run", fake_train_run)
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "runs", study_scenes, name="cli"))
    result = CliRunner().invoke(app, [
        "experiment", "clipping", str(cfg), "--strategies", "none,global_norm", "--lrs", "0.01,0.1",
        "--steps", "10", "--seeds", "0", "--set", "train.clip.clip_norm=2.5",
    ])
    assert result.exit_code == 0, result.output
    study = tmp_path / "runs" / "cli" / "study"
    assert "tiling first" in result.output and "4 runs × 10 steps" in result.output
    assert (tmp_path / "runs" / "cli" / "tiles" / "stats.json").exists()
    for name in ("results.csv", "report.md", "curves.png"):
        assert f"{name}: {study / name}" in result.output and (study / name).stat().st_size > 0
    with (study / "results.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["run"] for r in rows) == sorted(
        ["none-lr0.01-s0", "global_norm-lr0.01-s0", "none-lr0.1-s0", "global_norm-lr0.1-s0"])
    assert {r["thresholds"] for r in rows if r["strategy"] == "global_norm"} == {"clip_norm=2.5"}  # --set reached it
    assert "none-lr0.1-s0: ok" in result.output  # one line per finished run

    # --report-only trains nothing and rewrites the report, here with another target rule
    monkeypatch.setattr(runner, "train_run", boom)
    again = CliRunner().invoke(app, [
        "experiment", "clipping", str(cfg), "--strategies", "none,global_norm", "--lrs", "0.01,0.1",
        "--steps", "10", "--target-fraction", "0.9", "--report-only",
    ])
    assert again.exit_code == 0, again.output
    with (study / "results.csv").open(newline="") as fh:
        rerendered = list(csv.DictReader(fh))
    assert [r["status"] for r in rerendered] == [r["status"] for r in rows]  # nothing re-ran (boom would fail)
    assert float(rerendered[0]["target_loss"]) > float(rows[0]["target_loss"])


def test_cli_bad_options_are_one_line_errors(tmp_path, study_scenes):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "runs", study_scenes))
    for args, message in (
        (["--strategies", "none,clipit"], "unknown clipping strategy 'clipit'"),
        (["--lrs", "0.02,fast"], "--lrs '0.02,fast': expected a comma-separated list"),
        (["--steps", "3"], "at least 10 steps"),
    ):
        result = CliRunner().invoke(app, ["experiment", "clipping", str(cfg), *args])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()  # nothing was tiled or trained
