"""Accuracy on scenes at another ground pixel size, with and without `predict.match_resolution`.

    .venv/bin/python benchmarks/resolution.py --runs-dir runs            # after benchmarks/cross_site.py
    .venv/bin/python benchmarks/resolution.py --config configs/neon-trees-cross-site.yaml --runs-dir runs \
        --scene data/neon-trees/OSBS_029.tif --labels data/neon-trees/OSBS_029.geojson --sizes 0.05,0.15,0.2,0.3

The labelled scene (default: the Florida plot OSBS_029, 0.1 m) is resampled to each pixel size (averaged
down, bilinear up; the georeferenced labels stay valid) and the run's exported model scores every copy at
scene level, once predicting it as it is and once at the training pixel size (the default), with the
run's other test-time settings. Prints one JSON object: per pixel size and setting, AP / AP50 / AP75.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def resample_scene(src: Path, pixel: float, out: Path) -> Path:
    """`src` resampled to `pixel` (its CRS units) as a GeoTIFF at `out`."""
    import rasterio
    from rasterio.enums import Resampling

    with rasterio.open(src) as ds:
        factor = abs(ds.transform.a) / pixel
        h, w = max(1, round(ds.height * factor)), max(1, round(ds.width * factor))
        method = Resampling.average if factor < 1 else Resampling.bilinear
        data = ds.read(out_shape=(ds.count, h, w), resampling=method)
        transform = ds.transform * ds.transform.scale(ds.width / w, ds.height / h)
        profile = {**ds.profile, "width": w, "height": h, "transform": transform}
        profile.pop("blockxsize", None), profile.pop("blockysize", None), profile.pop("tiled", None)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(data)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "neon-trees-cross-site.yaml"))
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--scene", default=str(ROOT / "data" / "neon-trees" / "OSBS_029.tif"))
    ap.add_argument("--labels", default=str(ROOT / "data" / "neon-trees" / "OSBS_029.geojson"))
    ap.add_argument("--sizes", default="0.05,0.07,0.1,0.15,0.2,0.3", help="Pixel sizes in the scene's CRS units.")
    ap.add_argument("--set", "-s", action="append", default=[], help="Config override section.key=value.")
    args = ap.parse_args()

    from pipeline.tf_quiet import import_tensorflow

    import_tensorflow()
    from pipeline.config import SceneConfig, load_config
    from pipeline.evaluate.run import run_evaluation

    cfg = load_config(args.config, [f"runs_dir={args.runs_dir}", *args.set])
    run_dir = cfg.run_dir
    result: dict = {"benchmark": "resolution", "config": args.config, "run_dir": str(run_dir),
                    "scene": args.scene, "predict": cfg.predict.model_dump(include={"normalize", "adapt_bn", "tta"}),
                    "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for size in (float(s) for s in args.sizes.split(",")):
            image = resample_scene(Path(args.scene), size, Path(tmp) / f"{Path(args.scene).stem}_{size:g}.tif")
            row = {}
            for label, match in (("as_is", False), ("matched", True)):
                c = cfg.model_copy(update={
                    "predict": cfg.predict.model_copy(update={"match_resolution": match}),
                    "evaluate": cfg.evaluate.model_copy(update={
                        "scenes": [SceneConfig(image=image, labels=Path(args.labels))], "only_scenes": True})})
                started = time.perf_counter()
                out = run_evaluation(c, run_dir / "model", run_dir / "tiles", Path(tmp) / f"eval-{size:g}-{label}")
                scene = json.loads((out / "metrics.json").read_text())["scene"]
                row[label] = {k: round(float(scene[k]), 4) for k in ("AP", "AP50", "AP75")}
                row[label]["seconds"] = round(time.perf_counter() - started, 1)
            result["sizes"][f"{size:g}"] = row
            print(f"{size:g}: AP50 as is {row['as_is']['AP50']}  matched {row['matched']['AP50']}", file=sys.stderr)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
