"""The pixel sample behind stats.json: per scene, a fixed number of pixel positions drawn in every chosen
tile (nodata ones left out), at most `tiling.stats_max_pixels` kept; stats.json computed from the train
tiles' pixels of all scenes (the normalisation contract, pipeline.data.stats), and each scene's own numbers
from all its tiles' pixels (`scenes`, for `data.normalize: scene`).

The draws follow the scene's tile order, not its reading order: the k-th chosen tile of a scene takes the
k-th draw of the scene's generator whichever row block cuts it (`sample_rng`), so row blocks sample the
same pixels as a whole scene.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.data.stats import percentile_stats

SAMPLE_KEYS = ("train", "other")  # sample_train.npy (train tiles), sample_other.npy (val/test tiles)


def sample_rng(config: Config, scene_index: int, draws: int, tile: int, per_tile: int) -> np.random.Generator:
    """The generator of a scene's stats pixel sample after `draws` tiles' draws: the k-th chosen tile of a scene
    gets the k-th draw whichever row block cuts it, so row blocks sample the same pixels as a whole scene."""
    rng = np.random.default_rng([config.seed, scene_index, 1])
    for _ in range(draws):
        rng.integers(0, tile * tile, per_tile)
    return rng


def trim_sample(arr: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """At most `limit` pixels of a scene's sample, picked by `rng` (after all the scene's tile draws)."""
    return arr[rng.permutation(len(arr))[:limit]] if len(arr) > limit else arr


class SceneSample:
    """The stats pixel sample of one scene (or of a row block of it), tile by tile in scene order.

    `n_train` is the scene's number of chosen train tiles (each tile gets an equal share of
    `tiling.stats_max_pixels`); `draws_before` the number of chosen tiles before the first one cut here
    (non-zero for a row block below the first)."""

    def __init__(self, config: Config, scene_index: int, tile: int, n_train: int, draws_before: int) -> None:
        self.tile, self.limit = tile, config.tiling.stats_max_pixels
        self.per_tile = math.ceil(self.limit / max(1, n_train))
        self.rng = sample_rng(config, scene_index, draws_before, tile, self.per_tile)
        self.pixels: dict[str, list[np.ndarray]] = {k: [] for k in SAMPLE_KEYS}

    def draw(self) -> np.ndarray:
        """The next chosen tile's pixel positions. Drawn for every chosen tile, also one then skipped for
        nodata: the k-th tile's draw stays the k-th however the scene is split into row blocks."""
        return self.rng.integers(0, self.tile * self.tile, self.per_tile)

    def add(self, split: str, img: np.ndarray, valid: np.ndarray | None, pick: np.ndarray) -> None:
        """The pixels of a kept tile at the drawn positions `pick`, minus nodata ones (no copy of the tile)."""
        if valid is not None:
            pick = pick[valid.ravel()[pick]]
        self.pixels["train" if split == "train" else "other"].append(img[pick // self.tile, pick % self.tile])

    def save(self, out: Path, channels: int, trim: bool) -> None:
        """sample_train.npy and sample_other.npy in `out`; trimmed to the limit for a whole scene (a row
        block's sample is trimmed when the blocks merge)."""
        for key, arrs in self.pixels.items():
            arr = np.concatenate(arrs) if arrs else np.zeros((0, channels), np.float64)
            np.save(out / f"sample_{key}.npy", trim_sample(arr, self.limit, self.rng) if trim else arr)


def stats_sample(scene_dirs: list[Path], channels: int) -> tuple[np.ndarray, list[str]]:
    """The train tiles' pixels of every scene folder; the val/test ones, with a warning, when there are none."""
    train = [np.load(p / "sample_train.npy") for p in scene_dirs]
    samples = np.concatenate(train) if train else np.zeros((0, channels))
    if len(samples):
        return samples, []
    other = np.concatenate([np.load(p / "sample_other.npy") for p in scene_dirs])
    return other, ["no training tiles: stats.json computed from the val/test tiles"]


def per_scene_stats(scenes: list[tuple[str, Path]], percentiles: tuple[float, float]) -> dict[str, dict[str, Any]]:
    """Each scene's own per-band numbers (stats.json `scenes`), from all its tiles' pixel sample (train, val
    and test: no labels are involved), for `data.normalize: scene`. A scene without sampled pixels is left out."""
    out: dict[str, dict[str, Any]] = {}
    for name, folder in scenes:
        pixels = np.concatenate([np.load(folder / f"sample_{k}.npy") for k in SAMPLE_KEYS])
        if len(pixels):
            low, high, mean, std = percentile_stats(pixels, percentiles)
            out[name] = {"low": low.tolist(), "high": high.tolist(), "mean": mean.tolist(), "std": std.tolist(),
                         "pixels_sampled": len(pixels)}
    return out


def stats_json(samples: np.ndarray, plan: dict[str, Any], percentiles: tuple[float, float]) -> dict[str, Any]:
    """stats.json: per-band low/high percentiles and mean/std of the clipped pixels (the normalisation
    contract), with the plan's pixel type, bands and tile size."""
    if len(samples):
        low, high, mean, std = percentile_stats(samples, percentiles)
    else:
        low = high = mean = np.zeros(plan["channels"])
        std = np.ones(plan["channels"])
    return {
        "dtype": plan["dtype"], "bands": plan["bands"], "channels": plan["channels"], "nodata": plan["nodata"],
        "tile_size": plan["tile_size"], "percentiles": list(percentiles),
        "low": low.tolist(), "high": high.tolist(), "mean": mean.tolist(), "std": std.tolist(),
        "pixels_sampled": len(samples),
    }
