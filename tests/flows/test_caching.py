"""Cache keys follow file content (size + mtime), config sections and code version — not path strings."""

from __future__ import annotations

import os
from pathlib import Path

from flows.caching import fingerprint, stage_key
from pipeline.config import Config


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
