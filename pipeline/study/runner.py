"""Running the clipping study: one training per (strategy, learning rate, seed), each in its own folder
`study/runs/<run_id>/` (train_log.jsonl, tensorboard/, result.json), then the report.

A run trains with the trainer's own `fit` (same step, clipping, telemetry and divergence stop as `satdet
train`) but skips what a study does not need: no SavedModel export, no best-checkpoint copies, and its
checkpoints are deleted at the end. Validation AP50 is measured once, on the final weights. Any exception
inside a run is recorded in its result (status 'failed') and the study goes on; Ctrl-C stops the study.
A finished run whose config and tiles are unchanged is reused on the next invocation unless `force`; one
whose config (any field, defaults included) or tiles changed is trained again, replacing the stored one.
Reuse is keyed on config and tiles, not on code: after changing the trainer or model code, use `force`.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.errors import SatdetError
from pipeline.files import atomic_write_json
from pipeline.study import metrics
from pipeline.study.plan import RunSpec, StudyPlan, config_digest, run_config, thresholds

RESULT = "result.json"
# on_event(kind, spec, info): kind is 'start' (info: {'index', 'total', 'log'}) or 'end' (info: the result).
EventFn = Callable[[str, RunSpec, dict[str, Any]], None]


def runs_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "runs"


def train_run(config: Config, tiles_dir: Path, model_dir: Path) -> dict[str, Any]:
    """Train one run (no export) and score the final weights on the val split; returns fit's summary plus
    `val_ap50`. The model is built by `build_for_training`, as in `satdet train`."""

    from pipeline.data.dataset import build_dataset
    from pipeline.data.stats import load_stats
    from pipeline.train.run import build_for_training, fit_on_tiles
    from pipeline.train.validation import Validation

    stats = load_stats(tiles_dir)
    model, strategy, exempt = build_for_training(config, int(stats["channels"]), stats=stats)
    summary = fit_on_tiles(model, strategy, exempt, config, tiles_dir, model_dir, progress=False)
    import tensorflow as tf

    summary["device"] = "GPU" if tf.config.list_logical_devices("GPU") else "CPU"
    t0 = time.monotonic()
    val = build_dataset(tiles_dir, "val", config, training=False)
    try:
        summary["val_ap50"] = Validation(model, val, list(config.classes), config.evaluate.max_dets).ap50(model)
    except Exception as err:  # noqa: BLE001 - weights that went wild can break inference; the training result still counts
        summary["val_ap50"] = math.nan
        summary["val_error"] = _one_line(err)
    summary["val_s"] = time.monotonic() - t0
    return summary


def run_one(config: Config, plan: StudyPlan, spec: RunSpec, tiles_dir: Path, out_dir: Path,
            digest: str) -> dict[str, Any]:
    """Train one run of the study and write its result.json; never raises for a training failure."""
    cfg = run_config(config, plan, spec)
    run_dir = runs_dir(out_dir) / spec.run_id
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    result: dict[str, Any] = {
        "run": spec.run_id, "strategy": spec.strategy, "lr": spec.lr, "seed": spec.seed,
        "steps_budget": plan.steps, "thresholds": thresholds(cfg, spec.strategy), "digest": digest,
    }
    t0 = time.monotonic()
    try:
        summary = train_run(cfg, tiles_dir, run_dir)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001 - the study records it and goes on
        result.update(status="failed", error=_one_line(err))
        (run_dir / "error.txt").write_text(traceback.format_exc())
    else:
        diverged = summary["stop_reason"] == "diverged" or summary["skipped_steps"] > 0 or not math.isfinite(
            summary["final_loss"])
        result.update(
            status="diverged" if diverged else "ok",
            stop_reason=summary["stop_reason"],
            steps_done=summary["step"],
            skipped_steps=summary["skipped_steps"],
            clip_fraction=summary["clip_fraction"],
            val_ap50=summary["val_ap50"],
            train_s=summary["wall_s"],
            val_s=summary["val_s"],
            device=summary["device"],
            error=summary.get("val_error", ""),
        )
        s = metrics.series(metrics.read_log(run_dir / "train_log.jsonl"))
        result.update(first_loss=metrics.initial_loss(s, plan.window),
                      last_loss=metrics.final_loss(s, plan.final_window)[0])
    finally:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # ~3x the weights per run; not needed
        _release_tf()
    result["wall_s"] = time.monotonic() - t0
    atomic_write_json(run_dir / RESULT, _json_safe(result))
    return result


def load_result(out_dir: Path, spec: RunSpec) -> dict[str, Any] | None:
    """A run's stored result, or None."""
    path = runs_dir(out_dir) / spec.run_id / RESULT
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def study_digest(config: Config, plan: StudyPlan, spec: RunSpec, tiles_dir: Path) -> str:
    """What a stored result must match to be reused: the run's config and the tiles' stats and manifest."""
    h = hashlib.sha256(config_digest(run_config(config, plan, spec)).encode())
    for name in ("stats.json", "manifest.jsonl"):
        path = Path(tiles_dir) / name
        h.update(path.read_bytes() if path.exists() else b"")
    return h.hexdigest()[:16]


def stored_run(config: Config, plan: StudyPlan, spec: RunSpec, tiles_dir: Path, out_dir: Path
               ) -> tuple[str, dict[str, Any] | None]:
    """(the digest a stored result must match to be reused, the run's stored result or None)."""
    return study_digest(config, plan, spec, tiles_dir), load_result(out_dir, spec)


def run_or_reuse(config: Config, plan: StudyPlan, spec: RunSpec, tiles_dir: Path, out_dir: Path,
                 force: bool = False, stored: tuple[str, dict[str, Any] | None] | None = None) -> dict[str, Any]:
    """`run_one`, unless a stored ok/diverged result with the same config and tiles exists (and not `force`).
    A reused result carries `reused: True`. `stored`: `stored_run`'s answer, when the caller has it."""
    digest, old = stored or stored_run(config, plan, spec, tiles_dir, out_dir)
    if not force and old is not None and old.get("digest") == digest and old.get("status") in ("ok", "diverged"):
        return {**old, "reused": True}
    return run_one(config, plan, spec, tiles_dir, out_dir, digest)


def run_study(
    config: Config,
    tiles_dir: Path,
    out_dir: Path,
    plan: StudyPlan,
    *,
    force: bool = False,
    report_only: bool = False,
    on_event: EventFn | None = None,
) -> Path:
    """Run every run of `plan` on `tiles_dir` and write the report into `out_dir`; returns `out_dir`.

    `report_only`: train nothing; rewrite the report from the stored results (runs without one are left out).
    """
    from pipeline.study.report import write_report

    tiles_dir, out_dir = Path(tiles_dir), Path(out_dir)
    if report_only:
        if not runs_dir(out_dir).is_dir():
            raise SatdetError(f"{out_dir}: no study runs to report on; run the study first")
        return write_report(config, plan, out_dir)
    check_tiles(tiles_dir)
    runs = plan.runs()
    t0 = time.monotonic()
    for i, spec in enumerate(runs):
        stored = stored_run(config, plan, spec, tiles_dir, out_dir)
        if on_event:
            log = runs_dir(out_dir) / spec.run_id / "train_log.jsonl"
            digest, old = stored
            stale = old is not None and old.get("digest") != digest
            on_event("start", spec, {"index": i, "total": len(runs), "log": log, "stale": stale})
        result = run_or_reuse(config, plan, spec, tiles_dir, out_dir, force, stored)
        if on_event:
            on_event("end", spec, result)
    return write_report(config, plan, out_dir, study_wall_s=time.monotonic() - t0)


def check_tiles(tiles_dir: Path) -> None:
    """The study needs train tiles to learn from and val tiles to score (one-line errors otherwise)."""
    from pipeline.data.tiles import tile_count

    if not (tiles_dir / "stats.json").exists():
        raise SatdetError(f"{tiles_dir}: no tiles yet; run `satdet tile CONFIG` first")
    if tile_count(tiles_dir, "train") == 0:
        raise SatdetError(f"{tiles_dir}: no train tiles; check tiling.split")
    if tile_count(tiles_dir, "val") == 0:
        raise SatdetError(
            f"{tiles_dir}: no val tiles, and the study reports validation AP50; set tiling.split.val_fraction > 0"
        )


def _release_tf() -> None:
    """Drop the finished run's graphs and model so memory stays flat over many runs in one process."""
    keras = sys.modules.get("keras")  # not imported when no run has trained in this process
    if keras is not None:
        keras.backend.clear_session()
    gc.collect()


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _json_safe(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in obj.items()}
