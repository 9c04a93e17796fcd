"""The training loop: a `tf.function` step (tape → unscale → all-reduce → finiteness → clip → apply) and
`run_training`, which wires data, model, optimizer, clipping, telemetry, checkpoints, validation and export.

Order of operations in one step (why it matters is in docs/clipping.md):

1. forward + losses under `tf.GradientTape`; the loss is multiplied by the loss scale (mixed_float16) and
   by 1/replicas (so the cross-replica SUM is the mean gradient);
2. gradients are unscaled, then all-reduced across replicas (MirroredStrategy);
3. a non-finite loss or gradient marks the step as skipped: the update is not applied (weights, optimizer
   slots and iteration count untouched), the model's non-trainable variables that the forward pass wrote
   (BatchNorm moving statistics, the sampling seed) are put back to their values before the step, the
   skip counter grows and the loss scale halves;
4. the clipper sees the unscaled, reduced, global gradient — never a per-replica or scaled one;
5. `optimizer.apply_gradients` with the clipped gradient (the optimizer's own all-reduce is disabled:
   the gradient is already reduced).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from pipeline.config import Config
from pipeline.train.checkpoints import (
    RunState,
    check_fingerprint,
    checkpoint_manager,
    config_fingerprint,
    load_best,
    make_checkpoint,
    restore_latest,
    save_best,
)
from pipeline.train.clipping import ClipStrategy, build_clipper
from pipeline.train.optim import build_optimizer
from pipeline.train.schedule import BudgetFit, ScheduleLength, build_schedule
from pipeline.train.telemetry import Telemetry

LOSS_KEYS = ("rpn_objectness", "rpn_box", "roi_class", "roi_box")
log = logging.getLogger(__name__)
_ONE = {"trainable": False, "aggregation": tf.VariableAggregation.ONLY_FIRST_REPLICA}


class LossScale(tf.Module):
    """Dynamic loss scaling for float16: halve on a non-finite gradient, double after `growth_interval`
    finite steps in a row (the scheme of Keras' LossScaleOptimizer, kept here so we can clip in between)."""

    def __init__(self, initial: float = 2.0**15, growth_interval: int = 2000):
        super().__init__(name="loss_scale")
        self.growth_interval = int(growth_interval)
        self.scale = tf.Variable(float(initial), name="scale", **_ONE)
        self.good_steps = tf.Variable(tf.constant(0, tf.int64), name="good_steps", **_ONE)

    def update(self, finite: tf.Tensor) -> None:
        grow = finite & (self.good_steps + 1 >= self.growth_interval)
        self.scale.assign(tf.where(finite, tf.where(grow, self.scale * 2.0, self.scale), self.scale * 0.5))
        self.good_steps.assign(tf.where(finite & ~grow, self.good_steps + 1, tf.constant(0, tf.int64)))


class TrainStep(tf.Module):
    """Callable train step ``step(images, targets) -> dict of scalar tensors`` with checkpointable counters.

    Counters: ``skipped`` (non-finite steps), ``clipped_total`` and ``steps_total`` (for the clip fraction).
    With a ``strategy`` of several replicas, call it with the per-replica values of a distributed dataset.
    """

    def __init__(
        self,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        clipper: ClipStrategy,
        *,
        strategy: tf.distribute.Strategy | None = None,
        loss_scale: LossScale | None = None,
        jit_compile: bool = False,
    ):
        super().__init__(name="train_step")
        self.model, self.optimizer, self.clipper = model, optimizer, clipper
        self.strategy = strategy or tf.distribute.get_strategy()
        self.replicas = int(self.strategy.num_replicas_in_sync)
        self.loss_scale = loss_scale
        self.skipped = tf.Variable(tf.constant(0, tf.int64), name="skipped", **_ONE)
        self.clipped_total = tf.Variable(tf.constant(0, tf.int64), name="clipped_total", **_ONE)
        self.steps_total = tf.Variable(tf.constant(0, tf.int64), name="steps_total", **_ONE)
        # Gradients reach the optimizer already all-reduced; Keras' TF optimizer would SUM them across
        # replicas again (it has no experimental_aggregate_gradients switch in Keras 3), so turn that off.
        # If a future Keras renames the hook, fall back to pre-dividing by the replica count.
        if not optimizer.built:
            # Slots must exist before tracing: creating variables inside the step's tf.cond fails under
            # MirroredStrategy, and a checkpoint restore needs them to restore into.
            with self.strategy.scope():
                optimizer.build(model.trainable_variables)
        self._pre_divide = 1.0
        if self.replicas > 1:
            if hasattr(optimizer, "_all_reduce_sum_gradients"):
                optimizer._all_reduce_sum_gradients = lambda grads_and_vars: list(grads_and_vars)
            else:  # pragma: no cover - depends on the Keras version
                self._pre_divide = 1.0 / self.replicas
        # autograph=False: the step, the detector and the clippers branch in Python only on Python values
        # (static shapes; tensor conditions are explicit tf.cond/tf.where), so AutoGraph would produce the
        # same graph; skipping its source transformation halves the first step's tracing time.
        self._grads = (
            tf.function(self._compute_grads, jit_compile=jit_compile, autograph=False)
            if self.replicas > 1
            else self._compute_grads
        )
        if self.replicas > 1:
            self._fn = tf.function(self._distributed, autograph=False)
        else:
            self._fn = tf.function(self._replica_step, jit_compile=jit_compile, autograph=False)

    def __call__(self, images: Any, targets: Any) -> dict[str, tf.Tensor]:
        return self._fn(images, targets)

    # ------------------------------------------------------------------ per replica
    def _compute_grads(self, images, targets):
        scale = self.loss_scale.scale if self.loss_scale is not None else tf.constant(1.0)
        with tf.GradientTape() as tape:
            raw = self.model.compute_losses(images, targets, training=True)
            variables = self.model.trainable_variables  # read after the forward pass: layers may build lazily
            losses = {k: tf.cast(raw[k], tf.float32) for k in LOSS_KEYS}
            total = tf.add_n(list(losses.values()))
            if self.model.losses:  # weight regularisers declared on layers
                losses["regularization"] = tf.add_n([tf.cast(x, tf.float32) for x in self.model.losses])
                total = total + losses["regularization"]
            scaled = total * (scale / self.replicas)
        grads = tape.gradient(scaled, variables)
        grads = [None if g is None else tf.cast(g, tf.float32) / scale for g in grads]
        return losses, total, grads

    def _forward_state(self) -> list:
        """The model's non-trainable variables, once each: what a forward pass may write (BatchNorm moving
        mean/variance, the sampling seed generator) besides variables nothing writes (frozen layers)."""
        seen: dict[int, Any] = {}
        for v in self.model.non_trainable_variables:
            seen.setdefault(id(v), v)
        return list(seen.values())

    def _restore_if(self, skipped: tf.Tensor, state: list, saved: list[tf.Tensor]) -> None:
        """Put `state` back to `saved` when `skipped`. Under MirroredStrategy this runs per replica: each
        replica restores its own copy (Keras creates BN statistics and seed states with aggregation NONE,
        which replicas write locally, without a merge call). A variable with another aggregation would need
        a merge call, which cannot sit in a tf.cond branch in replica context: it gets an unconditional
        assign of tf.where(skipped, saved, current) instead."""
        local, other = [], []
        for v, s in zip(state, saved):
            inner = getattr(v, "value", v)
            aggregation = getattr(inner, "aggregation", tf.VariableAggregation.NONE)
            (local if self.replicas == 1 or aggregation == tf.VariableAggregation.NONE else other).append((v, s))

        def restore():
            for v, s in local:
                v.assign(s)
            return tf.constant(True)

        if local:
            tf.cond(skipped, restore, lambda: tf.constant(False))
        for v, s in other:  # pragma: no cover - no such variable in the detector
            v.assign(tf.where(skipped, s, tf.convert_to_tensor(v)))

    def _replica_step(self, images, targets):
        # Read before the forward pass (automatic control dependencies order the reads before the writes
        # of the forward pass), restored below if the step turns out non-finite.
        state = self._forward_state()
        saved = [tf.identity(tf.convert_to_tensor(v)) for v in state]
        losses, total, grads = self._grads(images, targets)
        pairs = [(g, v) for g, v in zip(grads, self.model.trainable_variables) if g is not None]
        grads, variables = [g for g, _ in pairs], [v for _, v in pairs]
        if self.replicas > 1:
            ctx = tf.distribute.get_replica_context()
            grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
            scalars = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, [total, *losses.values()])
            total, losses = scalars[0], dict(zip(losses, scalars[1:]))
        finite = tf.math.is_finite(total) & tf.reduce_all(
            [tf.reduce_all(tf.math.is_finite(g)) for g in grads]
        )
        clipped, stats = self.clipper(grads, variables, total)
        if self._pre_divide != 1.0:  # pragma: no cover
            clipped = [g * self._pre_divide for g in clipped]
        if self.loss_scale is not None:
            self.loss_scale.update(finite)
        self._apply_if(finite, clipped, variables)
        self._restore_if(~finite, state, saved)
        self.skipped.assign_add(tf.cast(~finite, tf.int64))
        self.clipped_total.assign_add(tf.cast(stats.clipped & finite, tf.int64))
        self.steps_total.assign_add(1)
        out = dict(losses)
        out.update(
            loss=total,
            grad_norm_before=stats.norm_before,
            grad_norm_after=stats.norm_after,
            clipped=stats.clipped & finite,
            clip_threshold=stats.threshold,
            skipped=~finite,
        )
        return out

    def _apply_if(self, finite: tf.Tensor, grads: list[tf.Tensor], variables: list) -> None:
        """apply_gradients only when `finite`. Under MirroredStrategy without no-merge-call support the cond
        must sit in cross-replica context (apply_gradients calls merge_call) — Keras' LossScaleOptimizer
        does the same."""

        def apply(g, v):
            self.optimizer.apply_gradients(zip(g, v))
            return tf.constant(True)

        if self.replicas == 1 or tf.__internal__.distribute.strategy_supports_no_merge_call():
            tf.cond(finite, lambda: apply(grads, variables), lambda: tf.constant(False))
            return

        def cross_replica(distribution, finite, grads, variables):
            first = distribution.experimental_local_results(finite)[0]

            def do_apply():
                distribution.extended.call_for_each_replica(apply, args=(grads, variables))
                return tf.constant(True)

            tf.cond(first, do_apply, lambda: tf.constant(False))

        tf.distribute.get_replica_context().merge_call(cross_replica, args=(finite, grads, variables))

    def _distributed(self, images, targets):
        out = self.strategy.run(self._replica_step, args=(images, targets))
        # Every value was all-reduced inside the step, so the first replica's copy is the global one.
        return {k: self.strategy.experimental_local_results(v)[0] for k, v in out.items()}


def make_train_step(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    clipper: ClipStrategy,
    *,
    strategy: tf.distribute.Strategy | None = None,
    loss_scale: LossScale | None = None,
    jit_compile: bool = False,
) -> TrainStep:
    """Build the train step (see `TrainStep`). Create it inside `strategy.scope()` when distributed."""
    return TrainStep(
        model, optimizer, clipper, strategy=strategy, loss_scale=loss_scale, jit_compile=jit_compile
    )


# ====================================================================================== the run
def choose_strategy(mode: str) -> tf.distribute.Strategy:
    """'mirrored' → MirroredStrategy; 'auto' → MirroredStrategy when more than one GPU; else default."""
    gpus = tf.config.list_logical_devices("GPU")
    if mode == "mirrored" or (mode == "auto" and len(gpus) > 1):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _to_float(x: Any) -> Any:
    v = x.numpy() if hasattr(x, "numpy") else x
    return bool(v) if getattr(v, "dtype", None) == bool or isinstance(v, bool) else float(v)


class _Progress:
    """A rich progress bar showing step, loss, img/s and clip fraction (silent when disabled)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  {task.fields[ips]} img/s  clip {task.fields[clip]}"),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-", ips="-", clip="-")
            self.bar.start()

    def update(self, step: int, record: dict[str, Any] | None = None) -> None:
        if self.bar is None:
            return
        fields = {}
        if record:
            fields = {
                "loss": f"{record['loss']:.4f}" if isinstance(record.get("loss"), float) else "nan",
                "ips": f"{record['images_per_s']:.1f}" if "images_per_s" in record else "-",
                "clip": f"{record['clip_fraction_total']:.0%}",
            }
        self.bar.update(self.task, completed=step, **fields)

    def set_total(self, total: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, total=total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


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
    tcfg = config.train
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    strategy = strategy or tf.distribute.get_strategy()
    batch_size = None

    with strategy.scope():
        build_variables(model, dataset_fn(0).element_spec)
        state = RunState(config.seed)
        tf.random.set_global_generator(state.rng)
        # Fitting to a time budget makes the length a variable; without it the schedule is the plain one.
        length = ScheduleLength(tcfg.steps) if _fits_budget(tcfg) else None
        schedule = build_schedule(
            tcfg.schedule, tcfg.optimizer.learning_rate, tcfg.steps if length is None else length.steps
        )
        optimizer = build_optimizer(tcfg.optimizer, schedule)
        clipper = build_clipper(tcfg.clip, exempt=agc_exempt or [])
        loss_scale = LossScale() if config.model.mixed_precision == "mixed_float16" else None
        step_fn = make_train_step(
            model,
            optimizer,
            clipper,
            strategy=strategy,
            loss_scale=loss_scale,
            jit_compile=bool(tcfg.jit_compile)
            if tcfg.jit_compile is not None
            else bool(tf.config.list_logical_devices("GPU")),
        )
    ckpt = make_checkpoint(model=model, optimizer=optimizer, clip=clipper, train_step=step_fn, state=state)
    manager = checkpoint_manager(ckpt, model_dir, tcfg.keep_checkpoints)
    resuming = resume and manager.latest_checkpoint is not None
    check_fingerprint(model_dir, config_fingerprint(config) if fingerprint is None else fingerprint, resuming)
    restored = restore_latest(ckpt, manager) if resume else None
    end = tcfg.steps  # the step the run ends at: train.steps, or the length fitted to the time budget
    if length is not None:
        # Attached after the restore, so checkpoints written without it still restore; TensorFlow fills
        # it in on attachment from a checkpoint that has it (the fitted length of the interrupted run).
        ckpt.schedule_length = length
        end = length.settle(tcfg.steps)
    start = int(state.step.numpy())

    dataset = dataset_fn(int(state.data_position.numpy()))
    spec_images = dataset.element_spec[0]
    batch_size = spec_images.shape[0]
    if strategy.num_replicas_in_sync > 1:
        dataset = strategy.experimental_distribute_dataset(dataset)
    iterator = iter(dataset)

    telemetry = Telemetry(model_dir, start_step=start)
    bar = _Progress(end, start, progress)
    fitter = (
        BudgetFit(
            tcfg.time_budget_minutes * 60,
            tcfg.steps,
            start,
            eval_every=tcfg.eval_every,
            checkpoint_every=tcfg.checkpoint_every,
            evaluates=evaluate_fn is not None,
        )
        if length is not None
        else None
    )
    t_start = mark = clock()
    window_t, window_steps, window_images = t_start, 0, 0
    last_clipped, last_steps = int(step_fn.clipped_total.numpy()), int(step_fn.steps_total.numpy())
    stop_reason, step, out, consecutive_skips = "steps", start, None, 0
    try:
        while step < end:
            try:
                images, targets = next(iterator)
            except tf.errors.OpError as err:
                if explain_data_error is None:
                    raise
                raise explain_data_error(err) from None
            out = step_fn(images, targets)
            step += 1
            if step == start + 1:  # leave tracing/compilation out of the throughput numbers
                _ = out["loss"].numpy()
                window_t, window_steps, window_images = (
                    clock(),
                    -1,
                    -(batch_size or _batch_of(images)),
                )
            state.step.assign(step)
            state.data_position.assign_add(1)
            if tcfg.max_consecutive_skips:  # reading the flag syncs with the device, so only when asked
                consecutive_skips = consecutive_skips + 1 if bool(out["skipped"]) else 0
                if consecutive_skips >= tcfg.max_consecutive_skips:
                    stop_reason = "diverged"
            window_steps += 1
            window_images += batch_size if batch_size else _batch_of(images)
            if step % tcfg.log_every == 0 or step == end or stop_reason == "diverged":
                now = clock()
                clipped_total, steps_total = (
                    int(step_fn.clipped_total.numpy()),
                    int(step_fn.steps_total.numpy()),
                )
                rec = {k: _to_float(v) for k, v in out.items() if k != "skipped"}
                rec.update(
                    lr=float(
                        schedule(max(int(optimizer.iterations.numpy()) - 1, 0))
                    ),  # the LR of this update
                    clip_fraction=(clipped_total - last_clipped) / max(steps_total - last_steps, 1),
                    clip_fraction_total=clipped_total / max(steps_total, 1),
                    skipped_steps=int(step_fn.skipped.numpy()),
                )
                if window_steps > 0:  # zero only when the first step of this process is a log step
                    rec.update(
                        images_per_s=window_images / max(now - window_t, 1e-9),
                        steps_per_s=window_steps / max(now - window_t, 1e-9),
                    )
                if loss_scale is not None:
                    rec["loss_scale"] = float(loss_scale.scale.numpy())
                if length is not None:
                    rec["schedule_steps"] = end
                record = telemetry.log(step, rec)
                bar.update(step, record)
                window_t, window_steps, window_images = now, 0, 0
                last_clipped, last_steps = clipped_total, steps_total
            else:
                bar.update(step)
            now = clock()
            if fitter is not None:
                fitter.step_done(step, now - mark)
                if step % tcfg.log_every == 0:
                    end = _refit(fitter, length, bar, step, now - t_start, end)
            due = evaluate_fn is not None and tcfg.eval_every and step % tcfg.eval_every == 0 and step < end
            if due:
                early = _evaluate(
                    evaluate_fn, model, model_dir, state, step, telemetry, tcfg.early_stopping_patience
                )
                now = _overhead(fitter, "eval", now, clock)
                if early:
                    stop_reason = "early_stopping"
            if step % tcfg.checkpoint_every == 0:
                manager.save(checkpoint_number=step)
                now = _overhead(fitter, "checkpoint", now, clock)
            mark = now
            if stop_reason in ("early_stopping", "diverged"):
                break
            if tcfg.time_budget_minutes and (now - t_start) > tcfg.time_budget_minutes * 60:
                stop_reason = "time_budget"
                break
    finally:
        bar.close()
    if stop_reason == "steps" and step < tcfg.steps:  # ended at the length fitted to the time budget
        stop_reason = "fitted_to_budget"
    if evaluate_fn is not None and stop_reason != "early_stopping":
        _evaluate(evaluate_fn, model, model_dir, state, step, telemetry, 0)
    if manager.latest_checkpoint is None or not manager.latest_checkpoint.endswith(f"-{step}"):
        manager.save(checkpoint_number=step)
    telemetry.close()
    return {
        "step": step,
        "stop_reason": stop_reason,
        "resumed_from": restored,
        "skipped_steps": int(step_fn.skipped.numpy()),
        "clip_fraction": int(step_fn.clipped_total.numpy()) / max(int(step_fn.steps_total.numpy()), 1),
        "final_loss": _to_float(out["loss"]) if out is not None else math.nan,
        "best_ap50": float(state.best_ap50.numpy()),
        "wall_s": clock() - t_start,
        "steps_planned": tcfg.steps,
        "steps_fitted": end if length is not None else None,
        "steps_done": step,
        "measured_steps_per_s": fitter.rate if fitter is not None else None,
    }


def _fits_budget(tcfg: Any) -> bool:
    """Whether the schedule's length is fitted to `train.time_budget_minutes`."""
    return bool(tcfg.time_budget_minutes) and bool(tcfg.fit_schedule_to_budget)


def _refit(
    fitter: BudgetFit, length: ScheduleLength, bar: _Progress, step: int, elapsed_s: float, end: int
) -> int:
    """Shorten the schedule when the measured times say it would end past the budget; returns the length."""
    new = fitter.fit(step, elapsed_s, end)
    if new is None:
        return end
    length.shorten(new)
    bar.set_total(new)
    log.info(
        "schedule refitted to the time budget at step %d: %d -> %d steps (%.3g steps/s measured, "
        "%.0f of %.0f s used)",
        step,
        end,
        new,
        fitter.rate,
        elapsed_s,
        fitter.budget_s,
    )
    return new


def _overhead(fitter: BudgetFit | None, kind: str, since: float, clock: Callable[[], float]) -> float:
    """Read the clock after a validation or checkpoint, tell the fitter how long it took; returns the time."""
    now = clock()
    if fitter is not None:
        fitter.overhead(kind, now - since)
    return now


def _agc_exempt_variables(model: keras.Model) -> list:
    """The final classifier, which AGC leaves alone (NFNets): `model.agc_exempt_variables()` when the
    detector offers it, else the ROI box head's class-score layer (`box_head.cls`)."""
    if hasattr(model, "agc_exempt_variables"):
        return list(model.agc_exempt_variables())
    cls = getattr(getattr(model, "box_head", None), "cls", None)
    return list(cls.trainable_variables) if cls is not None else []


def build_variables(model: keras.Model, element_spec: Any) -> None:
    """Create every model variable with one eager loss computation on an all-zero batch without boxes.

    The optimizer's slots and a checkpoint restore need the complete variable list before the first
    traced step, and Keras layers may build lazily on their first call. The computation runs in inference
    mode (BatchNorm uses, and does not update, its moving statistics), and the non-trainable variables
    that existed before it (moving statistics, the sampling seed, which the loss computation draws from)
    are put back afterwards: building leaves the model exactly as it was constructed.
    """
    image_spec, target_spec = element_spec

    def zeros(spec: tf.TensorSpec) -> tf.Tensor:
        return tf.zeros([1 if d is None else d for d in spec.shape], spec.dtype)

    before = {id(v): (v, tf.identity(tf.convert_to_tensor(v))) for v in model.non_trainable_variables}
    targets = {k: zeros(v) for k, v in target_spec.items() if v.dtype != tf.string}
    model.compute_losses(zeros(image_spec), targets, training=False)
    for v, value in before.values():
        v.assign(value)


def _batch_of(images: Any) -> int:
    parts = getattr(images, "values", (images,))
    return int(sum(int(tf.shape(p)[0]) for p in parts))


def _evaluate(
    evaluate_fn, model, model_dir: Path, state: RunState, step: int, telemetry: Telemetry, patience: int
) -> bool:
    """Score validation AP50, keep the best weights; True when early stopping should end the run."""
    ap50 = float(evaluate_fn(model))
    telemetry.log(step, {"val_ap50": ap50})
    if ap50 > float(state.best_ap50.numpy()):
        state.best_ap50.assign(ap50)
        state.evals_since_best.assign(0)
        save_best(model, model_dir, step, ap50)
        return False
    state.evals_since_best.assign_add(1)
    return bool(patience) and int(state.evals_since_best.numpy()) >= patience


def build_for_training(config: Config, channels: int, stats: dict[str, Any] | None = None
                       ) -> tuple[keras.Model, tf.distribute.Strategy, list[str]]:
    """Seed, pick the distribution strategy and build the detector in its scope; returns (model, strategy,
    paths of the variables AGC leaves unclipped). With `train.jit_compile`, 'auto' kernels resolve to the
    XLA-compatible ones (padded NMS, gather ROIAlign) even on a CPU."""
    from pipeline.model.detector import build_detector

    keras.utils.set_random_seed(config.seed)
    strategy = choose_strategy(config.train.distribute)
    model_cfg = config.model
    if config.train.jit_compile:
        model_cfg = model_cfg.model_copy(update={
            k: v for k, v in {"nms_impl": "padded", "roi_align_impl": "gather"}.items() if getattr(model_cfg, k) == "auto"
        })
    with strategy.scope():
        model = build_detector(model_cfg, len(config.classes), channels, stats=stats)
    exempt = [str(getattr(v, "path", v.name)) for v in _agc_exempt_variables(model)]
    return model, strategy, exempt


def run_training(config: Config, tiles_dir: Path, model_dir: Path, resume: bool = False) -> Path:
    """Train the detector on `tiles_dir` per `config.train`; returns `model_dir`, which then holds
    checkpoints/, tensorboard/, train_log.jsonl, best/ (when there is a val split), train_summary.json and
    export/ (the best validation weights when validated, else the last ones)."""
    from pipeline.data.dataset import build_dataset, explain_data_error, tile_count
    from pipeline.data.stats import load_stats
    from pipeline.files import atomic_write_json
    from pipeline.model.export import export_model

    tiles_dir, model_dir = Path(tiles_dir), Path(model_dir)
    stats = load_stats(tiles_dir)
    model, strategy, exempt = build_for_training(config, int(stats["channels"]), stats=stats)
    evaluate_fn = None
    if tile_count(tiles_dir, "val") > 0:
        val = build_dataset(tiles_dir, "val", config, training=False)
        classes, max_dets = list(config.classes), config.evaluate.max_dets
        from pipeline.train.validation import make_predict_fn, validation_ap50

        predict_fn = make_predict_fn(model)

        def evaluate_fn(m: keras.Model) -> float:
            return validation_ap50(m, val, classes, max_dets, predict_fn=predict_fn)

    summary = fit(
        model,
        lambda start: build_dataset(tiles_dir, "train", config, training=True, start_batch=start),
        config,
        model_dir,
        resume=resume,
        strategy=strategy,
        evaluate_fn=evaluate_fn,
        agc_exempt=exempt,
        explain_data_error=lambda err: explain_data_error(err, tiles_dir, "train"),
        fingerprint=config_fingerprint(config, stats),
    )
    calibration = None
    if evaluate_fn is not None:
        load_best(model, model_dir)  # export the best validation weights, not just the last ones
        from pipeline.train.validation import output_threshold, validation_metrics

        calibration = output_threshold(validation_metrics(model, val, classes, max_dets, predict_fn=predict_fn))
        summary["output_threshold"] = calibration
    export_model(model, stats, list(config.classes), model_dir / "export", int(stats["tile_size"]),
                 calibration=calibration)
    atomic_write_json(model_dir / "train_summary.json", summary)
    return model_dir
