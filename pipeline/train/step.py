"""The train step: a `tf.function` (tape → unscale → all-reduce → finiteness → clip → apply) with its
dynamic loss scale, and `build_variables`, which creates the model's variables before the step is traced.

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

from typing import Any

import keras
import tensorflow as tf

from pipeline.model.losses import IOU_LOSS_NAME, LOSS_NAMES
from pipeline.train.clipping import ClipStrategy
from pipeline.train.variables import state_variable


class LossScale(tf.Module):
    """Dynamic loss scaling for float16: halve on a non-finite gradient, double after `growth_interval`
    finite steps in a row (the scheme of Keras' LossScaleOptimizer, kept here so we can clip in between)."""

    def __init__(self, initial: float = 2.0**15, growth_interval: int = 2000):
        super().__init__(name="loss_scale")
        self.growth_interval = int(growth_interval)
        self.scale = state_variable(float(initial), "scale")
        self.good_steps = state_variable(tf.constant(0, tf.int64), "good_steps")

    def update(self, finite: tf.Tensor) -> None:
        grow = finite & (self.good_steps + 1 >= self.growth_interval)
        self.scale.assign(tf.where(finite, tf.where(grow, self.scale * 2.0, self.scale), self.scale * 0.5))
        self.good_steps.assign(tf.where(finite & ~grow, self.good_steps + 1, tf.constant(0, tf.int64)))


class TrainStep(tf.Module):
    """Callable train step ``step(images, targets) -> dict of scalar tensors`` with checkpointable counters.

    Counters: ``skipped`` (non-finite steps), ``clipped_total`` and ``steps_total`` (for the clip fraction).
    With a ``strategy`` of several replicas, create it inside ``strategy.scope()`` and call it with the
    per-replica values of a distributed dataset.
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
        self.skipped = state_variable(tf.constant(0, tf.int64), "skipped")
        self.clipped_total = state_variable(tf.constant(0, tf.int64), "clipped_total")
        self.steps_total = state_variable(tf.constant(0, tf.int64), "steps_total")
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
        # same graph; skipping its source transformation shortens the first step's tracing.
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
            losses = {k: tf.cast(raw[k], tf.float32) for k in (*LOSS_NAMES, IOU_LOSS_NAME) if k in raw}
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

