"""Training augmentations: an albumentations `Compose` built from `config.data.augment`.

Where augmentation happens (the decision): on the *raw* tile, before normalisation, so brightness and
hue limits mean what albumentations documents.
- uint8 tiles are augmented as uint8 (albumentations' fastest path; HueSaturationValue works on RGB).
- any other dtype (uint16, int16, float32, ...) is mapped per band to float32 in [0, 1] with the
  stats.json clip range (low → 0, high → 1), augmented there (albumentations treats float32 images as
  [0, 1]), and mapped back to the raw scale. `normalize` afterwards gives exactly what it would give
  for an un-augmented tile, so the exported model's in-graph normalisation matches training.

Boxes are pascal_voc (x0, y0, x1, y1 pixel edges), labels travel as a label field, and a box cut by a
crop survives when at least `min_visibility` of it stays in view — the tiling policy's number.

Randomness is explicit: `Augmenter.__call__` takes a seed (the data seed and the element's position in
the stream), so a parallel tf.data map gives the same result for the same seed, whatever the thread.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import logging
import os
import random
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.copy_paste import CopyPaste, ObjectBank
from pipeline.data.mosaic import Mosaic, TileBank
from pipeline.errors import SatdetError

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check on import

log = logging.getLogger(__name__)
# a colour-only augment list leaves the box processor idle: expected here, not worth a warning per thread
warnings.filterwarnings("ignore", message="Got processor for bboxes, but no transform", category=UserWarning)

# Names that exist in albumentations but cannot work from a YAML list of (name, params) on tiles + boxes.
_UNSUPPORTED = {
    "Lambda", "Mosaic", "OverlayElements", "RandomCropNearBBox", "CropNonEmptyMaskIfExists", "MaskDropout",
    "BasicTransform", "DualTransform", "ImageOnlyTransform", "NoOp",
}
# Transforms whose output size is a parameter: default it to the tile size so the batch shape holds.
_SIZED = {"RandomSizedBBoxSafeCrop", "RandomSizedCrop", "RandomResizedCrop", "Resize"}
# Colour transforms defined for 3-band RGB only.
_RGB_ONLY = {"HueSaturationValue", "RGBShift", "ToGray", "ToSepia", "ColorJitter", "FancyPCA", "PlanckianJitter"}
# Our own names, expanded into albumentations transforms.
ALIASES = {"ScaleJitter": "Affine(scale=(1 - scale_limit, 1 + scale_limit), keep_ratio=True); default scale_limit 0.2"}
# Our own transforms (not albumentations): applied first, on the raw tile, before the Compose.
OWN = {"Mosaic": "four training tiles cut together at their own scale (pipeline.data.mosaic)",
       "CopyPaste": "objects of the training tiles pasted into the tile (pipeline.data.copy_paste)"}


def _albumentations() -> Any:
    import albumentations as A
    import cv2

    cv2.setNumThreads(0)  # tf.data already runs maps in parallel; OpenCV threads would oversubscribe the cores
    return A


@functools.lru_cache(maxsize=1)
def valid_names() -> list[str]:
    """Every transform name `data.augment` accepts: albumentations 2-D transforms that keep boxes, plus aliases."""
    A = _albumentations()
    from albumentations.core.transforms_interface import BasicTransform, DualTransform, ImageOnlyTransform

    names = set(ALIASES) | set(OWN)
    for name in dir(A):
        cls = getattr(A, name)
        if not inspect.isclass(cls) or not issubclass(cls, BasicTransform) or name in _UNSUPPORTED:
            continue
        if name.endswith("3D") or not issubclass(cls, (DualTransform, ImageOnlyTransform)):
            continue
        if issubclass(cls, DualTransform) and "bboxes" not in str(getattr(cls, "_targets", "")).lower():
            continue
        names.add(name)
    return sorted(names)  # cached: called once per transform per worker thread


def _make_transform(index: int, name: str, params: dict[str, Any], tile_size: int) -> Any:
    A = _albumentations()
    where = f"data.augment[{index}] ({name})"
    valid = valid_names()
    if name not in valid:
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise SatdetError(f"{where}: unknown augmentation; {hint}valid names: {', '.join(valid)}")
    params = dict(params)
    if name in OWN:
        return _own_transform(where, name, params, None)
    if name == "ScaleJitter":
        limit = float(params.pop("scale_limit", 0.2))
        if not 0 <= limit < 1:
            raise SatdetError(f"{where}: scale_limit must be in [0, 1), got {limit}")
        name, params = "Affine", {"scale": (1 - limit, 1 + limit), "keep_ratio": True, "p": 0.5, **params}
    cls = getattr(A, name)
    sig = inspect.signature(cls.__init__).parameters
    accepted = [p for p in sig if p != "self"]
    if not any(p.kind is p.VAR_KEYWORD for p in sig.values()):
        unknown = [k for k in params if k not in accepted]
        if unknown:  # albumentations only warns; a typo in a YAML file should stop the run
            raise SatdetError(f"{where}: unknown params {unknown}; {name} accepts: {', '.join(accepted)}")
    if name in _SIZED:
        if "size" in sig:
            params.setdefault("size", (tile_size, tile_size))
        if "height" in sig and "width" in sig:
            params.setdefault("height", tile_size)
            params.setdefault("width", tile_size)
    try:
        return cls(**params)
    # albumentations validates params with pydantic (ValidationError) or fails with TypeError/ValueError
    except Exception as err:  # noqa: BLE001
        first = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise SatdetError(f"{where}: invalid params {params}: {detail}") from None


def _own_transform(where: str, name: str, params: dict[str, Any], bank: ObjectBank | TileBank | None,
                   **defaults: Any) -> CopyPaste | Mosaic:
    """CopyPaste or Mosaic from YAML params, with errors that name the entry (`bank` None = empty)."""
    cls = CopyPaste if name == "CopyPaste" else Mosaic
    sig = inspect.signature(cls.__init__).parameters
    unknown = [k for k in params if k not in sig or k in ("self", "bank")]
    if unknown:
        accepted = [k for k in sig if k not in ("self", "bank")]
        raise SatdetError(f"{where}: unknown params {unknown}; {name} accepts: {', '.join(accepted)}")
    if bank is None:
        bank = ObjectBank((), ()) if cls is CopyPaste else TileBank((), (), ())
    try:
        return cls(bank, **{**defaults, **params})
    except SatdetError as err:
        raise SatdetError(f"{where}: {str(err).removeprefix(f'{name}: ')}") from None
    except (TypeError, ValueError) as err:
        raise SatdetError(f"{where}: invalid params {params}: {err}") from None


class Augmenter:
    """Applies the configured Compose to one tile with an explicit seed; thread-safe (one Compose per thread).

    Input: image (H, W, C) of the tiles' dtype, boxes (N, 4) float xyxy, labels (N,), seed (ints).
    Output: image (uint8 for uint8 tiles, else float32 on the raw scale), boxes float32 (M, 4), labels int32 (M,).
    """

    def __init__(self, specs: Sequence[tuple[str, dict[str, Any]]], *, stats: dict[str, Any], tile_size: int,
                 min_visibility: float, bank: ObjectBank | None = None, tile_bank: TileBank | None = None,
                 max_boxes: int | None = None) -> None:
        self.channels = int(stats["channels"])
        self.dtype = np.dtype(stats["dtype"])
        self.tile_size = tile_size
        self.min_visibility = min_visibility
        self.max_boxes = max_boxes  # Mosaic and CopyPaste never make a tile carry more boxes than this
        self.unit_scale = self.dtype != np.uint8  # see the module docstring
        self.out_dtype = np.dtype(np.uint8) if not self.unit_scale else np.dtype(np.float32)
        self._low = np.asarray(stats["low"], np.float32)
        self._span = np.maximum(np.asarray(stats["high"], np.float32) - self._low, np.float32(1e-12))
        kept = []
        self._own: dict[str, CopyPaste | Mosaic] = {}
        for i, (name, params) in enumerate(specs):
            if name in OWN:
                if name in self._own:
                    raise SatdetError(f"data.augment[{i}] ({name}): given twice; keep one entry")
                self._own[name] = _own_transform(f"data.augment[{i}] ({name})", name, dict(params),
                                                 bank if name == "CopyPaste" else tile_bank,
                                                 **({"min_visibility": min_visibility} if name == "Mosaic" else {}))
                continue
            if name in _RGB_ONLY and self.channels != 3:
                log.warning("data.augment[%d] %s skipped: it needs 3-band RGB tiles, these have %d bands",
                            i, name, self.channels)
                continue
            kept.append((i, name, dict(params)))
        self.specs = kept
        self._local = threading.local()
        self._dry_run()

    @property
    def names(self) -> list[str]:
        """Names of the transforms actually applied (after RGB-only ones were skipped)."""
        return [name for name in OWN if name in self._own] + [name for _, name, _ in self.specs]

    def _compose(self) -> Any:
        compose = getattr(self._local, "compose", None)
        if compose is None:
            A = _albumentations()
            transforms = [_make_transform(i, name, params, self.tile_size) for i, name, params in self.specs]
            compose = A.Compose(
                transforms,
                bbox_params=A.BboxParams(
                    format="pascal_voc", label_fields=["labels"], min_visibility=self.min_visibility,
                    clip=True, filter_invalid_bboxes=True,  # float edges a hair outside the tile are not errors
                ),
                strict=False,
            )
            self._local.compose = compose
        return compose

    def _dry_run(self) -> None:
        """Run the pipeline once on a blank tile so a transform that cannot handle these tiles fails now."""
        image = np.zeros((self.tile_size, self.tile_size, self.channels), self.dtype)
        boxes = np.array([[1, 1, self.tile_size - 1, self.tile_size - 1]], np.float32)
        try:
            for seed in range(3):
                self(image, boxes, np.array([1], np.int32), (seed,))
        except SatdetError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure here means "this list cannot run on these tiles"
            raise SatdetError(
                f"data.augment: {self.names} cannot augment {self.channels}-band {self.dtype.name} tiles "
                f"({err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}); remove or change it"
            ) from None

    def __call__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, seed: Sequence[int]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        compose = self._compose()
        rng = np.random.default_rng([int(s) & 0xFFFFFFFFFFFFFFFF for s in seed])
        compose.set_random_state(rng, random.Random(int(rng.integers(2**63))))
        x = image
        for name in OWN:  # first, on the raw tile (Mosaic, then CopyPaste): what follows transforms their result
            if name in self._own:
                x, boxes, labels = self._own[name](x, boxes, labels, rng, self.max_boxes)
        if self.unit_scale:
            x = ((np.clip(x.astype(np.float32), self._low, self._low + self._span) - self._low) / self._span)
        out = compose(image=x, bboxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                      labels=np.asarray(labels, np.int32).reshape(-1))
        x = out["image"]
        if x.ndim == 2:  # some OpenCV paths drop a single band's axis
            x = x[:, :, None]
        if x.shape[:2] != (self.tile_size, self.tile_size):
            raise SatdetError(
                f"data.augment changed the tile size to {x.shape[1]}x{x.shape[0]} (tiles are {self.tile_size}); "
                f"use size-keeping transforms (RandomSizedBBoxSafeCrop resizes back, ScaleJitter keeps the size)"
            )
        if self.unit_scale:
            x = np.clip(x.astype(np.float32), 0.0, 1.0) * self._span + self._low
        out_boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
        out_labels = np.asarray(out["labels"], np.int32).reshape(-1)
        return np.ascontiguousarray(x, self.out_dtype), out_boxes, out_labels


@functools.lru_cache(maxsize=2)
def _read_bank(kind: type[ObjectBank | TileBank], shards: tuple[tuple[str, int], ...]) -> ObjectBank | TileBank:
    """`kind.from_shards` once per set of shard files and their modification times: training builds its
    input pipeline twice (once for the element spec), and the banks are read-only."""
    return kind.from_shards([path for path, _ in shards])


def build_augmenter(config: Any, stats: dict[str, Any], tiles_dir: str | Path | None = None) -> Augmenter | None:
    """The training Augmenter for `config` (a Config) and the tiles' stats; None when `data.augment` is empty.

    `tiles_dir`: the tiles folder whose training split fills the banks of CopyPaste (objects) and Mosaic
    (tiles); without it, or without training tiles, they have nothing to use and leave tiles unchanged.
    """
    specs = [(spec.name, spec.params) for spec in config.data.augment]
    if not specs:
        return None
    tile_size = int(stats.get("tile_size") or config.tiling.tile_size)  # what the tiles are, not what was asked
    # validate every entry (name, params) up front, with a message naming the entry
    for i, (name, params) in enumerate(specs):
        _make_transform(i, name, params, tile_size)
    names = {name for name, _ in specs}
    bank, tile_bank, max_boxes = None, None, None
    if tiles_dir is not None and names & set(OWN):
        from pipeline.data.tiles import resolve_max_boxes, shard_paths

        shards = tuple((str(f), f.stat().st_mtime_ns) for f in sorted(shard_paths(Path(tiles_dir), "train")))
        max_boxes = resolve_max_boxes(Path(tiles_dir), config)
        if "CopyPaste" in names:
            bank = _read_bank(ObjectBank, shards)
            log.info("CopyPaste: %d objects from the training tiles of %s", len(bank), tiles_dir)
        if "Mosaic" in names:
            tile_bank = _read_bank(TileBank, shards)
            log.info("Mosaic: %d training tiles of %s", len(tile_bank), tiles_dir)
    return Augmenter(specs, stats=stats, tile_size=tile_size, min_visibility=float(config.tiling.min_visibility),
                     bank=bank, tile_bank=tile_bank, max_boxes=max_boxes)
