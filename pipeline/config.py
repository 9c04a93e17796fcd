"""Configuration: one pydantic model per stage, loaded from YAML with ``section.key=value`` overrides.

The config models are the documentation of every option: each field has a description and a default.
``load_config(path, overrides)`` resolves relative paths against the YAML file's folder, applies the
overrides, and validates. Unknown keys are errors that name the key and suggest the closest valid one.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.files import atomic_write_text


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------- tiling
class SceneConfig(_Section):
    image: Path = Field(description="GeoTIFF (or any GDAL raster; s3:// and https:// via GDAL VSI).")
    labels: Path | None = Field(
        None,
        description="Labels: any OGR vector file (GeoJSON, GeoPackage, Shapefile...) in any CRS, a pixel CSV "
        "(image_path,xmin,ymin,xmax,ymax,label), COCO JSON or Pascal VOC XML. None = unlabelled scene.",
    )
    split: Literal["train", "val", "test"] | None = Field(
        None, description="Force this scene into a split (split.method='scene'); None = assigned automatically."
    )


class SplitConfig(_Section):
    method: Literal["scene", "block"] = Field(
        "block",
        description="'scene': whole scenes go to one split; 'block': scenes are cut into square spatial blocks "
        "assigned to splits, and tiles overlapping two blocks of different splits are dropped.",
    )
    val_fraction: float = Field(0.15, ge=0, lt=1, description="Fraction of scenes/blocks for validation.")
    test_fraction: float = Field(0.15, ge=0, lt=1, description="Fraction of scenes/blocks for test.")
    block_size: int = Field(1000, gt=0, description="Block edge in pixels for method='block'.")


class TilingConfig(_Section):
    scenes: list[SceneConfig] = Field(default_factory=list, description="Input scenes and their labels.")
    tile_size: int = Field(400, gt=0, description="Tile edge in pixels.")
    overlap: int = Field(32, ge=0, description="Overlap between neighbouring tiles in pixels.")
    bands: list[int] | None = Field(None, description="1-based band indices to use; None = all bands.")
    label_field: str = Field("label", description="Attribute holding the class name in vector labels.")
    min_visibility: float = Field(
        0.5, ge=0, le=1, description="A box cut by a tile edge is kept (clipped) if this fraction of its area is inside."
    )
    max_nodata_fraction: float = Field(0.5, ge=0, le=1, description="Tiles with more nodata than this are skipped.")
    negative_ratio: float = Field(
        0.2,
        ge=0,
        description="Training split: empty tiles kept per tile with objects (per scene; a scene part without "
        "objects keeps this share of its tiles); 0 drops all. val/test keep every empty tile.",
    )
    split: SplitConfig = Field(default_factory=SplitConfig)
    stats_percentiles: tuple[float, float] = Field((1.0, 99.0), description="Per-band low/high percentiles.")
    shard_size: int = Field(256, gt=0, description="Tiles per TFRecord shard.")
    workers: int = Field(0, ge=0, description="Processes for tiling scenes in parallel; 0 = number of CPUs.")
    row_block_windows: int = Field(
        0,
        ge=0,
        description="Flows (`satdet run`): a scene with more tile windows than this is tiled in blocks of whole "
        "tile rows of about this many windows, one task each, then merged (spreads one large scene over Dask "
        "workers); the tiles are the same bytes either way. 0 = 4096 on a Dask task runner, whole scenes otherwise.",
    )
    units: Literal["px", "m"] = Field(
        "px", description="Unit of tile_size and overlap: pixels, or metres (converted with each scene's pixel size)."
    )
    stats_max_pixels: int = Field(
        200_000, gt=0, description="Pixels sampled per scene from training tiles for stats.json (bounded memory)."
    )
    encoding: Literal["raw", "png"] = Field(
        "raw",
        description="How tile pixels are stored in the TFRecords: 'raw' little-endian bytes (fastest to write and "
        "read) or 'png' (lossless, smaller shards, slower; uint8/uint16 tiles with 1/3/4 bands, others stay raw).",
    )

    @model_validator(mode="after")
    def _overlap_below_tile(self) -> TilingConfig:
        if self.overlap >= self.tile_size:
            raise ValueError(
                f"tiling.overlap ({self.overlap}) must be smaller than tiling.tile_size ({self.tile_size})"
            )
        low, high = self.stats_percentiles
        if not 0 <= low <= high <= 100:
            raise ValueError(f"tiling.stats_percentiles ({low}, {high}) must be low <= high, both in 0..100")
        return self


# --------------------------------------------------------------------------------------------- data
class AugmentSpec(_Section):
    name: str = Field(description="albumentations transform name, e.g. HorizontalFlip.")
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the transform.")


def _default_augment() -> list[AugmentSpec]:
    return [
        AugmentSpec(name="HorizontalFlip", params={"p": 0.5}),
        AugmentSpec(name="VerticalFlip", params={"p": 0.5}),
        AugmentSpec(name="RandomRotate90", params={"p": 0.5}),
        AugmentSpec(name="RandomBrightnessContrast", params={"p": 0.5}),
        AugmentSpec(name="HueSaturationValue", params={"p": 0.3}),
    ]


class DataConfig(_Section):
    batch_size: int = Field(4, gt=0, description="Images per training batch (global batch).")
    max_boxes: int | None = Field(None, gt=0, description="Boxes per image after padding; None = qa.json maximum.")
    shuffle_buffer: int = Field(512, gt=0, description="tf.data shuffle buffer in tiles.")
    augment: list[AugmentSpec] = Field(default_factory=_default_augment, description="Training augmentations.")
    seed: int = Field(0, description="Seed for shuffling and augmentation.")
    normalize: Literal["global", "scene"] = Field(
        "global",
        description="How training tiles are normalised: 'global' = one percentile stretch over all training "
        "scenes (stats.json); 'scene' = each tile with its own scene's stretch, as predict.normalize: scene "
        "treats a new scene (docs/data.md, 'Normalisation').",
    )


# --------------------------------------------------------------------------------------------- model
class ModelConfig(_Section):
    backbone: Literal["mobilenet_v3_large", "mobilenet_v3_small", "resnet50", "resnet18_half", "tiny"] = Field(
        "mobilenet_v3_large", description="Feature extractor."
    )
    weights: str = Field(
        "none",
        description="'none' (random init), 'imagenet' (keras downloads it once into $KERAS_HOME/models) or the path "
        "of a keras include_top=False weights file (.h5) of the 3-band application. Pretrained backbones get "
        "the weights' input convention and frozen batch norm (docs/model.md, 'Pretrained backbones').",
    )
    freeze_bn: bool | None = Field(
        None,
        description="Run backbone batch norm in inference mode with fixed gamma/beta (torchvision's "
        "FrozenBatchNorm2d). null = frozen when model.weights is pretrained, trainable when 'none'.",
    )
    freeze_stages: int = Field(
        0, ge=0, le=4,
        description="Make the backbone stem and its first N stages non-trainable (ResNet50: conv1 + conv2_x..; "
        "MobileNetV3: stem + blocks by stride). 0 = all trainable; 1 = torchvision's default. Meant for "
        "pretrained weights (with weights: none it freezes random layers).",
    )
    pretrained_input: bool | None = Field(
        None,
        description="Map the normalised bands to the pretrained weights' input convention (0-255 stretch, then "
        "ResNet50 BGR minus the ImageNet mean / MobileNetV3 x/127.5-1). null = when weights is not 'none'; "
        "exports record the resolved value, so a rebuild with weights: none + load_weights keeps the mapping.",
    )
    bn_momentum: float | None = Field(
        0.9, gt=0, lt=1,
        description="Backbone batch-norm moving-average momentum (Keras convention). Keras' MobileNetV3 uses 0.999, "
        "too slow for runs of a few thousand steps: inference statistics lag far behind the weights. "
        "null keeps the application's value.",
    )
    fpn_channels: int = Field(256, gt=0, description="FPN channels.")
    min_level: int = Field(2, ge=2, le=5, description="Finest FPN level (stride 2**min_level).")
    max_level: int = Field(6, ge=3, le=7, description="Coarsest FPN level for the RPN.")
    roi_min_level: int | None = Field(
        None, ge=2, le=5,
        description="Finest FPN level the box head pools from; null = min_level. Below min_level (2 with min_level "
        "3) the FPN gets that level for the box head only, without anchors: finer features to place box edges "
        "for small objects, for a fraction of the cost of anchors there.",
    )
    anchor_sizes: list[float] = Field(
        [32, 64, 128, 256, 512], description="Anchor size (px) per FPN level, finest first."
    )
    aspect_ratios: list[float] = Field([0.5, 1.0, 2.0], description="Anchor aspect ratios (h/w).")
    anchor_scales_per_octave: int = Field(
        1, ge=1, le=4, description="Anchor scales per level: size * 2**(i/n), i < n (2-3 densify sizes for small objects)."
    )
    rpn_fg_iou: float = Field(0.7, description="Anchor is positive at IoU >= this.")
    rpn_bg_iou: float = Field(0.3, description="Anchor is negative at IoU < this.")
    rpn_batch_per_image: int = Field(256, description="Anchors sampled per image for the RPN loss.")
    rpn_positive_fraction: float = Field(0.5, description="Max positive fraction of sampled anchors.")
    rpn_pre_nms_top_n_train: int = Field(2000, description="Proposals kept per level before NMS (training).")
    rpn_pre_nms_top_n_test: int = Field(1000, description="Proposals kept per level before NMS (inference).")
    rpn_post_nms_top_n_train: int = Field(2000, description="Proposals kept after NMS (training).")
    rpn_post_nms_top_n_test: int = Field(1000, description="Proposals kept after NMS (inference).")
    rpn_nms_iou: float = Field(0.7, description="RPN NMS IoU.")
    roi_batch_per_image: int = Field(512, description="ROIs sampled per image for the box head.")
    roi_positive_fraction: float = Field(0.25, description="Max positive fraction of sampled ROIs.")
    roi_fg_iou: float = Field(0.5, description="ROI is foreground at IoU >= this.")
    roi_box_loss: Literal["smooth_l1", "giou"] = Field(
        "smooth_l1",
        description="Box head regression loss: smooth-L1 of the box deltas (torchvision) or 10 x (1 - GIoU) of the "
        "decoded box (mmdetection's GIoU Faster R-CNN). The RPN keeps smooth-L1.",
    )
    roi_size: int = Field(7, description="ROIAlign output size.")
    roi_sampling_ratio: int = Field(2, ge=1, description="ROIAlign bilinear samples per bin side (torchvision: 2).")
    roi_align_shift: bool = Field(
        False,
        description="ROIAlign samples each FPN level where its cells are centred: the backbone's stride-2 padding "
        "puts a level-l cell 0.5*(2**l - 1) px off the nominal (i + 0.5)*2**l (right/below for MobileNetV3, "
        "left/above for ResNet-50), 3.5 px on P3. false = the nominal grid (torchvision's; measured better on "
        "the cross-site benchmark, docs/model.md).",
    )
    score_fusion: Literal["box_head", "geometric_mean"] = Field(
        "box_head",
        description="A detection's score: the box head's class probability (Faster R-CNN), or the geometric mean "
        "of it and the RPN objectness of its proposal (CenterNet2's two-stage probability). Test time only.",
    )
    iou_score: bool = Field(
        False,
        description="The box head also predicts each refined box's IoU with its object (trained with binary "
        "cross-entropy on the sampled positives, loss term roi_iou); a detection's score becomes the geometric "
        "mean of its class probability (after score_fusion, when set) and that predicted IoU, so better-fitting "
        "boxes rank first (IoU-Net).",
    )
    roi_align_impl: Literal["auto", "crop_and_resize", "gather"] = Field(
        "auto",
        description="ROIAlign kernel: 'crop_and_resize' (fast on CPU, no XLA), 'gather' (XLA-compatible); "
        "'auto' = gather when a GPU is visible. Use 'gather' with train.jit_compile=true on CPU.",
    )
    nms_impl: Literal["auto", "greedy", "padded"] = Field(
        "auto",
        description="NMS kernel: 'greedy' (C++ per image, the CPU path), 'padded' (batched, for XLA); "
        "'auto' = padded when a GPU is visible. Use 'padded' with train.jit_compile=true on CPU.",
    )
    seed: int = Field(0, description="Seed of the anchor/ROI sampling RNG (its state is saved with the weights).")
    head_dim: int = Field(1024, description="Box head FC width.")
    score_threshold: float = Field(0.05, description="Detections below this score are dropped.")
    nms_iou: float = Field(0.5, description="Per-class NMS IoU at inference.")
    max_detections: int = Field(300, description="Detections per image at inference.")
    mixed_precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = Field(
        "float32", description="Keras dtype policy."
    )

    @model_validator(mode="after")
    def _levels(self) -> ModelConfig:
        if self.roi_min_level is not None and self.roi_min_level > self.min_level:
            raise ValueError(f"model.roi_min_level ({self.roi_min_level}) must be <= model.min_level ({self.min_level})")
        n = self.max_level - self.min_level + 1
        if len(self.anchor_sizes) != n:
            raise ValueError(
                f"model.anchor_sizes has {len(self.anchor_sizes)} sizes but levels P{self.min_level}-P{self.max_level} "
                f"need {n}"
            )
        return self


# --------------------------------------------------------------------------------------------- train
class OptimizerConfig(_Section):
    name: Literal["sgd", "adam", "adamw"] = Field("sgd", description="Optimizer.")
    learning_rate: float = Field(0.02, gt=0, description="Peak learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(1e-4, ge=0, description="Decoupled weight decay.")


class ScheduleConfig(_Section):
    name: Literal["cosine", "step", "constant"] = Field("cosine", description="LR decay after warmup.")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps.")
    warmup_factor: float = Field(0.001, gt=0, le=1, description="LR multiplier at step 0 of the warmup.")
    step_milestones: list[float] = Field([0.67, 0.89], description="Fractions of train.steps where LR drops (step).")
    step_gamma: float = Field(0.1, description="LR factor at each milestone (step).")
    final_factor: float = Field(0.0, ge=0, description="Cosine ends at this fraction of the peak LR.")


class ClipConfig(_Section):
    strategy: Literal["none", "global_norm", "value", "norm", "loss_adaptive", "autoclip", "agc", "zclip"] = Field(
        "global_norm", description="Gradient clipping strategy (see docs/clipping.md)."
    )
    clip_norm: float = Field(10.0, gt=0, description="global_norm / norm: threshold on the (global) L2 norm.")
    clip_value: float = Field(1.0, gt=0, description="value: element-wise bound.")
    base: float = Field(1.0, description="loss_adaptive: threshold = base + slope * min(loss, cap).")
    slope: float = Field(1.0, description="loss_adaptive: slope (see base).")
    cap: float = Field(10.0, description="loss_adaptive: loss cap (see base).")
    inverse: bool = Field(
        False, description="loss_adaptive: tighten instead of loosen as the loss grows: base + slope / (1 + min(loss, cap))."
    )
    percentile: float = Field(10.0, gt=0, le=100, description="autoclip: percentile of the global-norm history.")
    history: int = Field(1000, gt=0, description="autoclip: number of past global norms kept.")
    agc_lambda: float = Field(0.01, gt=0, description="agc: max unit-wise ratio ||G|| / max(||W||, eps).")
    agc_eps: float = Field(1e-3, gt=0, description="agc: floor on the weight norm.")
    z_threshold: float = Field(2.5, gt=0, description="zclip: z-score above which the norm is clipped.")
    ema_alpha: float = Field(0.97, gt=0, lt=1, description="zclip: EMA decay of the norm mean/variance.")
    warmup_steps: int = Field(25, ge=0, description="autoclip/zclip: steps collecting statistics before clipping.")
    agc_exempt: list[str] = Field(
        default_factory=list,
        description="agc: substrings of variable paths left unclipped, added to the model's own "
        "agc_exempt_variables() (the final classifier, as in the NFNets paper).",
    )


class TrainConfig(_Section):
    steps: int = Field(2000, gt=0, description="Optimizer steps.")
    time_budget_minutes: float | None = Field(
        None, gt=0, description="Stop (checkpoint, export) after this wall time even if steps remain."
    )
    fit_schedule_to_budget: bool = Field(
        True,
        description="With time_budget_minutes: shorten the run and its LR schedule to the measured step rate, "
        "so the decay ends when the time does (stop_reason 'fitted_to_budget').",
    )
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    clip: ClipConfig = Field(default_factory=ClipConfig)
    ema_decay: float = Field(
        0.0, ge=0, lt=1,
        description="Exponential moving average of the weights (and BatchNorm statistics), validated and exported "
        "instead of the last weights; the decay ramps up as min(ema_decay, (1+n)/(10+n)). 0 = off.",
    )
    output_min_precision: float | None = Field(
        0.5, gt=0, le=1,
        description="How the output threshold stored with the model (the default of `satdet predict`) is chosen on "
        "the validation blocks, predicted as `satdet predict` delivers them: the threshold with the most recall "
        "at precision (IoU 0.5) >= this value, when it is below the best-F1 one. null = the best-F1 threshold. "
        "Scores fall on sites the model never saw, so a best-F1 threshold keeps few detections there "
        "(docs/predict.md).",
    )
    jit_compile: bool | None = Field(None, description="XLA; None = on with a GPU, off on CPU (XLA convs are slow there).")
    distribute: Literal["auto", "none", "mirrored"] = Field(
        "auto", description="'mirrored' = MirroredStrategy over all GPUs; 'auto' uses it when >1 GPU."
    )
    log_every: int = Field(10, gt=0, description="Telemetry interval in steps.")
    checkpoint_every: int = Field(200, gt=0, description="Checkpoint interval in steps.")
    eval_every: int = Field(0, ge=0, description="Validation AP50 interval in steps (0 = only at the end).")
    early_stopping_patience: int = Field(0, ge=0, description="Stop after this many evals without improvement (0 = off).")
    keep_checkpoints: int = Field(3, gt=0, description="Checkpoints kept.")
    max_consecutive_skips: int = Field(
        0,
        ge=0,
        description="Stop the run (stop_reason 'diverged') after this many consecutive steps skipped for a "
        "non-finite loss/gradient; 0 = never stop (skipped steps are only counted).",
    )


# --------------------------------------------------------------------------------------------- evaluate / predict
class EvaluateConfig(_Section):
    split: Literal["val", "test"] = Field("test", description="Which split's scenes/tiles to score.")
    max_dets: int = Field(1000, gt=0, description="pycocotools maxDets; the summary is computed at this value.")
    iou_thresholds_f1: list[float] = Field([0.5, 0.4], description="IoUs at which P/R/F1 are reported.")
    examples: int = Field(4, ge=0, description="Scene crops drawn in examples.png.")
    scenes: list[SceneConfig] = Field(
        default_factory=list,
        description="Extra labelled scenes scored whole (e.g. other sites), beside the split's blocks; "
        "not used in training. `satdet evaluate --scene IMAGE --labels LABELS` adds more.",
    )
    only_scenes: bool = Field(
        False, description="Score only evaluate.scenes (skip the split's blocks and tiles)."
    )

    @field_validator("scenes")
    @classmethod
    def _labelled(cls, v: list[SceneConfig]) -> list[SceneConfig]:
        for scene in v:
            if scene.labels is None:
                raise ValueError(f"evaluate.scenes: {scene.image} has no labels; an evaluation scene needs labels")
        return v


class PredictConfig(_Section):
    tile_size: int | None = Field(None, gt=0, description="Window edge; None = tiling.tile_size.")
    overlap: int = Field(64, ge=0, description="Window overlap in pixels.")
    batch_size: int = Field(4, gt=0, description="Windows per inference batch.")
    score_threshold: float | None = Field(
        None, ge=0, le=1,
        description="Detections below this score are not written. null = the model's own, calibrated on its "
        "validation blocks and stored in the export (train.output_min_precision; 0.3 for exports without one).",
    )
    merge: Literal["nms", "wbf"] = Field("nms", description="How boxes are merged across window seams.")
    merge_iou: float = Field(0.5, gt=0, le=1, description="IoU for the seam merge.")
    max_nodata_fraction: float = Field(0.5, ge=0, le=1, description="Boxes mostly over nodata are dropped.")
    edge_tolerance: float = Field(
        2.0, ge=0, description="A box within this many px of an interior window edge counts as cut by it (seam rule)."
    )
    format: Literal["geojson", "gpkg"] = Field(
        "geojson", description="Output: GeoJSON in EPSG:4326 (RFC 7946) or GeoPackage in the scene CRS."
    )
    per_scene: bool = Field(False, description="One output file per scene instead of one per run.")
    normalize: Literal["train", "scene"] = Field(
        "scene",
        description="Normalise each scene with its own per-band percentile statistics, measured on its valid "
        "pixels (test-time adaptation to a new flight or site; measured best on a site the model never saw), "
        "or with the training statistics.",
    )
    adapt_bn: bool = Field(
        False, description="Re-estimate the backbone's BatchNorm statistics on the scene before predicting (AdaBN)."
    )
    tta: bool = Field(False, description="Test-time flips (4 views per window) fused by weighted box fusion.")
    match_resolution: bool = Field(
        True,
        description="Resample each window to the ground pixel size the model was trained at when the scene's "
        "differs by more than 10% (both in a projected CRS in metres); boxes come back in scene pixels.",
    )


# --------------------------------------------------------------------------------------------- root
class Config(_Section):
    name: str = Field("run", description="Run name; outputs go to runs_dir/name.")
    runs_dir: Path = Field(Path("runs"), description="Parent folder of run directories.")
    seed: int = Field(0, description="Global seed.")
    classes: list[str] = Field(["tree"], min_length=1, description="Class names; label ids are 1-based in this order.")
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)

    @field_validator("classes")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"classes must be unique, got {v}")
        return v

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.name

    def section_dump(self, section: str) -> Any:
        """JSON-able value of one section, or of one field of it as "section.field" (used for cache keys)."""
        name, _, field = section.partition(".")
        dump = getattr(self, name).model_dump(mode="json")
        return dump[field] if field else dump


# --------------------------------------------------------------------------------------------- loading
def _parse_value(text: str) -> Any:
    """Parse an override value as YAML (so 0.1, true, [1,2] and strings all work)."""
    return yaml.safe_load(text) if text != "" else ""


def _apply_override(data: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    dotted, value = item.split("=", 1)
    keys = dotted.strip().split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {key} is not a section")
    node[keys[-1]] = _parse_value(value)


def _valid_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names valid at `loc` (walking nested models)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if hasattr(current, "model_fields") else None
        if field is None:
            return []
        ann = field.annotation
        for candidate in getattr(ann, "__args__", ()) + (ann,):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                current = candidate
                break
        else:
            return []
    return list(current.model_fields) if hasattr(current, "model_fields") else []


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    where = ".".join(str(p) for p in loc) or "(root)"
    if first["type"] == "extra_forbidden":
        valid = _valid_keys(Config, loc)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
        return f"{source}: unknown config key {where!r}{hint}"
    return f"{source}: {where}: {first['msg']}"


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Make scene paths and runs_dir relative to the config file's folder (URLs untouched)."""

    def fix(p: Any) -> Any:
        if p is None or not isinstance(p, str) or "://" in p or p.startswith("/vsi"):
            return p
        path = Path(os.path.expanduser(p))
        return str(path if path.is_absolute() else (base / path))

    scenes = [*((data.get("tiling") or {}).get("scenes") or []), *((data.get("evaluate") or {}).get("scenes") or [])]
    for scene in scenes:
        if isinstance(scene, dict):
            for key in ("image", "labels"):
                if key in scene:
                    scene[key] = fix(scene[key])


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Validate a plain dict into a Config, with one-line errors."""
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config, apply ``section.key=value`` overrides and validate.

    Relative scene paths are resolved against the YAML file's folder; ``runs_dir`` is relative to the
    current directory (where the user runs the command).
    """
    data: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err.__class__.__name__}); fix the syntax") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        data = loaded
        _resolve_paths(data, path.resolve().parent)
    for item in overrides or []:
        _apply_override(data, item)
    return config_from_dict(data, source)


def save_config(config: Config, path: Path) -> Path:
    """Write the resolved config (every default filled in) as YAML."""
    atomic_write_text(Path(path), yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return Path(path)
