"""A short real study: tiny model, synthetic tiles, two strategies × two learning rates, a few steps.

The high learning rate (1e6) makes the unclipped run diverge: it must come back as a 'diverged' row, the
other runs must still finish, and every output must be written. One study is trained per module; the
other tests reuse it (or stand in for training where only the study's bookkeeping is under test).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pipeline.config import config_from_dict
from pipeline.study import runner
from pipeline.study.plan import StudyPlan
from pipeline.study.report import COLUMNS
from pipeline.study.runner import run_study

from .studykit import boom, fake_train_run, tiny_config

CLIP_NORM = 0.5  # below the tiny model's typical global norm (~1.4): global_norm clips every step
PLAN = StudyPlan(strategies=("none", "global_norm"), lrs=(0.005, 1e6), steps=6, window=2, final_window=3,
                 max_consecutive_skips=2)


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "results.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == COLUMNS
        return {r["run"]: r for r in reader}


def _log(out: Path, run: str) -> list[dict]:
    return [json.loads(line) for line in (out / "runs" / run / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def config(tmp_path_factory, study_scenes):
    data = tiny_config(tmp_path_factory.mktemp("study-runs"), study_scenes)
    data["train"]["clip"] = {"clip_norm": CLIP_NORM}
    return config_from_dict(data)


@pytest.fixture(scope="module")
def study(config, study_tiles):
    events: list[tuple[str, str, dict]] = []
    out = run_study(config, study_tiles, config.run_dir / "study", PLAN,
                    on_event=lambda kind, spec, info: events.append((kind, spec.run_id, dict(info))))
    return out, events


def test_a_short_study_writes_every_output_with_one_row_per_run(study):
    out, events = study
    rows = _rows(out)
    assert set(rows) == {"none-lr0.005-s0", "global_norm-lr0.005-s0", "none-lr1e+06-s0", "global_norm-lr1e+06-s0"}
    assert [k for k, _, _ in events] == ["start", "end"] * 4

    for run in ("none-lr0.005-s0", "global_norm-lr0.005-s0"):
        r = rows[run]
        assert (r["status"], r["stop_reason"], r["steps_done"], r["skipped_steps"]) == ("ok", "steps", "6", "0")
        assert 0.0 <= float(r["val_ap50"]) <= 1.0
        assert float(r["grad_norm_median"]) > CLIP_NORM  # measured before clipping
        assert float(r["final_loss"]) > 0 and float(r["initial_loss"]) > 0 and float(r["wall_s"]) > 0
        assert [rec["step"] for rec in _log(out, run)] == [1, 2, 3, 4, 5, 6]  # every step logged
        assert not (out / "runs" / run / "checkpoints").exists()

    # the thresholds of the user's clip block are the ones used: every global_norm step was clipped to 0.5
    assert float(rows["none-lr0.005-s0"]["clip_fraction"]) == 0.0
    assert float(rows["global_norm-lr0.005-s0"]["clip_fraction"]) == 1.0
    assert rows["global_norm-lr0.005-s0"]["thresholds"] == f"clip_norm={CLIP_NORM:g}"
    assert all(rec["grad_norm_after"] <= CLIP_NORM * 1.0001 for rec in _log(out, "global_norm-lr0.005-s0"))
    # one target per seed, shared by every run
    assert len({r["target_loss"] for r in rows.values()}) == 1

    report = (out / "report.md").read_text()
    assert "## Learning rate 0.005" in report and "## Learning rate 1e+06" in report
    assert "## How sure we are" in report and "One seed" in report
    assert report.count("| `none` |") == 2 and report.count("| `global_norm` |") == 2
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_a_run_forced_to_diverge_is_reported_as_diverged(study):
    out, _ = study
    r = _rows(out)["none-lr1e+06-s0"]
    assert r["status"] == "diverged" and r["stop_reason"] == "diverged"
    assert int(r["skipped_steps"]) >= PLAN.max_consecutive_skips and int(r["steps_done"]) < PLAN.steps
    assert r["first_nonfinite_step"] != "" and r["final_loss"] == ""  # no finite final loss to report
    assert any(rec["loss"] is None for rec in _log(out, "none-lr1e+06-s0"))  # a NaN/inf step, logged as null
    report = (out / "report.md").read_text()
    table = report.split("## Learning rate 1e+06")[1]
    assert "| `none` | 1/1 diverged |" in table


def test_a_second_invocation_reuses_finished_runs(study, config, study_tiles, monkeypatch):
    out, _ = study
    monkeypatch.setattr(runner, "train_run", boom)  # training again would turn the runs into 'failed'
    ends = []
    run_study(config, study_tiles, out, PLAN, on_event=lambda k, s, info: ends.append(info) if k == "end" else None)
    assert len(ends) == 4 and all(e.get("reused") for e in ends)
    assert {r["status"] for r in _rows(out).values()} == {"ok", "diverged"}


def test_a_run_that_raises_is_recorded_as_failed_and_the_study_goes_on(config, study_tiles, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "train_run", fake_train_run)
    plan = StudyPlan(strategies=("none", "agc", "zclip", "value"), lrs=(0.01,), steps=10)
    out = run_study(config, study_tiles, tmp_path / "study", plan)
    rows = _rows(out)
    assert [rows[f"{s}-lr0.01-s0"]["status"] for s in plan.strategies] == ["ok", "failed", "ok", "unstable"]
    assert rows["agc-lr0.01-s0"]["error"] == "RuntimeError: boom: the trainer crashed"
    assert "Traceback" in (out / "runs" / "agc-lr0.01-s0" / "error.txt").read_text()
    # loss 2/i: initial (first 5 steps) 0.913, target 0.457; the trailing 5-step mean is 0.437 at step 7
    assert rows["none-lr0.01-s0"]["steps_to_target"] == "7"
    report = (out / "report.md").read_text()
    assert "## Failed runs" in report
    # ranking: the two ok runs first, then the unstable one, then the failed one
    order = [line.split("`")[1] for line in report.splitlines() if line.startswith("| ") and "`" in line]
    assert order[:2] in (["none", "zclip"], ["zclip", "none"]) and order[2:] == ["value", "agc"]
