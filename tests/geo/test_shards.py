"""The shard writer (background writes, errors raised by close) and the manifest lines naming its parts."""

import json

import pytest

from pipeline.errors import SatdetError
from pipeline.geo import shards


def test_a_background_write_error_is_raised_by_the_shard_writer(tmp_path, monkeypatch):
    def fail(self, record):
        raise OSError("No space left on device")

    monkeypatch.setattr(shards.RecordWriter, "write", fail)
    writer = shards.ShardWriter(tmp_path, shard_size=10)
    assert writer.write("train", [b"record"]) == "train-00000.tfrecord"
    with pytest.raises(OSError, match="No space left"):
        writer.close()


def test_a_renamed_manifest_line_keeps_its_record_and_formatting():
    record = {"id": "s_0_0", "split": "train", "window": [0, 0, 64, 64], "transform": [0.3, 0.0, 500000.1, 0.0, -0.3,
              5000000.0], "crs": "EPSG:32633", "n_boxes": 2, "nodata_fraction": 0.015625}
    line = shards.manifest_line(record, "train-00003.tfrecord")
    renamed = shards.manifest_line(shards.manifest_record(line, "m.jsonl"), "train-00000-of-00004.tfrecord")
    assert renamed == json.dumps({**record, "shard": "train-00000-of-00004.tfrecord"})


@pytest.mark.parametrize("line", ['{"id": "s_0_0"}', '{"id": "s_0_0", "shard": "tr', "", "[1]"])
def test_a_manifest_line_without_its_shard_is_a_one_line_error(line):
    with pytest.raises(SatdetError, match=r"m.jsonl: a line lacks its shard"):
        shards.manifest_record(line, "m.jsonl")
