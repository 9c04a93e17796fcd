"""Progress bars draw on stderr: stdout stays clean for what a command prints (a benchmark's JSON, paths)."""

from pipeline.predict.progress import SceneProgressBars
from pipeline.study.plan import RunSpec
from pipeline.study.progress import StudyProgress
from pipeline.train.progress import TrainProgressBar


def test_train_bar_writes_to_stderr_only(capsys):
    bar = TrainProgressBar(total=10, start=0, enabled=True)
    bar.update(5, {"loss": 0.5, "images_per_s": 2.0, "clip_fraction_total": 0.1})
    bar.close()
    out = capsys.readouterr()
    assert out.out == ""
    assert "train" in out.err and "5/10" in out.err


def test_scene_bars_write_to_stderr_only(capsys):
    with SceneProgressBars(True) as bar:
        update = bar("scene-a")
        update(3, 4, 1e6)
    out = capsys.readouterr()
    assert out.out == ""
    assert "scene-a" in out.err and "3/4" in out.err


def test_study_bars_and_run_lines_write_to_stderr_only(capsys):
    spec = RunSpec(strategy="global_norm", lr=0.1, seed=0)
    with StudyProgress(steps=4) as progress:
        progress("end", spec, {"status": "ok"})
    out = capsys.readouterr()
    assert out.out == ""
    assert f"{spec.run_id}: ok" in out.err

