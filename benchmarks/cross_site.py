"""Leave-one-site-out accuracy: train on the Yellowstone scene, score the Florida plot it never saw.

    .venv/bin/python benchmarks/cross_site.py                       # tile + train (≈40 min on 2 cores) + score
    .venv/bin/python benchmarks/cross_site.py --runs-dir runs --skip-train   # score an existing run again
    .venv/bin/python benchmarks/cross_site.py -s train.steps=600 -s train.time_budget_minutes=null

Uses configs/neon-trees-cross-site.yaml (the shipped NEON recipe with OSBS_029 held out as the test
split). After training, the exported model is scored at scene level (what `satdet predict` delivers):
on the Florida plot (cross-site) and on the Yellowstone validation blocks (same site), once per
test-time variant: training vs scene normalisation, AdaBN on/off, flips on/off. Also on the three
plots of data/neon-eval (other sites and another part of Yellowstone, never trained on; --no-other-sites
skips them): per plot and pooled. Prints one JSON object: per variant, AP / AP50 / AP75, best F1 and
precision/recall at the model's output threshold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {  # every option explicit: the defaults may change (predict.normalize is "scene" by default)
    "train_stats": {"normalize": "train", "adapt_bn": False, "tta": False},
    "scene_norm": {"normalize": "scene", "adapt_bn": False, "tta": False},
    "adabn": {"normalize": "train", "adapt_bn": True, "tta": False},
    "scene_norm+adabn": {"normalize": "scene", "adapt_bn": True, "tta": False},
    "tta": {"normalize": "train", "adapt_bn": False, "tta": True},
    "scene_norm+tta": {"normalize": "scene", "adapt_bn": False, "tta": True},
    "scene_norm+adabn+tta": {"normalize": "scene", "adapt_bn": True, "tta": True},
}


OTHER_SITES = ROOT / "data" / "neon-eval"
OTHER_SCENES = ("SOAP_061.png", "2018_SJER_3_252000_4107000_image_477.tif", "2019_YELL_2_541000_4977000_image_crop.png")


def _summary(metrics: dict, scene: dict | None = None) -> dict:
    scene = scene if scene is not None else metrics.get("scene") or {}
    out = {k: round(float(scene[k]), 4) for k in ("AP", "AP50", "AP75") if k in scene}
    best = (scene.get("prf") or {}).get("0.5") or {}
    at = (scene.get("at_output_threshold") or {}).get("0.5") or {}
    out["best_f1"] = round(float(best.get("f1", -1)), 4)
    out["best_f1_threshold"] = round(float(best.get("score_threshold", -1)), 4)
    out["at_output_threshold"] = {k: round(float(at[k]), 4) for k in ("score_threshold", "precision", "recall")
                                  if k in at}
    out["n_gt"] = scene.get("n_gt")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "neon-trees-cross-site.yaml"))
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--skip-train", action="store_true", help="Score the run's existing export only.")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="Comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--set", "-s", action="append", default=[], help="Config override section.key=value.")
    ap.add_argument("--no-other-sites", action="store_true", help="Skip the data/neon-eval plots.")
    args = ap.parse_args()

    from pipeline.tf_quiet import import_tensorflow

    import_tensorflow()
    from pipeline.config import load_config, save_config
    from pipeline.data.tiles import tile_count
    from pipeline.evaluate.run import run_evaluation
    from pipeline.geo.tiling import run_tiling
    from pipeline.train.run import run_training

    cfg = load_config(args.config, [f"runs_dir={args.runs_dir}", *args.set])
    run_dir = cfg.run_dir
    result: dict = {"benchmark": "cross_site", "config": args.config, "overrides": args.set,
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    if not args.skip_train:
        started = time.perf_counter()
        tiles = run_tiling(cfg)
        save_config(cfg, run_dir / "config.yaml")
        run_training(cfg, tiles, run_dir / "model")
        result["train_wall_s"] = round(time.perf_counter() - started, 1)
    summary_path = run_dir / "model" / "train_summary.json"
    if summary_path.is_file():
        s = json.loads(summary_path.read_text())
        result["train"] = {k: s.get(k) for k in ("steps_done", "steps_planned", "steps_fitted", "stop_reason",
                                                 "best_ap50", "wall_time_s") if k in s}
    result["variants"] = {}
    for name in args.variants.split(","):
        options = VARIANTS[name]
        row = {}
        for label, split in (("cross_site", "test"), ("same_site_val", "val")):
            if not tile_count(run_dir / "tiles", split):  # e.g. configs/neon-trees.yaml: no held-out scene
                continue
            c = cfg.model_copy(update={"predict": cfg.predict.model_copy(update=options),
                                       "evaluate": cfg.evaluate.model_copy(update={"split": split})})
            started = time.perf_counter()
            out = run_evaluation(c, run_dir / "model", run_dir / "tiles", run_dir / f"eval-{name}-{split}")
            row[label] = _summary(json.loads((out / "metrics.json").read_text()))
            row[label]["seconds"] = round(time.perf_counter() - started, 1)
        if not args.no_other_sites:
            row["other_sites"] = _other_sites(cfg, options, run_dir, name)
        result["variants"][name] = row
        others = row.get("other_sites", {}).get("pooled", {}).get("AP50")
        print(f"{name}: cross-site AP50 {row.get('cross_site', {}).get('AP50')}  same-site AP50 "
              f"{row.get('same_site_val', {}).get('AP50')}  other plots AP50 {others}", file=sys.stderr)
    print(json.dumps(result, indent=2))


def unseen_other_scenes(cfg) -> tuple[list[str], list[str]]:
    """The data/neon-eval plots the config does not tile (by file name, wherever its copy lies), and those it
    does: a plot the model trained on is no other-site figure."""
    tiled = {Path(scene.image).name for scene in cfg.tiling.scenes}
    return [f for f in OTHER_SCENES if f not in tiled], [f for f in OTHER_SCENES if f in tiled]


def _other_sites(cfg, options: dict, run_dir: Path, name: str) -> dict:
    """Score the data/neon-eval plots whole (evaluate.scenes, only_scenes): per plot and pooled; plots the
    config tiles are left out and listed under ``trained_on``."""
    from pipeline.config import SceneConfig
    from pipeline.evaluate.run import run_evaluation

    unseen, trained_on = unseen_other_scenes(cfg)
    if not unseen:
        return {"trained_on": trained_on}
    scenes = [SceneConfig(image=OTHER_SITES / f, labels=OTHER_SITES / f"{Path(f).stem}.pixel.csv")
              for f in unseen]
    c = cfg.model_copy(update={"predict": cfg.predict.model_copy(update=options),
                               "evaluate": cfg.evaluate.model_copy(update={"scenes": scenes, "only_scenes": True})})
    started = time.perf_counter()
    out = run_evaluation(c, run_dir / "model", run_dir / "tiles", run_dir / f"eval-{name}-other-sites")
    metrics = json.loads((out / "metrics.json").read_text())
    row = {scene: _summary(metrics, m) for scene, m in metrics["per_scene"].items()}
    row["pooled"] = _summary(metrics)
    row["pooled"]["seconds"] = round(time.perf_counter() - started, 1)
    if trained_on:
        row["trained_on"] = trained_on
    return row


if __name__ == "__main__":
    main()
