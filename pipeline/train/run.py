"""The train stage: `run_training` builds the detector for a tiles folder, trains it (`fit`), exports it
and calibrates its output threshold on the validation data (pipeline.train.calibrate).
`build_for_training` and `fit_on_tiles` are its first two steps on their own (studies use them)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import tensorflow as tf

from pipeline.config import Config
from pipeline.model.kernels import with_xla_kernels
from pipeline.train.checkpoints import config_fingerprint, load_best
from pipeline.train.fit import fit

if TYPE_CHECKING:
    from pipeline.train.validation import Validation


def run_training(config: Config, tiles_dir: Path, model_dir: Path, resume: bool = False) -> Path:
    """Train the detector on `tiles_dir` per `config.train`; returns `model_dir`, which then holds
    checkpoints/, tensorboard/, train_log.jsonl, best/ (when there is a val split), train_summary.json and
    export/ (the best validation weights when validated, else the last ones; with the run's test-time
    settings, the defaults of `satdet predict` for it)."""
    from pipeline.data.dataset import build_dataset
    from pipeline.data.stats import load_stats
    from pipeline.data.tiles import tile_count
    from pipeline.files import atomic_write_json
    from pipeline.model.export import export_model
    from pipeline.predict.resolution import training_pixel_size

    tiles_dir, model_dir = Path(tiles_dir), Path(model_dir)
    stats = load_stats(tiles_dir)
    model, strategy, exempt = build_for_training(config, int(stats["channels"]), stats=stats)
    validation = None
    if tile_count(tiles_dir, "val") > 0:
        from pipeline.train.validation import Validation

        val = build_dataset(tiles_dir, "val", config, training=False)
        validation = Validation(model, val, list(config.classes), config.evaluate.max_dets)
    summary = fit_on_tiles(
        model, strategy, exempt, config, tiles_dir, model_dir,
        resume=resume,
        evaluate_fn=validation.ap50 if validation is not None else None,
        fingerprint=config_fingerprint(config, stats),
    )
    if validation is not None:
        load_best(model, model_dir)  # export the best validation weights, not just the last ones
    # stored with the export as the defaults of `satdet predict` for this model
    test_time = {"normalize": config.predict.normalize, "adapt_bn": config.predict.adapt_bn, "tta": config.predict.tta}
    export_dir = export_model(model, stats, list(config.classes), model_dir / "export", int(stats["tile_size"]),
                              predict=test_time, pixel_size_m=training_pixel_size(tiles_dir),
                              training_normalize=config.data.normalize)
    summary["output_threshold"] = None if validation is None else _calibrate(config, tiles_dir, export_dir,
                                                                             model, validation)
    atomic_write_json(model_dir / "train_summary.json", summary)
    return model_dir


def _calibrate(config: Config, tiles_dir: Path, export_dir: Path, model: keras.Model, validation: Validation
               ) -> dict[str, Any] | None:
    """Store the export's output threshold (pipeline.train.calibrate): chosen on the validation blocks as
    `satdet predict` delivers them, or on the validation tiles when the source scenes are not readable here."""
    from pipeline.model.export import set_output_threshold
    from pipeline.train.calibrate import calibrate_on_val_blocks

    calibration = calibrate_on_val_blocks(config, tiles_dir, export_dir)
    if calibration is None:
        calibration = validation.output_threshold(model, config.train.output_min_precision)
    if calibration is not None:
        set_output_threshold(export_dir, calibration)
    return calibration


def fit_on_tiles(
    model: keras.Model,
    strategy: tf.distribute.Strategy,
    agc_exempt: list[str],
    config: Config,
    tiles_dir: Path,
    model_dir: Path,
    **fit_options: Any,
) -> dict[str, Any]:
    """`fit` a model from `build_for_training` on the train split of `tiles_dir` (an input-pipeline error
    names the tiles); `fit_options` are fit's keyword options (resume, evaluate_fn, progress, ...)."""
    from pipeline.data.dataset import build_dataset
    from pipeline.data.explain import explain_data_error

    return fit(
        model,
        lambda start: build_dataset(tiles_dir, "train", config, training=True, start_batch=start),
        config,
        model_dir,
        strategy=strategy,
        agc_exempt=agc_exempt,
        explain_data_error=lambda err: explain_data_error(err, tiles_dir, "train"),
        **fit_options,
    )


def build_for_training(config: Config, channels: int, stats: dict[str, Any] | None = None
                       ) -> tuple[keras.Model, tf.distribute.Strategy, list[str]]:
    """Seed, pick the distribution strategy and build the detector in its scope; returns (model, strategy,
    paths of the variables AGC leaves unclipped). With `train.jit_compile`, 'auto' kernels resolve to the
    XLA-compatible ones (padded NMS, gather ROIAlign) even on a CPU."""
    from pipeline.model.detector import build_detector

    keras.utils.set_random_seed(config.seed)
    strategy = choose_strategy(config.train.distribute)
    model_cfg = with_xla_kernels(config.model) if config.train.jit_compile else config.model
    with strategy.scope():
        model = build_detector(model_cfg, len(config.classes), channels, stats=stats)
    exempt = [str(getattr(v, "path", v.name)) for v in _agc_exempt_variables(model)]
    return model, strategy, exempt


def choose_strategy(mode: str) -> tf.distribute.Strategy:
    """'mirrored' → MirroredStrategy; 'auto' → MirroredStrategy when more than one GPU; else default."""
    gpus = tf.config.list_logical_devices("GPU")
    if mode == "mirrored" or (mode == "auto" and len(gpus) > 1):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _agc_exempt_variables(model: keras.Model) -> list:
    """The final classifier, which AGC leaves alone (NFNets): `model.agc_exempt_variables()` when the
    detector offers it, else the ROI box head's class-score layer (`box_head.cls`)."""
    if hasattr(model, "agc_exempt_variables"):
        return list(model.agc_exempt_variables())
    cls = getattr(getattr(model, "box_head", None), "cls", None)
    return list(cls.trainable_variables) if cls is not None else []
