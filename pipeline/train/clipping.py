"""Gradient clipping strategies: one interface, one class per strategy, chosen by the `train.clip` block.

Every strategy is a callable ``clipper(grads, variables, loss) -> (clipped_grads, ClipStats)``:

- ``grads`` / ``variables``: lists of the same length (no ``None`` gradients — the train step drops them);
  gradients are the *unscaled* (mixed precision) and *cross-replica reduced* (MirroredStrategy) ones.
- ``loss``: the scalar training loss of the step (used by ``loss_adaptive``).
- ``ClipStats``: global L2 norm before and after clipping, a boolean "did anything get clipped", and the
  threshold the strategy used this step (in its own units; ``inf`` for ``none``).

All computation is TensorFlow ops (graph- and XLA-safe: static shapes, no Python branching on tensors).
Stateful strategies (``autoclip``, ``zclip``) are ``tf.Module``s holding their state in ``tf.Variable``s,
so ``tf.train.Checkpoint(clip=clipper)`` saves and restores it. Their state only advances on steps whose
loss and gradient norm are finite: a step the trainer skips never pollutes the history.

See docs/clipping.md for the formulas, when to use each, and how to choose thresholds from telemetry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import tensorflow as tf

from pipeline.config import ClipConfig
from pipeline.train.variables import state_variable


class ClipStats(NamedTuple):
    """What a clipper did in one step (all scalar tensors)."""

    norm_before: tf.Tensor  # global L2 norm of the incoming gradient
    norm_after: tf.Tensor  # global L2 norm of the returned gradient
    clipped: tf.Tensor  # bool: the gradient was changed
    threshold: tf.Tensor  # the threshold used this step (strategy units; inf when unused)


def global_norm(grads: Sequence[tf.Tensor]) -> tf.Tensor:
    """Global L2 norm over a list of tensors, computed in float32."""
    return tf.linalg.global_norm([tf.cast(g, tf.float32) for g in grads])


def _var_path(variable: tf.Variable) -> str:
    """Keras 3 variables have a unique `path` ('model/layer/kernel'); plain tf.Variables only a name."""
    return str(getattr(variable, "path", None) or variable.name)


class ClipStrategy(tf.Module):
    """Base class: subclasses implement `_clip`, the base computes the norms."""

    strategy = "base"

    def __call__(
        self, grads: Sequence[tf.Tensor], variables: Sequence[tf.Variable], loss: tf.Tensor
    ) -> tuple[list[tf.Tensor], ClipStats]:
        grads = list(grads)
        if len(grads) != len(variables):
            raise ValueError(f"{len(grads)} gradients for {len(variables)} variables")
        norm = global_norm(grads)
        clipped, threshold, was_clipped = self._clip(grads, list(variables), tf.cast(loss, tf.float32), norm)
        stats = ClipStats(
            norm_before=norm,
            norm_after=global_norm(clipped),
            clipped=tf.convert_to_tensor(was_clipped, tf.bool),
            threshold=tf.cast(threshold, tf.float32),
        )
        return clipped, stats

    def _clip(
        self, grads: list[tf.Tensor], variables: list[tf.Variable], loss: tf.Tensor, norm: tf.Tensor
    ) -> tuple[list[tf.Tensor], tf.Tensor, tf.Tensor]:
        """Return (clipped grads, threshold, clipped?)."""
        raise NotImplementedError


def _clip_global(
    grads: list[tf.Tensor], threshold: tf.Tensor, norm: tf.Tensor
) -> tuple[list[tf.Tensor], tf.Tensor]:
    """Scale all grads by min(1, threshold / norm) — tf.clip_by_global_norm's formula, written out because
    that op turns an infinite threshold ("do not clip") into NaN (inf * 0). Returns (grads, clipped?)."""
    threshold = tf.cast(threshold, tf.float32)
    was = norm > threshold
    scale = tf.where(was, threshold / norm, tf.ones_like(norm))
    return [g * tf.cast(scale, g.dtype) for g in grads], was


class NoClip(ClipStrategy):
    """`none`: gradients pass through (norms are still measured for telemetry)."""

    strategy = "none"

    def _clip(self, grads, variables, loss, norm):
        return grads, tf.constant(math.inf), tf.constant(False)


class GlobalNormClip(ClipStrategy):
    """`global_norm`: g ← g · min(1, c / ‖g‖₂) with ‖g‖₂ the norm over *all* gradients (direction kept)."""

    strategy = "global_norm"

    def __init__(self, clip_norm: float):
        super().__init__(name="global_norm_clip")
        self.clip_norm = float(clip_norm)

    def _clip(self, grads, variables, loss, norm):
        clipped, was = _clip_global(grads, self.clip_norm, norm)
        return clipped, tf.constant(self.clip_norm), was


class ValueClip(ClipStrategy):
    """`value`: every element clipped to [-v, v] (changes the gradient's direction)."""

    strategy = "value"

    def __init__(self, clip_value: float):
        super().__init__(name="value_clip")
        self.clip_value = float(clip_value)

    def _clip(self, grads, variables, loss, norm):
        v = self.clip_value
        clipped = [tf.clip_by_value(g, -tf.cast(v, g.dtype), tf.cast(v, g.dtype)) for g in grads]
        was = tf.reduce_any(tf.stack([tf.reduce_any(tf.abs(g) > tf.cast(v, g.dtype)) for g in grads]))
        return clipped, tf.constant(v), was


class NormClip(ClipStrategy):
    """`norm`: each tensor separately, g_i ← g_i · min(1, c / ‖g_i‖₂) (per-tensor directions kept)."""

    strategy = "norm"

    def __init__(self, clip_norm: float):
        super().__init__(name="norm_clip")
        self.clip_norm = float(clip_norm)

    def _clip(self, grads, variables, loss, norm):
        c = self.clip_norm
        clipped = [tf.clip_by_norm(g, tf.cast(c, g.dtype)) for g in grads]
        was = tf.reduce_any(tf.stack([tf.norm(tf.cast(g, tf.float32)) > c for g in grads]))
        return clipped, tf.constant(c), was


class LossAdaptiveClip(ClipStrategy):
    """`loss_adaptive`: global-norm clipping with a threshold that depends on the step's loss.

    Default (the classic recipe): c = base + slope · min(loss, cap). The threshold *grows* with the loss,
    so clipping gets LOOSER when the loss is high (early training, loss spikes) and tighter as the loss
    falls. With ``inverse=True``: c = base + slope / (1 + min(loss, cap)), which tightens as the loss
    grows — the behaviour people usually expect from "adaptive" clipping.
    """

    strategy = "loss_adaptive"

    def __init__(self, base: float, slope: float, cap: float, inverse: bool = False):
        super().__init__(name="loss_adaptive_clip")
        self.base, self.slope, self.cap, self.inverse = float(base), float(slope), float(cap), bool(inverse)

    def threshold(self, loss: tf.Tensor) -> tf.Tensor:
        capped = tf.minimum(tf.cast(loss, tf.float32), self.cap)
        if self.inverse:
            return self.base + self.slope / (1.0 + capped)
        return self.base + self.slope * capped

    def _clip(self, grads, variables, loss, norm):
        threshold = self.threshold(loss)
        clipped, was = _clip_global(grads, threshold, norm)
        return clipped, threshold, was


class AutoClip(ClipStrategy):
    """`autoclip` (Seetharaman et al. 2020): global-norm clipping at the p-th percentile of past norms.

    The current norm joins a ring buffer of the last ``history`` finite global norms, then
    c = percentile_p(buffer) (linear interpolation, as ``numpy.percentile``). During the first
    ``warmup_steps`` recorded steps nothing is clipped (the buffer is still filling).
    """

    strategy = "autoclip"

    def __init__(self, percentile: float, history: int, warmup_steps: int = 0):
        super().__init__(name="autoclip")
        self.percentile = float(percentile)
        self.size = int(history)
        self.warmup_steps = int(warmup_steps)
        self.norms = state_variable(tf.zeros([self.size]), "norms")
        self.count = state_variable(tf.constant(0, tf.int64), "count")

    def _percentile(self, buffer: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
        """numpy-style linear-interpolated percentile of the first n valid entries (static shapes)."""
        valid = tf.range(self.size, dtype=tf.int64) < n
        ordered = tf.sort(tf.where(valid, buffer, tf.constant(math.inf)))  # invalid entries sort last
        pos = self.percentile / 100.0 * tf.cast(tf.maximum(n - 1, 0), tf.float32)
        lo = tf.cast(tf.floor(pos), tf.int32)
        hi = tf.cast(tf.math.ceil(pos), tf.int32)
        a, b = tf.gather(ordered, lo), tf.gather(ordered, hi)
        return a + (b - a) * (pos - tf.floor(pos)) if self.size > 1 else a

    def _clip(self, grads, variables, loss, norm):
        ok = tf.math.is_finite(norm) & tf.math.is_finite(loss)
        slot = self.count % self.size
        buffer = tf.tensor_scatter_nd_update(self.norms, [[slot]], [norm])
        buffer = tf.where(ok, buffer, self.norms)
        count = self.count + tf.cast(ok, tf.int64)
        n = tf.minimum(count, self.size)
        threshold = self._percentile(buffer, n)
        active = count > self.warmup_steps
        clipped, was = _clip_global(grads, tf.where(active, threshold, tf.constant(math.inf)), norm)
        self.norms.assign(buffer)
        self.count.assign(count)
        return clipped, tf.where(active, threshold, tf.constant(math.inf)), was & active


class AGC(ClipStrategy):
    """`agc` — adaptive gradient clipping (Brock et al. 2021, NFNets), unit-wise.

    For every output unit i of a parameter W (the LAST axis of a Keras kernel: Dense [in, out],
    Conv2D [h, w, in, out]) with gradient G:  if ‖G_i‖ / max(‖W_i‖, eps) > λ then
    G_i ← G_i · λ · max(‖W_i‖, eps) / ‖G_i‖  (norms over all other axes).
    Vectors and scalars (biases, BatchNorm γ/β) count as ONE unit (whole-tensor norm) — the choice of the
    reference JAX implementation (deepmind-research/nfnets/optim.py) and timm. Variables whose path
    contains one of ``exempt`` (e.g. the final classifier, as in the paper) are not clipped.
    """

    strategy = "agc"

    def __init__(self, clipping: float, eps: float = 1e-3, exempt: Sequence[str] = ()):
        super().__init__(name="agc")
        self.clipping, self.eps = float(clipping), float(eps)
        self.exempt = tuple(exempt)

    def is_exempt(self, variable: tf.Variable) -> bool:
        path = _var_path(variable)
        return any(s and s in path for s in self.exempt)

    @staticmethod
    def unitwise_norm(x: tf.Tensor) -> tf.Tensor:
        """‖x‖ per output unit (last axis), broadcastable to x; whole-tensor norm for rank <= 1."""
        x = tf.cast(x, tf.float32)
        if x.shape.rank is None or x.shape.rank <= 1:
            return tf.norm(x)
        return tf.sqrt(tf.reduce_sum(tf.square(x), axis=list(range(x.shape.rank - 1)), keepdims=True))

    def _clip(self, grads, variables, loss, norm):
        out, flags = [], []
        for g, v in zip(grads, variables):
            if self.is_exempt(v):
                out.append(g)
                continue
            w_norm = tf.maximum(self.unitwise_norm(v), self.eps)
            g_norm = self.unitwise_norm(g)
            max_norm = w_norm * self.clipping
            # 1e-6 floor only guards the division; where it matters (g_norm tiny) nothing is clipped.
            scale = tf.where(g_norm > max_norm, max_norm / tf.maximum(g_norm, 1e-6), tf.ones_like(g_norm))
            out.append(tf.cast(tf.cast(g, tf.float32) * scale, g.dtype))
            flags.append(tf.reduce_any(g_norm > max_norm))
        was = tf.reduce_any(tf.stack(flags)) if flags else tf.constant(False)
        return out, tf.constant(self.clipping), was


class ZClip(ClipStrategy):
    """`zclip` (Kumar et al. 2025): z-score clipping of the global norm against EMA statistics.

    After ``warmup_steps`` finite steps (whose norms initialise mean μ and variance σ²),
    z = (‖g‖ − μ) / σ; if z > z_thr the gradient is rescaled to norm μ + z_thr·σ. The statistics then
    follow an EMA with decay α over the *clipped* norm (so a spike does not inflate them):
    μ ← αμ + (1−α)‖g‖_c,  σ² ← ασ² + (1−α)(‖g‖_c − μ_old)².
    """

    strategy = "zclip"

    def __init__(self, z_threshold: float, alpha: float, warmup_steps: int = 25):
        super().__init__(name="zclip")
        self.z_threshold, self.alpha = float(z_threshold), float(alpha)
        self.warmup_steps = max(int(warmup_steps), 1)  # at least one observation initialises the mean
        self.mean = state_variable(0.0, "mean")
        self.var = state_variable(0.0, "var")
        self.count = state_variable(tf.constant(0, tf.int64), "count")
        self.sum = state_variable(0.0, "warmup_sum")
        self.sumsq = state_variable(0.0, "warmup_sumsq")

    def _clip(self, grads, variables, loss, norm):
        ok = tf.math.is_finite(norm) & tf.math.is_finite(loss)
        active = self.count >= self.warmup_steps  # statistics were initialised before this step
        std = tf.sqrt(tf.maximum(self.var, 0.0))
        threshold = self.mean + self.z_threshold * std
        z_exceeds = active & (norm > threshold)
        clipped, _ = _clip_global(grads, tf.where(z_exceeds, threshold, tf.constant(math.inf)), norm)
        norm_c = tf.where(z_exceeds, threshold, norm)

        # warmup: accumulate; the step that completes it initialises mean/var from the warmup norms.
        w_sum, w_sumsq = self.sum + norm, self.sumsq + norm * norm
        n = tf.cast(self.count + 1, tf.float32)
        init_mean = w_sum / n
        init_var = tf.maximum(w_sumsq / n - init_mean * init_mean, 0.0)
        ema_mean = self.alpha * self.mean + (1.0 - self.alpha) * norm_c
        ema_var = self.alpha * self.var + (1.0 - self.alpha) * tf.square(norm_c - self.mean)
        completes = (~active) & (self.count + 1 >= self.warmup_steps)
        new_mean = tf.where(active, ema_mean, tf.where(completes, init_mean, self.mean))
        new_var = tf.where(active, ema_var, tf.where(completes, init_var, self.var))
        self.mean.assign(tf.where(ok, new_mean, self.mean))
        self.var.assign(tf.where(ok, new_var, self.var))
        self.sum.assign(tf.where(ok & ~active, w_sum, self.sum))
        self.sumsq.assign(tf.where(ok & ~active, w_sumsq, self.sumsq))
        self.count.assign_add(tf.cast(ok, tf.int64))
        return clipped, tf.where(active, threshold, tf.constant(math.inf)), z_exceeds


def build_clipper(cfg: ClipConfig, exempt: Sequence[str] = ()) -> ClipStrategy:
    """The clipper selected by ``cfg.strategy``.

    ``exempt``: variable paths (or path substrings) AGC must leave alone, usually
    ``model.agc_exempt_variables()`` paths; ``cfg.agc_exempt`` substrings are added to them.
    Build it inside ``strategy.scope()`` when training distributed (it may own variables).
    """
    s = cfg.strategy
    if s == "none":
        return NoClip(name="no_clip")
    if s == "global_norm":
        return GlobalNormClip(cfg.clip_norm)
    if s == "value":
        return ValueClip(cfg.clip_value)
    if s == "norm":
        return NormClip(cfg.clip_norm)
    if s == "loss_adaptive":
        return LossAdaptiveClip(cfg.base, cfg.slope, cfg.cap, cfg.inverse)
    if s == "autoclip":
        return AutoClip(cfg.percentile, cfg.history, cfg.warmup_steps)
    if s == "agc":
        return AGC(cfg.agc_lambda, cfg.agc_eps, exempt=[*exempt, *cfg.agc_exempt])
    if s == "zclip":
        return ZClip(cfg.z_threshold, cfg.ema_alpha, cfg.warmup_steps)
    raise ValueError(f"unknown clipping strategy {s!r}")
