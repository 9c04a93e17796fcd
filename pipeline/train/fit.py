"""Run orchestration: `fit` trains a built model per `config.train` and says why it stopped.

It builds what the run trains with (run state, schedule, optimizer, clipper, loss scale, train step),
restores it all on resume, then steps through the batches: telemetry every `train.log_every` steps, the
schedule refitted to the time budget, validation every `train.eval_every` steps (best weights, early
stopping) and a checkpoint every `train.checkpoint_every` steps.

Why a run stopped (`stop_reason` in the summary): 'steps' (train.steps done), 'fitted_to_budget' (done at
the length fitted to train.time_budget_minutes), 'time_budget' (the budget ran out first),
'early_stopping' (train.early_stopping_patience validations without improvement) or 'diverged'
(train.max_consecutive_skips non-finite steps in a row).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from pipeline.config import Config, TrainConfig
from pipeline.train.checkpoints import (
    RunState,
    check_fingerprint,
    checkpoint_manager,
    config_fingerprint,
    make_checkpoint,
    restore_latest,
    save_best,
)
from pipeline.train.clipping import ClipStrategy, build_clipper
from pipeline.train.ema import WeightAverage
from pipeline.train.optim import build_optimizer
from pipeline.train.progress import ThroughputWindow, TrainProgressBar
from pipeline.train.schedule import BudgetFit, ScheduleLength, WarmupSchedule, build_schedule
from pipeline.train.step import LossScale, TrainStep, build_variables
from pipeline.train.telemetry import Telemetry

log = logging.getLogger(__name__)


def fit(
    model: keras.Model,
    dataset_fn: Callable[[int], tf.data.Dataset],
    config: Config,
    model_dir: Path,
    *,
    resume: bool = False,
    strategy: tf.distribute.Strategy | None = None,
    evaluate_fn: Callable[[keras.Model], float] | None = None,
    agc_exempt: list[str] | None = None,
    progress: bool = True,
    explain_data_error: Callable[[Exception], Exception] | None = None,
    clock: Callable[[], float] = time.monotonic,
    fingerprint: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train `model` on batches from `dataset_fn()` per `config.train`; returns a summary dict.

    `dataset_fn(start_batch)` returns a *deterministic*, repeating dataset of (images, targets) batches
    that begins after `start_batch` batches — the data position restored on resume — so a resumed run
    sees the same batches as an uninterrupted one. `explain_data_error` turns a tf.errors.OpError raised
    by the input pipeline into a user-facing error. `evaluate_fn(model) -> AP50` scores validation data for the
    best checkpoint and early stopping. Build the model inside `strategy.scope()` when distributed.
    `clock() -> seconds` is read for every time measurement (throughput, time budget; tests inject one).
    `fingerprint` (default: `config_fingerprint(config)`, without the tile layout) is stored beside the
    checkpoints; with `resume` it must match the stored one (see `checkpoints.check_fingerprint`).
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        parts = _build_parts(model, dataset_fn(0).element_spec, config, strategy, agc_exempt or [])
    ckpt = make_checkpoint(
        model=model, optimizer=parts.optimizer, clip=parts.clipper, train_step=parts.step_fn, state=parts.state,
        ema=parts.ema.state if parts.ema is not None else None,
    )
    manager = checkpoint_manager(ckpt, model_dir, config.train.keep_checkpoints)
    restored, end = _restore(ckpt, manager, parts.length, config, model_dir, resume, fingerprint)
    batches = _Batches(dataset_fn, parts.state, strategy, explain_data_error)
    run = _Run(model, parts, manager, config.train, model_dir, evaluate_fn, clock, end, progress)
    try:
        run.train(batches)
    finally:
        run.bar.close()
    run.finish()
    return run.summary(restored)


@dataclass
class _Parts:
    """What a run trains with besides the model; all of it is checkpointed."""

    state: RunState
    length: ScheduleLength | None  # the schedule's length, when it is fitted to a time budget
    schedule: WarmupSchedule
    optimizer: keras.optimizers.Optimizer
    clipper: ClipStrategy
    loss_scale: LossScale | None  # with mixed_float16 only
    step_fn: TrainStep
    ema: WeightAverage | None  # with train.ema_decay only


def _build_parts(
    model: keras.Model, element_spec: Any, config: Config, strategy: tf.distribute.Strategy, agc_exempt: list[str]
) -> _Parts:
    """Create the model's variables, then what the run trains with. Call it in the strategy's scope."""
    tcfg = config.train
    build_variables(model, element_spec)
    state = RunState(config.seed)
    tf.random.set_global_generator(state.rng)
    # Fitting to a time budget makes the length a variable; without it the schedule is the plain one.
    length = ScheduleLength(tcfg.steps) if _fits_budget(tcfg) else None
    schedule = build_schedule(
        tcfg.schedule, tcfg.optimizer.learning_rate, tcfg.steps if length is None else length.steps
    )
    optimizer = build_optimizer(tcfg.optimizer, schedule)
    clipper = build_clipper(tcfg.clip, exempt=agc_exempt)
    loss_scale = LossScale() if config.model.mixed_precision == "mixed_float16" else None
    jit = bool(tcfg.jit_compile) if tcfg.jit_compile is not None else bool(tf.config.list_logical_devices("GPU"))
    step_fn = TrainStep(model, optimizer, clipper, strategy=strategy, loss_scale=loss_scale, jit_compile=jit)
    ema = WeightAverage(model, tcfg.ema_decay) if tcfg.ema_decay > 0 else None
    return _Parts(state, length, schedule, optimizer, clipper, loss_scale, step_fn, ema)


def _fits_budget(tcfg: TrainConfig) -> bool:
    """Whether the schedule's length is fitted to `train.time_budget_minutes`."""
    return bool(tcfg.time_budget_minutes) and bool(tcfg.fit_schedule_to_budget)


def _restore(
    ckpt: tf.train.Checkpoint,
    manager: tf.train.CheckpointManager,
    length: ScheduleLength | None,
    config: Config,
    model_dir: Path,
    resume: bool,
    fingerprint: dict[str, Any] | None,
) -> tuple[str | None, int]:
    """Check the settings against the checkpoints' and, with `resume`, restore the newest checkpoint.
    Returns it (None without one) and the step the run ends at: train.steps, or the length fitted to the
    time budget."""
    resuming = resume and manager.latest_checkpoint is not None
    check_fingerprint(model_dir, config_fingerprint(config) if fingerprint is None else fingerprint, resuming)
    restored = restore_latest(ckpt, manager) if resume else None
    if length is None:
        return restored, config.train.steps
    # Attached after the restore, so checkpoints written without it still restore; TensorFlow fills
    # it in on attachment from a checkpoint that has it (the fitted length of the interrupted run).
    ckpt.schedule_length = length
    return restored, length.settle(config.train.steps)


class _Batches:
    """The training batches from the run's data position on (distributed when there are several
    replicas), with input-pipeline errors explained."""

    def __init__(
        self,
        dataset_fn: Callable[[int], tf.data.Dataset],
        state: RunState,
        strategy: tf.distribute.Strategy,
        explain_data_error: Callable[[Exception], Exception] | None,
    ):
        dataset = dataset_fn(int(state.data_position.numpy()))
        self.batch_size = dataset.element_spec[0].shape[0]  # None unless the batch size is static
        if strategy.num_replicas_in_sync > 1:
            dataset = strategy.experimental_distribute_dataset(dataset)
        self._iterator = iter(dataset)
        self._explain = explain_data_error

    def next(self) -> tuple[Any, Any, int]:
        """The next (images, targets) and the number of images in them."""
        try:
            images, targets = next(self._iterator)
        except tf.errors.OpError as err:
            if self._explain is None:
                raise
            raise self._explain(err) from None
        return images, targets, self.batch_size or _batch_of(images)


def _batch_of(images: Any) -> int:
    parts = getattr(images, "values", (images,))
    return int(sum(int(tf.shape(p)[0]) for p in parts))


class _Run:
    """The loop of one `fit`: train steps, telemetry, schedule refits, validation, checkpoints, and the
    reason it stopped."""

    def __init__(
        self,
        model: keras.Model,
        parts: _Parts,
        manager: tf.train.CheckpointManager,
        tcfg: TrainConfig,
        model_dir: Path,
        evaluate_fn: Callable[[keras.Model], float] | None,
        clock: Callable[[], float],
        end: int,
        progress: bool,
    ):
        self.model, self.parts, self.manager, self.tcfg = model, parts, manager, tcfg
        self.model_dir, self.evaluate_fn, self.clock = model_dir, evaluate_fn, clock
        self.start = self.step = int(parts.state.step.numpy())
        self.end = end  # the step the run ends at: train.steps, or the length fitted to the time budget
        self.telemetry = Telemetry(model_dir, start_step=self.start)
        self.bar = TrainProgressBar(end, self.start, progress)
        self.fitter = (
            BudgetFit(tcfg.time_budget_minutes * 60, tcfg.steps, self.start, eval_every=tcfg.eval_every,
                      checkpoint_every=tcfg.checkpoint_every, evaluates=evaluate_fn is not None)
            if parts.length is not None
            else None
        )
        self.out: dict[str, tf.Tensor] | None = None  # the outputs of the last step
        self.stop_reason, self.consecutive_skips = "steps", 0
        self.t_start = self.mark = clock()  # mark: when the current step began
        self.window = ThroughputWindow(self.t_start)
        step_fn = parts.step_fn
        self.clip_counts = int(step_fn.clipped_total.numpy()), int(step_fn.steps_total.numpy())  # at the last log

    def train(self, batches: _Batches) -> None:
        """Step until the end of the schedule or a reason to stop."""
        while self.step < self.end:
            self._train_step(batches)
            self._log_if_due()
            now = self._fit_to_budget()
            now = self._validate_if_due(now)
            now = self._checkpoint_if_due(now)
            self.mark = now
            if self._stopping(now):
                break

    def _train_step(self, batches: _Batches) -> None:
        """One step: advance the run state, count the images, watch for divergence."""
        images, targets, n_images = batches.next()
        self.out = self.parts.step_fn(images, targets)
        if self.parts.ema is not None:
            self.parts.ema.update()
        self.step += 1
        if self.step == self.start + 1:  # leave tracing/compilation out of the throughput numbers
            _ = self.out["loss"].numpy()
            self.window.skip_first_step(self.clock(), n_images)
        self.parts.state.step.assign(self.step)
        self.parts.state.data_position.assign_add(1)
        if self.tcfg.max_consecutive_skips:  # reading the flag syncs with the device, so only when asked
            self.consecutive_skips = self.consecutive_skips + 1 if bool(self.out["skipped"]) else 0
            if self.consecutive_skips >= self.tcfg.max_consecutive_skips:
                self.stop_reason = "diverged"
        self.window.add(n_images)

    def _log_if_due(self) -> None:
        """Every train.log_every steps, at the end and on divergence: a telemetry record, shown on the bar."""
        step = self.step
        if step % self.tcfg.log_every and step != self.end and self.stop_reason != "diverged":
            self.bar.update(step)
            return
        now = self.clock()
        record = self.telemetry.log(step, self._record(now))
        self.bar.update(step, record)
        self.window.restart(now)

    def _record(self, now: float) -> dict[str, Any]:
        """The step's outputs (losses, gradient norms, clipping) with the LR, the clip fractions since the
        last record and in all, skipped steps, throughput, the loss scale and the schedule's length."""
        p = self.parts
        clipped, steps = int(p.step_fn.clipped_total.numpy()), int(p.step_fn.steps_total.numpy())
        last_clipped, last_steps = self.clip_counts
        record = {k: _to_float(v) for k, v in self.out.items() if k != "skipped"}
        record.update(
            lr=float(p.schedule(max(int(p.optimizer.iterations.numpy()) - 1, 0))),  # the LR of this update
            clip_fraction=(clipped - last_clipped) / max(steps - last_steps, 1),
            clip_fraction_total=clipped / max(steps, 1),
            skipped_steps=int(p.step_fn.skipped.numpy()),
        )
        record.update(self.window.rates(now))
        if p.loss_scale is not None:
            record["loss_scale"] = float(p.loss_scale.scale.numpy())
        if p.length is not None:
            record["schedule_steps"] = self.end
        self.clip_counts = clipped, steps
        return record

    def _fit_to_budget(self) -> float:
        """Tell the budget fitter how long the step took; every train.log_every steps, shorten the schedule
        when the measured times say it would end past the budget. Returns the time now."""
        now = self.clock()
        if self.fitter is None:
            return now
        self.fitter.step_done(self.step, now - self.mark)
        if self.step % self.tcfg.log_every == 0:
            self._refit(now - self.t_start)
        return now

    def _refit(self, elapsed_s: float) -> None:
        new = self.fitter.fit(self.step, elapsed_s, self.end)
        if new is None:
            return
        self.parts.length.shorten(new)
        self.bar.set_total(new)
        log.info(
            "schedule refitted to the time budget at step %d: %d -> %d steps (%.3g steps/s measured, "
            "%.0f of %.0f s used)",
            self.step, self.end, new, self.fitter.rate, elapsed_s, self.fitter.budget_s,
        )
        self.end = new

    def _validate_if_due(self, now: float) -> float:
        """Every train.eval_every steps before the end: validation, best weights, early stopping."""
        every = self.tcfg.eval_every
        if self.evaluate_fn is None or not every or self.step % every or self.step >= self.end:
            return now
        if self._evaluate(self.tcfg.early_stopping_patience):
            self.stop_reason = "early_stopping"
        return self._overhead("eval", now)

    def _checkpoint_if_due(self, now: float) -> float:
        if self.step % self.tcfg.checkpoint_every:
            return now
        self.manager.save(checkpoint_number=self.step)
        return self._overhead("checkpoint", now)

    def _overhead(self, kind: str, since: float) -> float:
        """Read the clock after a validation or checkpoint, tell the fitter how long it took; returns the time."""
        now = self.clock()
        if self.fitter is not None:
            self.fitter.overhead(kind, now - since)
        return now

    def _stopping(self, now: float) -> bool:
        if self.stop_reason in ("early_stopping", "diverged"):
            return True
        budget_minutes = self.tcfg.time_budget_minutes
        if budget_minutes and (now - self.t_start) > budget_minutes * 60:
            self.stop_reason = "time_budget"
            return True
        return False

    def _evaluate(self, patience: int) -> bool:
        """Score validation AP50 (of the averaged weights with train.ema_decay), keep the best weights; True
        when early stopping should end the run."""
        with self.parts.ema.applied() if self.parts.ema is not None else nullcontext():
            return self._score(patience)

    def _score(self, patience: int) -> bool:
        state = self.parts.state
        ap50 = float(self.evaluate_fn(self.model))
        self.telemetry.log(self.step, {"val_ap50": ap50})
        if ap50 > float(state.best_ap50.numpy()):
            state.best_ap50.assign(ap50)
            state.evals_since_best.assign(0)
            save_best(self.model, self.model_dir, self.step, ap50)
            return False
        state.evals_since_best.assign_add(1)
        return bool(patience) and int(state.evals_since_best.numpy()) >= patience

    def finish(self) -> None:
        """Name a run that ended at its fitted length; validate (unless early stopping just did) and save; with
        train.ema_decay the model then holds the averaged weights (the checkpoint keeps the trained ones)."""
        if self.stop_reason == "steps" and self.step < self.tcfg.steps:
            self.stop_reason = "fitted_to_budget"
        if self.evaluate_fn is not None and self.stop_reason != "early_stopping":
            self._evaluate(0)
        latest = self.manager.latest_checkpoint
        if latest is None or not latest.endswith(f"-{self.step}"):
            self.manager.save(checkpoint_number=self.step)
        if self.parts.ema is not None:
            self.parts.ema.copy_to_model()
        self.telemetry.close()

    def summary(self, restored: str | None) -> dict[str, Any]:
        step_fn = self.parts.step_fn
        return {
            "step": self.step,
            "stop_reason": self.stop_reason,
            "resumed_from": restored,
            "skipped_steps": int(step_fn.skipped.numpy()),
            "clip_fraction": int(step_fn.clipped_total.numpy()) / max(int(step_fn.steps_total.numpy()), 1),
            "final_loss": _to_float(self.out["loss"]) if self.out is not None else math.nan,
            "best_ap50": float(self.parts.state.best_ap50.numpy()),
            "wall_s": self.clock() - self.t_start,
            "steps_planned": self.tcfg.steps,
            "steps_fitted": self.end if self.parts.length is not None else None,
            "steps_done": self.step,
            "measured_steps_per_s": self.fitter.rate if self.fitter is not None else None,
        }


def _to_float(x: Any) -> Any:
    v = x.numpy() if hasattr(x, "numpy") else x
    return bool(v) if getattr(v, "dtype", None) == bool or isinstance(v, bool) else float(v)
