"""The per-run numbers of the study, on hand-made telemetry (no training)."""

from __future__ import annotations

import math

import pytest

from pipeline.errors import SatdetError
from pipeline.study import metrics as m
from pipeline.study.plan import StudyPlan


def _series(losses, norms=None):
    norms = norms or [1.0] * len(losses)
    records = [{"step": i + 1, "loss": x, "grad_norm_before": g, "grad_norm_after": g}
               for i, (x, g) in enumerate(zip(losses, norms))]
    records.insert(3, {"step": 3, "val_ap50": 0.5})  # validation lines carry no loss and are ignored
    return m.series(records)


def test_steps_to_target_uses_the_trailing_mean_and_counts_optimizer_steps():
    s = _series([2.0, 2.0, 1.0, 0.4, 1.6, 0.4, 0.4])
    # trailing 2-step means: -, 2.0, 1.5, 0.7, 1.0, 1.0, 0.4 → first <= 0.8 at step 4
    assert m.steps_to_target(s, 0.8, window=2) == 4
    assert m.steps_to_target(s, 0.39, window=2) is None
    assert m.steps_to_target(s, math.nan, window=2) is None


def test_a_nan_inside_the_window_never_counts_as_reaching_the_target():
    s = _series([2.0, None, 0.1, 0.1])
    assert m.steps_to_target(s, 0.5, window=2) == 4
    assert m.first_nonfinite_step(s) == 2
    assert math.isnan(m.initial_loss(s, 2))


def test_reference_loss_is_the_median_of_finite_initial_losses():
    assert m.reference_loss([2.0, 1e9, 2.2, math.nan]) == 2.2


def test_final_loss_mean_and_standard_error_of_the_last_window():
    mean, sem = m.final_loss(_series([9.0, 1.0, 2.0, 3.0]), window=3)
    assert mean == pytest.approx(2.0) and sem == pytest.approx(1.0 / math.sqrt(3))
    assert math.isnan(m.final_loss(_series([1.0, 1.0, None]), window=3)[0])


def test_norm_percentiles_skip_non_finite_norms_and_the_first_steps():
    s = _series([1.0] * 5, norms=[100.0, 1.0, None, 3.0, 5.0])
    assert m.norm_percentiles(s, (50, 100)) == [4.0, 100.0]
    assert m.norm_percentiles(s, (50,), skip_fraction=0.2) == [3.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"strategies": ("none", "clipit")}, "unknown clipping strategy 'clipit'"),
     ({"lrs": (0.0,)}, "learning rates must be > 0"),
     ({"steps": 4}, "at least 10 steps"),
     ({"seeds": ()}, "at least one")],
)
def test_bad_plans_are_one_line_errors(kwargs, message):
    with pytest.raises(SatdetError, match=message):
        StudyPlan(**kwargs)


def test_the_plan_runs_every_combination_once():
    plan = StudyPlan(strategies=("none", "agc"), lrs=(0.02, 0.2), seeds=(0, 1))
    ids = [r.run_id for r in plan.runs()]
    assert len(ids) == len(set(ids)) == 8 and ids[0] == "none-lr0.02-s0" and ids[-1] == "agc-lr0.2-s1"


def test_peak_loss_catches_a_blow_up_that_recovered():
    s = _series([1.0, 1.0, 50.0, 70.0, 1.0, 1.0])
    assert m.peak_loss(s, window=2) == pytest.approx(60.0)
    assert m.blew_up(m.final_loss(s, 2)[0], 1.0) is False  # recovered: not 'unstable'
    assert m.blew_up(1.6, 1.0) and not m.blew_up(1.4, 1.0) and not m.blew_up(math.nan, 1.0)
