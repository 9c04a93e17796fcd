"""Each clipping strategy against its formula on hand-made gradients."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from pipeline.config import ClipConfig
from pipeline.train.clipping import AGC, AutoClip, LossAdaptiveClip, ZClip, build_clipper


def _vars(*shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [tf.Variable(rng.normal(size=s).astype(np.float32), name=f"v{i}") for i, s in enumerate(shapes)]


def _grads(*arrays):
    return [tf.constant(np.asarray(a, np.float32)) for a in arrays]


G = _grads([3.0, 4.0], [[0.0, 12.0]])  # global norm 13
V = _vars((2,), (1, 2))
LOSS = tf.constant(1.0)


def test_none_passes_gradients_through_and_measures_norm():
    out, st = build_clipper(ClipConfig(strategy="none"))(G, V, LOSS)
    for a, b in zip(out, G):
        np.testing.assert_array_equal(a, b)
    assert float(st.norm_before) == pytest.approx(13.0)
    assert float(st.norm_after) == pytest.approx(13.0)
    assert not bool(st.clipped)


def test_global_norm_matches_tf_clip_by_global_norm():
    out, st = build_clipper(ClipConfig(strategy="global_norm", clip_norm=6.5))(G, V, LOSS)
    ref, _ = tf.clip_by_global_norm(G, 6.5)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(out[0], [1.5, 2.0], rtol=1e-6)  # scaled by 6.5/13
    assert float(st.norm_after) == pytest.approx(6.5)
    assert bool(st.clipped)


def test_global_norm_below_threshold_is_untouched():
    out, st = build_clipper(ClipConfig(strategy="global_norm", clip_norm=20.0))(G, V, LOSS)
    np.testing.assert_array_equal(out[1], G[1])
    assert not bool(st.clipped)


def test_value_clips_each_element():
    out, st = build_clipper(ClipConfig(strategy="value", clip_value=3.5))(G, V, LOSS)
    np.testing.assert_array_equal(out[0], [3.0, 3.5])
    np.testing.assert_array_equal(out[1], [[0.0, 3.5]])
    assert bool(st.clipped)
    assert float(st.norm_after) == pytest.approx(np.sqrt(9 + 3.5**2 + 3.5**2))


def test_norm_clips_each_tensor_separately():
    out, st = build_clipper(ClipConfig(strategy="norm", clip_norm=6.0))(G, V, LOSS)
    np.testing.assert_allclose(out[0], [3.0, 4.0])  # norm 5 < 6: unchanged
    np.testing.assert_allclose(out[1], [[0.0, 6.0]], rtol=1e-6)  # norm 12 → 6
    assert bool(st.clipped)


@pytest.mark.parametrize(
    "loss, expected", [(0.5, 1.0 + 2.0 * 0.5), (3.0, 1.0 + 2.0 * 3.0), (100.0, 1.0 + 2.0 * 4.0)]
)
def test_loss_adaptive_threshold_loosens_with_loss(loss, expected):
    clip = build_clipper(ClipConfig(strategy="loss_adaptive", base=1.0, slope=2.0, cap=4.0))
    _out, st = clip(G, V, tf.constant(loss))
    assert float(st.threshold) == pytest.approx(expected)
    assert float(st.norm_after) == pytest.approx(min(13.0, expected), rel=1e-6)


def test_loss_adaptive_inverse_tightens_with_loss():
    clip = LossAdaptiveClip(base=1.0, slope=8.0, cap=4.0, inverse=True)
    low = float(clip.threshold(tf.constant(0.0)))
    high = float(clip.threshold(tf.constant(3.0)))
    assert low == pytest.approx(9.0) and high == pytest.approx(1.0 + 8.0 / 4.0)
    _, st = clip(G, V, tf.constant(3.0))
    assert float(st.norm_after) == pytest.approx(3.0, rel=1e-6)


def test_autoclip_uses_percentile_of_history_including_current_norm():
    clip = AutoClip(percentile=25.0, history=4, warmup_steps=0)
    norms = [2.0, 8.0, 4.0, 6.0, 10.0, 1.0]
    seen: list[float] = []
    for n in norms:
        g = [tf.constant([n, 0.0])]
        _out, st = clip(g, [tf.Variable([1.0, 1.0])], LOSS)
        seen = (seen + [n])[-4:]  # ring buffer of the last 4
        expected = float(np.percentile(seen, 25.0))
        assert float(st.threshold) == pytest.approx(expected, rel=1e-6)
        assert float(st.norm_after) == pytest.approx(min(n, expected), rel=1e-6)
        assert bool(st.clipped) == (n > expected)


def test_autoclip_ignores_non_finite_norms_and_waits_for_warmup():
    clip = AutoClip(percentile=50.0, history=8, warmup_steps=2)
    v = [tf.Variable([1.0])]
    _, st = clip([tf.constant([4.0])], v, LOSS)
    assert not bool(st.clipped) and np.isinf(float(st.threshold))
    clip([tf.constant([np.nan])], v, LOSS)  # a skipped step must not enter the history
    assert int(clip.count.numpy()) == 1
    clip([tf.constant([2.0])], v, LOSS)
    _, st = clip([tf.constant([9.0])], v, LOSS)  # history {4, 2, 9}: median 4
    assert float(st.threshold) == pytest.approx(4.0)
    assert bool(st.clipped)


def test_agc_is_unitwise_over_last_axis_of_dense_and_conv_kernels():
    rng = np.random.default_rng(1)
    dense_w = tf.Variable(rng.normal(size=(5, 3)).astype(np.float32), name="dense/kernel")
    conv_w = tf.Variable(rng.normal(size=(3, 3, 2, 4)).astype(np.float32), name="conv/kernel")
    bias = tf.Variable(np.array([0.5, -0.5], np.float32), name="dense/bias")
    dense_g = rng.normal(size=(5, 3)).astype(np.float32) * 0.001
    dense_g[:, 1] *= 1e4  # only unit 1 is too large
    conv_g = rng.normal(size=(3, 3, 2, 4)).astype(np.float32) * 0.001
    conv_g[..., 2] *= 1e5  # only output channel 2 is too large
    bias_g = np.array([3.0, 4.0], np.float32)
    lam, eps = 0.05, 1e-3
    clip = AGC(lam, eps)
    out, st = clip(_grads(dense_g, conv_g, bias_g), [dense_w, conv_w, bias], LOSS)

    def ref(g, w, axes):
        wn = np.maximum(np.sqrt((w**2).sum(axis=axes, keepdims=True)), eps)
        gn = np.sqrt((g**2).sum(axis=axes, keepdims=True))
        return np.where(gn > lam * wn, g * lam * wn / gn, g)

    np.testing.assert_allclose(out[0], ref(dense_g, dense_w.numpy(), (0,)), rtol=1e-5)
    np.testing.assert_allclose(out[1], ref(conv_g, conv_w.numpy(), (0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(out[2], ref(bias_g, bias.numpy(), None), rtol=1e-5)  # whole-vector norm
    # untouched units stay bit-identical
    np.testing.assert_array_equal(out[0].numpy()[:, [0, 2]], dense_g[:, [0, 2]])
    np.testing.assert_array_equal(out[1].numpy()[..., [0, 1, 3]], conv_g[..., [0, 1, 3]])
    assert not np.allclose(out[0].numpy()[:, 1], dense_g[:, 1])
    assert bool(st.clipped)


def test_agc_exempts_the_final_classifier_by_path():
    w = tf.Variable(np.ones((2, 2), np.float32), name="cls_score/kernel")
    g = _grads(np.full((2, 2), 100.0))
    clip = build_clipper(ClipConfig(strategy="agc", agc_lambda=0.01, agc_exempt=["cls_score"]))
    out, st = clip(g, [w], LOSS)
    np.testing.assert_array_equal(out[0], g[0])
    assert not bool(st.clipped)


def test_zclip_initialises_from_warmup_then_clips_to_mean_plus_z_std():
    z, alpha = 2.0, 0.9
    clip = ZClip(z_threshold=z, alpha=alpha, warmup_steps=3)
    v = [tf.Variable([1.0])]
    for n in [1.0, 2.0, 3.0]:
        _, st = clip([tf.constant([n])], v, LOSS)
        assert not bool(st.clipped)
    mean, var = 2.0, np.var([1.0, 2.0, 3.0])
    assert float(clip.mean.numpy()) == pytest.approx(mean) and float(clip.var.numpy()) == pytest.approx(var)
    # a spike: clipped to mean + z·std, and the EMA is updated with the clipped norm
    thr = mean + z * np.sqrt(var)
    _out, st = clip([tf.constant([50.0])], v, LOSS)
    assert bool(st.clipped)
    assert float(st.norm_after) == pytest.approx(thr, rel=1e-5)
    assert float(clip.mean.numpy()) == pytest.approx(alpha * mean + (1 - alpha) * thr, rel=1e-5)
    assert float(clip.var.numpy()) == pytest.approx(alpha * var + (1 - alpha) * (thr - mean) ** 2, rel=1e-5)
    # an ordinary norm passes unclipped
    _, st = clip([tf.constant([2.1])], v, LOSS)
    assert not bool(st.clipped)


def test_stateful_clippers_checkpoint_and_restore(tmp_path):
    clip = build_clipper(ClipConfig(strategy="autoclip", history=4, warmup_steps=0))
    for n in [1.0, 5.0]:
        clip([tf.constant([n])], [tf.Variable([1.0])], LOSS)
    path = tf.train.Checkpoint(clip=clip).write(str(tmp_path / "c"))
    fresh = build_clipper(ClipConfig(strategy="autoclip", history=4, warmup_steps=0))
    tf.train.Checkpoint(clip=fresh).read(path).assert_consumed()
    np.testing.assert_array_equal(fresh.norms.numpy(), clip.norms.numpy())
    assert int(fresh.count.numpy()) == 2


@pytest.mark.parametrize(
    "strategy", ["none", "global_norm", "value", "norm", "loss_adaptive", "autoclip", "agc", "zclip"]
)
def test_every_strategy_runs_inside_tf_function(strategy):
    clip = build_clipper(ClipConfig(strategy=strategy, warmup_steps=0))
    variables = _vars((3, 2), (2,))

    @tf.function
    def step(scale):
        grads = [tf.ones_like(v) * scale for v in variables]
        return clip(grads, variables, tf.constant(2.0))

    for scale in (1.0, 1000.0):
        out, st = step(tf.constant(scale))
        assert all(np.isfinite(g.numpy()).all() for g in out)
        assert float(st.norm_after) <= float(st.norm_before) + 1e-4
