"""`satdet train` refuses to start without tiles or over an existing run (one-line errors)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from pipeline.cli import app

DEMO = str(Path(__file__).parents[2] / "configs" / "demo.yaml")


def test_train_without_tiles_names_the_missing_stage(tmp_path):
    result = CliRunner().invoke(app, ["train", DEMO, "--set", f"runs_dir={tmp_path}"])
    assert result.exit_code == 2
    assert "no tiles yet" in result.output and "satdet tile" in result.output


def test_train_refuses_to_overwrite_checkpoints_without_resume(tmp_path):
    run = tmp_path / "demo"
    (run / "tiles").mkdir(parents=True)
    (run / "tiles" / "stats.json").write_text("{}")
    (run / "model" / "checkpoints").mkdir(parents=True)
    (run / "model" / "checkpoints" / "checkpoint").write_text('model_checkpoint_path: "ckpt-3"\n')
    result = CliRunner().invoke(app, ["train", DEMO, "--set", f"runs_dir={tmp_path}"])
    assert result.exit_code == 2
    assert "--resume" in result.output
