"""Tiling benchmark: time against the physical floor (one plain full read) and peak RSS vs scene size.

    python benchmarks/tiling.py [--size 8192] [--rss-size 4096] [--repeat 5] [--work DIR]

Prints one JSON object:
  time.<scene>: best tiling seconds / best seconds of one `rasterio.open(p).read()` of the same file
                (goal ≤ 1.3), over --repeat interleaved runs, each after os.sync(); also the ratio of the
                medians, every run's time and the least CPU seconds (user + sys) of each
  rss: peak RSS of a tiling process at rss-size² and at (2·rss-size)² — 4× the area (goal ratio ≤ 1.2);
       each run in its own subprocess, plus a baseline process that imports everything and tiles a tiny scene.
Synthetic scenes (deflate, tiled 256, like typical delivered imagery) are generated once under --work.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _scene(work: Path, name: str, size: int, dtype: str, bands: int) -> Path:
    from pipeline.geo.synth import make_scene

    path = work / f"{name}.tif"
    if not path.exists():
        make_scene(work, name, size, size, seed=1, dtype=dtype, bands=bands, n_objects=(size // 40) ** 2 // 4)
    return path


def _config(image: Path, out: Path):  # type: ignore[no-untyped-def]
    from pipeline.config import config_from_dict

    return config_from_dict({
        "name": "bench", "runs_dir": str(out), "classes": ["crown", "roof", "vehicle"], "seed": 0,
        "tiling": {"scenes": [{"image": str(image), "labels": str(image.with_suffix(".geojson"))}],
                   "tile_size": 400, "overlap": 32, "workers": 1, "negative_ratio": 1000.0,
                   "split": {"method": "scene", "val_fraction": 0, "test_fraction": 0}},
    })


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _tile_once(image: Path, out: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + sys of every thread) of tiling `image` into `out`."""
    from pipeline.geo.tiling import run_tiling

    c0, t0 = _cpu_s(), time.perf_counter()
    run_tiling(_config(image, out), out / "tiles")
    return time.perf_counter() - t0, _cpu_s() - c0


def _read_once(image: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one plain full read of `image`."""
    import rasterio

    c0, t0 = _cpu_s(), time.perf_counter()
    with rasterio.open(image) as ds:
        ds.read()
    return time.perf_counter() - t0, _cpu_s() - c0


def _child(image: str, out: str) -> None:
    """Subprocess entry: tile one scene, print peak RSS (MiB)."""
    import tensorflow  # noqa: F401  (imported first so the baseline includes it)

    _tile_once(Path(image), Path(out))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the (big) parent across fork + exec.
    status = Path("/proc/self/status").read_text()
    hwm_kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), None)
    peak = hwm_kib / 1024 if hwm_kib else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mib": peak}))


def _rss(image: Path, work: Path) -> float:
    out = tempfile.mkdtemp(dir=work)
    res = subprocess.run([sys.executable, __file__, "--child", str(image), out], capture_output=True, text=True,
                         check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--rss-size", type=int, default=4096)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "satdet-bench-tiling")
    ap.add_argument("--child", nargs=2)
    ap.add_argument("--rss-only", action="store_true", help="Skip the timing part.")
    ap.add_argument("--repeat", type=int, default=5, help="Timing runs per scene (best is reported).")
    args = ap.parse_args()
    if args.child:
        _child(*args.child)
        return
    import tensorflow  # noqa: F401  (import cost is not tiling cost)

    args.work.mkdir(parents=True, exist_ok=True)
    result: dict = {"cpus": os.cpu_count(), "tile_size": 400, "overlap": 32, "time": {}, "rss": {}}
    # warm-up on a small scene: the first call imports pyogrio/geopandas/pyproj (~1 s), which is not tiling cost
    _tile_once(_scene(args.work, "rss_small_400", 400, "uint8", 3), Path(tempfile.mkdtemp(dir=args.work)))
    for name, dtype, bands in () if args.rss_only else (("rgb_uint8", "uint8", 3), ("b4_uint16", "uint16", 4)):
        image = _scene(args.work, f"{name}_{args.size}", args.size, dtype, bands)
        _read_once(image)  # warm the page cache so both measurements start from the same state
        read_runs, tile_runs = [], []  # (wall s, CPU s) per run
        for _ in range(args.repeat):  # interleaved; best of each (this VM's timings vary by up to 2x)
            os.sync()  # no writeback of the previous run's tiles competing with this measurement
            read_runs.append(_read_once(image))
            os.sync()
            out = Path(tempfile.mkdtemp(dir=args.work))
            tile_runs.append(_tile_once(image, out))
            tiles_bytes = sum(p.stat().st_size for p in out.rglob("*.tfrecord"))
            subprocess.run(["rm", "-rf", str(out)], check=False)
        (reads, read_cpu), (tiles, tile_cpu) = zip(*read_runs, strict=True), zip(*tile_runs, strict=True)
        read, tile = min(reads), min(tiles)
        result["time"][name] = {"size": args.size, "read_s": round(read, 3), "tiling_s": round(tile, 3),
                                "ratio": round(tile / read, 3),
                                "ratio_of_medians": round(statistics.median(tiles) / statistics.median(reads), 3),
                                "read_runs_s": [round(x, 3) for x in reads], "tiling_runs_s": [round(x, 3) for x in tiles],
                                # CPU seconds (user + sys, all threads): steadier than wall time on a shared VM
                                "read_cpu_s": round(min(read_cpu), 3), "tiling_cpu_s": round(min(tile_cpu), 3),
                                "file_mb": round(image.stat().st_size / 2**20, 1),
                                "tfrecord_mb": round(tiles_bytes / 2**20, 1)}
        for p in args.work.glob("tmp*"):
            subprocess.run(["rm", "-rf", str(p)], check=False)
    print(json.dumps(result["time"]), file=sys.stderr)
    small = _scene(args.work, "rss_small_400", 400, "uint8", 3)
    a = _scene(args.work, f"rss_{args.rss_size}", args.rss_size, "uint8", 3)
    b = _scene(args.work, f"rss_{2 * args.rss_size}", 2 * args.rss_size, "uint8", 3)
    base, ra, rb = _rss(small, args.work), _rss(a, args.work), _rss(b, args.work)
    result["rss"] = {"baseline_mib": round(base), f"{args.rss_size}_mib": round(ra),
                     f"{2 * args.rss_size}_mib": round(rb), "ratio_4x_area": round(rb / ra, 3),
                     "ratio_above_baseline": round((rb - base) / max(ra - base, 1e-9), 3)}
    for p in args.work.glob("tmp*"):
        subprocess.run(["rm", "-rf", str(p)], check=False)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
