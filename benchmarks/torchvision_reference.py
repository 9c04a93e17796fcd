"""The torchvision reference for benchmarks/vs_torchvision.py: training and scene inference speed of
`fasterrcnn_mobilenet_v3_large_fpn` from scratch on this CPU. Prints JSON. Runs in a Python that has torch
and torchvision (`make bench-torchvision` builds .venv-torch from benchmarks/requirements-torchvision.txt);
it imports nothing of satdet, so the product's environment never needs torch.

    .venv-torch/bin/python benchmarks/torchvision_reference.py --scene S.tif --windows W.json --size native

--size native: torchvision resizes every image to min_size=max_size=the window size (no resampling of
400 px windows); --size default: the builder's own transform (min_size 800: a 400 px window is upsampled
to 800 px, what a user who keeps the defaults gets); --size matched: native, with the proposal and ROI
counts of satdet's NEON model section (1000 / 1000 training proposals, 256 sampled ROIs per image, 500
test proposals, up to 300 detections); its 256-channel FPN and 1024-wide box head stay (no builder option). Training: batch of random images with 30 boxes of
15-80 px (benchmarks/model.py's recipe), SGD momentum 0.9, global-norm clipping at 10. Scene inference:
the plain per-window loop a torchvision user writes: rasterio reads each window of `--windows` (the same
window list satdet's `predict` uses, written by the driver), batches of `--batch`, boxes above
`--score-threshold` shifted to scene pixels, then one class-aware NMS over the scene (IoU 0.5).
"""

from __future__ import annotations

import argparse
import json
import os
import time

MATCHED = {"rpn_pre_nms_top_n_train": 1000, "rpn_post_nms_top_n_train": 1000, "rpn_pre_nms_top_n_test": 1000,
           "rpn_post_nms_top_n_test": 500, "box_batch_size_per_image": 256, "box_detections_per_img": 300}


def _model(size: str, tile: int):
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

    options = {} if size == "default" else {"min_size": tile, "max_size": tile}
    if size == "matched":
        options.update(MATCHED)
    return fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=2, **options)


def _synthetic_batch(batch: int, tile: int, boxes: int = 30, seed: int = 0):
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    images = [torch.rand(3, tile, tile, generator=torch.Generator().manual_seed(seed + i)) for i in range(batch)]
    targets = []
    for _ in range(batch):
        wh = rng.uniform(15, 80, size=(boxes, 2))
        xy = rng.uniform(0, tile - 80, size=(boxes, 2))
        targets.append({"boxes": torch.tensor(np.concatenate([xy, xy + wh], -1), dtype=torch.float32),
                        "labels": torch.ones(boxes, dtype=torch.int64)})
    return images, targets


def train_speed(size: str, tile: int, batch: int, steps: int) -> dict:
    """Images per second of full training steps (forward, losses, backward, clip, SGD) after two warm-up steps."""
    import torch

    model = _model(size, tile).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, targets = _synthetic_batch(batch, tile)

    def step() -> None:
        losses = model(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()

    step()
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    return {"train_img_per_s": round(batch * steps / seconds, 3), "train_s_per_step": round(seconds / steps, 3)}


def scene_speed(size: str, scene: str, windows: list[list[int]], tile: int, batch: int, threshold: float) -> dict:
    """Mpx/s of the per-window loop over `windows` ([col, row, width, height]) of `scene`."""
    import numpy as np
    import rasterio
    import torch
    from rasterio.windows import Window
    from torchvision.ops import batched_nms

    model = _model(size, tile).eval()
    with torch.inference_mode():
        model([torch.zeros(3, tile, tile)] * batch)  # warm-up outside the timed run
    start = time.perf_counter()
    boxes, scores, labels = [], [], []
    with rasterio.open(scene) as ds, torch.inference_mode():
        width, height = ds.width, ds.height
        for i in range(0, len(windows), batch):
            chunk = windows[i : i + batch]
            images = [torch.from_numpy(ds.read([1, 2, 3], window=Window(*w)).astype(np.float32) / 255.0)
                      for w in chunk]
            for (col, row, _, _), out in zip(chunk, model(images), strict=True):
                keep = out["scores"] >= threshold
                boxes.append(out["boxes"][keep] + torch.tensor([col, row, col, row], dtype=torch.float32))
                scores.append(out["scores"][keep])
                labels.append(out["labels"][keep])
        all_boxes, all_scores, all_labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
        kept = batched_nms(all_boxes, all_scores, all_labels, 0.5)
    seconds = time.perf_counter() - start
    mpx = width * height / 1e6
    return {"scene_px": [width, height], "windows": len(windows), "seconds": round(seconds, 2),
            "mpx_per_s": round(mpx / seconds, 3), "windows_per_s": round(len(windows) / seconds, 2),
            "detections_after_merge": int(kept.numel())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scene", required=True, help="3-band uint8 GeoTIFF (the driver's synthetic scene).")
    p.add_argument("--windows", required=True, help="JSON list of [col, row, width, height] windows.")
    p.add_argument("--size", choices=["native", "default", "matched"], default="native")
    p.add_argument("--tile", type=int, default=400)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--score-threshold", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = the cores this process may use).")
    args = p.parse_args()
    import torch
    import torchvision

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    with open(args.windows) as f:
        windows = json.load(f)
    result = {"library": f"torch {torch.__version__}, torchvision {torchvision.__version__}",
              "model": "fasterrcnn_mobilenet_v3_large_fpn (weights None, num_classes 2)", "size": args.size,
              "threads": torch.get_num_threads()}
    if args.train_steps:
        result["train"] = train_speed(args.size, args.tile, args.batch, args.train_steps)
    result["scene"] = scene_speed(args.size, args.scene, windows, args.tile, args.batch, args.score_threshold)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
