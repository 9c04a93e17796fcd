"""Cache keys follow file content (size + mtime), config sections and the code a stage runs — not path
strings, not the package version."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import pipeline
from flows import caching
from flows.caching import fingerprint, module_closure, stage_code, stage_key
from pipeline.config import Config

PIPELINE_DIR = Path(pipeline.__file__).resolve().parent


def _touch_later(path: Path, seconds: int = 5) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 1_000_000_000))


def test_key_changes_when_an_input_file_is_replaced_under_the_same_path(tmp_path):
    scene = tmp_path / "scene.tif"
    scene.write_bytes(b"x" * 10)
    cfg = Config()
    first = stage_key("tile", cfg, ["tiling"], {"image": scene}, tmp_path / "out")
    assert stage_key("tile", cfg, ["tiling"], {"image": scene}, tmp_path / "out") == first
    scene.write_bytes(b"y" * 10)  # same size: the mtime must give it away
    _touch_later(scene)
    assert stage_key("tile", cfg, ["tiling"], {"image": scene}, tmp_path / "out") != first


def test_key_follows_only_the_stage_config_sections(tmp_path):
    base = Config()
    key = stage_key("train", base, ["train"], {}, tmp_path)
    assert stage_key("train", base.model_copy(update={"predict": base.predict.model_copy(update={"overlap": 1})}),
                     ["train"], {}, tmp_path) == key
    changed = base.model_copy(update={"train": base.train.model_copy(update={"steps": 7})})
    assert stage_key("train", changed, ["train"], {}, tmp_path) != key
    assert stage_key("train", base, ["train"], {}, tmp_path / "elsewhere") != key


def test_folder_fingerprint_ignores_dataset_json_and_hidden_temp_files(tmp_path):
    (tmp_path / "manifest.jsonl").write_text("{}\n")
    before = fingerprint(tmp_path)
    (tmp_path / "dataset.json").write_text("{}")  # written by build_dataset into the tiles it reads
    (tmp_path / ".stats.json.123.tmp").write_text("partial")
    assert fingerprint(tmp_path) == before
    (tmp_path / "train-00000-of-00001.tfrecord").write_bytes(b"r")
    assert fingerprint(tmp_path) != before


def test_remote_and_missing_inputs_have_stable_fingerprints(tmp_path):
    assert fingerprint("s3://bucket/scene.tif") == ["s3://bucket/scene.tif"]
    assert fingerprint(tmp_path / "nope.tif") == [str(tmp_path / "nope.tif"), "missing"]


# ------------------------------------------------------------------------------------------------ code
@pytest.fixture
def upgraded(monkeypatch: pytest.MonkeyPatch):
    """Pretend the installed source of some modules changed (as after `pip install` of new code)."""
    changed: set[str] = set()
    real = caching._read_source

    def read(path: Path) -> bytes:
        rel = path.relative_to(PIPELINE_DIR).as_posix() if path.is_relative_to(PIPELINE_DIR) else str(path)
        return real(path) + (b"\n# upgraded\n" if rel in changed else b"")

    monkeypatch.setattr(caching, "_read_source", read)
    caching.code_fingerprint.cache_clear()
    yield changed
    caching.code_fingerprint.cache_clear()


def test_stage_closures_follow_imports_including_ones_inside_functions():
    closure = {st: set(module_closure(mods, PIPELINE_DIR)) for st, mods in caching.STAGE_MODULES.items()}
    assert {"pipeline.geo.scene", "pipeline.geo.plan", "pipeline.config", "pipeline"} <= closure["tile-scene"]
    assert "pipeline.train.run" not in closure["tile-scene"]
    assert {"pipeline.train.run", "pipeline.train.fit", "pipeline.model.detector", "pipeline.train.clipping"} <= closure["train"]
    assert "pipeline.geo.scene" not in closure["train"]
    assert {"pipeline.predict.scene", "pipeline.evaluate.metrics"} <= closure["evaluate"]


def test_closure_of_a_synthetic_package(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import os\nfrom pkg.sub import b\n\ndef f():\n    from .c import g\n    return g\n")
    (pkg / "sub" / "b.py").write_text("from ..d import VALUE\n")
    (pkg / "c.py").write_text("def g():\n    return 1\n")
    (pkg / "d.py").write_text("VALUE = 1\n")
    (pkg / "unrelated.py").write_text("")
    assert sorted(module_closure(["pkg.a"], pkg, package="pkg")) == [
        "pkg", "pkg.a", "pkg.c", "pkg.d", "pkg.sub", "pkg.sub.b"]


def test_a_code_upgrade_changes_the_keys_of_the_stages_that_run_it_only(tmp_path, upgraded):
    cfg = Config()
    before = {st: stage_key(st, cfg, ["train"], {}, tmp_path) for st in caching.STAGE_MODULES}
    upgraded.add("train/fit.py")
    caching.code_fingerprint.cache_clear()
    after = {st: stage_key(st, cfg, ["train"], {}, tmp_path) for st in caching.STAGE_MODULES}
    assert {st for st in before if before[st] != after[st]} == {"train"}
    upgraded.add("__init__.py")  # the package itself: every stage imports it
    caching.code_fingerprint.cache_clear()
    assert all(stage_key(st, cfg, ["train"], {}, tmp_path) != after[st] for st in caching.STAGE_MODULES)


def test_the_task_function_source_is_part_of_the_code_key():
    from flows.training import evaluate, train

    assert stage_code("train", train) != stage_code("train", evaluate)
    assert stage_code("train", train) == stage_code("train", train)


def test_a_change_to_the_row_block_code_re_runs_the_row_block_stages_only(tmp_path, upgraded):
    cfg = Config()
    before = {st: stage_key(st, cfg, ["tiling"], {}, tmp_path) for st in caching.STAGE_MODULES}
    upgraded.add("geo/blocks.py")
    caching.code_fingerprint.cache_clear()
    after = {st: stage_key(st, cfg, ["tiling"], {}, tmp_path) for st in caching.STAGE_MODULES}
    assert {st for st in before if before[st] != after[st]} == {"tile-row-block", "merge-row-blocks"}
    upgraded.add("geo/scene.py")  # the blocks cut tiles with tile_scene: its code is theirs too
    caching.code_fingerprint.cache_clear()
    changed = {st for st in after if stage_key(st, cfg, ["tiling"], {}, tmp_path) != after[st]}
    assert changed == {"tile-scene", "tile-row-block", "merge-row-blocks"}  # finalize: through its inputs
    upgraded.add("geo/shards.py")  # the manifest lines every tiling stage writes or renames
    caching.code_fingerprint.cache_clear()
    changed = {st for st in after if stage_key(st, cfg, ["tiling"], {}, tmp_path) != after[st]}
    assert changed == {"tile-scene", "finalize-tiling", "tile-row-block", "merge-row-blocks"}
