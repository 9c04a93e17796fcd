"""satdet against torchvision on this CPU, side by side: training and whole-scene inference speed. Prints JSON.

    make bench-torchvision                                        # builds .venv-torch, then runs this
    .venv/bin/python benchmarks/vs_torchvision.py --torch-python .venv-torch/bin/python
    .venv/bin/python benchmarks/vs_torchvision.py --torch-python .venv-torch/bin/python \
        --export runs/neon-trees/model/export --size 4096

One after the other on the same machine, each in its own process with all cores: satdet's model train step
(benchmarks/model.py, the config's model section, no input pipeline) and whole-scene inference
(benchmarks/predict.py: `predict_region`, the streaming reader, the seam merge), then torchvision's
`fasterrcnn_mobilenet_v3_large_fpn` from scratch (benchmarks/torchvision_reference.py, run by
`--torch-python`) on the same synthetic scene and the same window list, at the window size (`native`), with
the builder's default resize to 800 px (`default`), and at the window size with satdet's proposal / ROI
counts (`matched`: what of the ratio is configuration and what is implementation). The ratios compare satdet with each; the bar is
satdet >= 3x torchvision on both. `--tta` also times satdet with test-time flips (four views per window, on
in the NEON configs), outside the ratios: torchvision's loop has no such option. The synthetic scene is pipeline.geo.synth's (seed 0, 0.1 m pixels), the
one benchmarks/predict.py writes for the same --size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def window_list(size: int, tile: int, overlap: int) -> list[list[int]]:
    """The windows satdet's `predict` plans over a size x size scene, as [col, row, width, height]."""
    from pipeline.predict.windows import plan_windows, usable_overlap

    return [[w.col, w.row, w.width, w.height] for w in plan_windows((0, 0, size, size), tile, usable_overlap(overlap, tile))]


def _json_of(cmd: list[str]) -> dict:
    """Run a benchmark command; its JSON is the last object printed on stdout (one line or indented)."""
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return last_json(out.stdout)


def last_json(text: str) -> dict:
    """The last JSON object in `text` that starts on a line of its own (stray lines before it are skipped)."""
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            try:
                return json.JSONDecoder().raw_decode("\n".join(lines[i:]))[0]
            except json.JSONDecodeError:
                continue
    raise SystemExit(f"no JSON object in the benchmark output: {text[-500:]!r}")


def ratios(ours: dict, reference: dict) -> dict:
    """satdet / torchvision for training img/s and scene Mpx/s (None where a side has no figure)."""
    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a and b else None

    return {"train": ratio(ours.get("train_img_per_s"), reference.get("train", {}).get("train_img_per_s")),
            "scene_inference": ratio(ours.get("mpx_per_s"), reference.get("scene", {}).get("mpx_per_s"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--torch-python", required=True, help="A Python with torch + torchvision (.venv-torch/bin/python).")
    p.add_argument("--config", default=str(ROOT / "configs" / "neon-trees.yaml"), help="satdet's model section.")
    p.add_argument("--export", help="Predict with this trained export (default: the config's model, untrained).")
    p.add_argument("--size", type=int, default=2048, help="Scene edge in pixels.")
    p.add_argument("--tile", type=int, default=400)
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--train-steps", type=int, default=5, help="Timed training steps per side (>= 1).")
    p.add_argument("--score-threshold", type=float, default=0.3, help="Boxes kept before the merge, both sides.")
    p.add_argument("--reference-sizes", default="native,default,matched", help="torchvision settings to run.")
    p.add_argument("--tta", action="store_true", help="Also time satdet's scene inference with test-time flips "
                   "(predict.tta, on in the NEON configs: four views per window); reported, not in the ratios.")
    args = p.parse_args()
    if args.train_steps < 1:
        p.error("--train-steps must be >= 1")
    # the benchmarks run from the repository root: paths given relative to the caller's folder (abspath, not
    # resolve: a venv's python is a symlink whose target lies outside the venv)
    torch_python = os.path.abspath(args.torch_python)
    config, export = os.path.abspath(args.config), args.export and os.path.abspath(args.export)
    load_before = os.getloadavg()[0]

    from pipeline.geo.synth import make_scene

    py = sys.executable
    ours_train = _json_of([py, "benchmarks/model.py", "--config", config, "--variant", "plain",
                           "--steps", str(args.train_steps), "--batch", str(args.batch), "--size", str(args.tile)])
    predict_cmd = [py, "benchmarks/predict.py", "--size", str(args.size), "--rss-size", "0", "--tile", str(args.tile),
                   "--overlap", str(args.overlap), "--batch", str(args.batch), "--score-threshold", str(args.score_threshold)]
    predict_cmd += ["--export", export] if export else ["--config", config]
    ours_scene = _json_of(predict_cmd)["throughput"]
    ours = {"train_img_per_s": ours_train["results"][0].get("train_img_per_s"), "mpx_per_s": ours_scene["mpx_per_s"],
            "scene": ours_scene, "model": export or config}
    if args.tta:
        ours["mpx_per_s_with_flips"] = _json_of(predict_cmd + ["--tta"])["throughput"]["mpx_per_s"]
    result = {"benchmark": "vs_torchvision",
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_1min_before": load_before},
              "settings": {k: getattr(args, k) for k in ("size", "tile", "overlap", "batch", "train_steps", "score_threshold")},
              "satdet": ours, "torchvision": {}, "satdet_over_torchvision": {}}
    with tempfile.TemporaryDirectory() as tmp:
        scene = make_scene(Path(tmp), "scene", width=args.size, height=args.size, seed=0, resolution=0.1).image
        windows = Path(tmp) / "windows.json"
        windows.write_text(json.dumps(window_list(args.size, args.tile, args.overlap)))
        for size in args.reference_sizes.split(","):
            ref = _json_of([torch_python, "benchmarks/torchvision_reference.py", "--scene", str(scene),
                            "--windows", str(windows), "--size", size, "--tile", str(args.tile),
                            "--batch", str(args.batch), "--train-steps", str(args.train_steps),
                            "--score-threshold", str(args.score_threshold)])
            result["torchvision"][size] = ref
            result["satdet_over_torchvision"][size] = ratios(ours, ref)
    result["machine"]["load_1min_end"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
