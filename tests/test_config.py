"""Config loading: YAML + overrides, relative paths, unknown keys with suggestions, resolved config."""

from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_config, save_config


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg" / "c.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_fill_every_section(tmp_path):
    cfg = load_config(_write(tmp_path, "name: x\n"))
    assert cfg.name == "x"
    assert cfg.tiling.tile_size == 400 and cfg.tiling.split.method == "block"
    assert cfg.run_dir == Path("runs") / "x"


def test_scene_paths_are_relative_to_the_config_file(tmp_path):
    cfg = load_config(_write(tmp_path, "tiling:\n  scenes:\n    - {image: a.tif, labels: ../l/a.geojson}\n"))
    scene = cfg.tiling.scenes[0]
    assert scene.image == tmp_path / "cfg" / "a.tif"
    assert scene.labels == tmp_path / "cfg" / "../l/a.geojson"


def test_overrides_are_parsed_as_yaml_values(tmp_path):
    cfg = load_config(_write(tmp_path, "tiling:\n  tile_size: 256\n"),
                      ["tiling.tile_size=128", "tiling.split.method=scene", "classes=[car, truck]",
                       "tiling.bands=[3,2,1]"])
    assert cfg.tiling.tile_size == 128
    assert cfg.tiling.split.method == "scene"
    assert cfg.classes == ["car", "truck"]
    assert cfg.tiling.bands == [3, 2, 1]


def test_unknown_key_names_it_and_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'tiling.tile_sise'; did you mean 'tile_size'\?"):
        load_config(_write(tmp_path, "tiling:\n  tile_sise: 256\n"))


def test_unknown_key_in_an_override(tmp_path):
    with pytest.raises(ConfigError, match=r"'tiling.split.blok_size'; did you mean 'block_size'"):
        load_config(_write(tmp_path, ""), ["tiling.split.blok_size=5"])


def test_tile_size_not_above_overlap_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"tiling.overlap \(64\) must be smaller than tiling.tile_size \(64\)"):
        load_config(_write(tmp_path, "tiling:\n  tile_size: 64\n  overlap: 64\n"))


@pytest.mark.parametrize("pct", ["[-5, 50]", "[1, 105]", "[99, 1]"])
def test_stats_percentiles_out_of_order_or_range_are_refused(tmp_path, pct):
    with pytest.raises(ConfigError, match=r"tiling.stats_percentiles .* must be low <= high, both in 0..100"):
        load_config(_write(tmp_path, f"tiling:\n  stats_percentiles: {pct}\n"))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(_write(tmp_path, ""), ["tiling.tile_size"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(_write(tmp_path, "name: r\ntiling:\n  scenes:\n    - {image: a.tif}\n"), ["seed=5"])
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    data = yaml.safe_load(path.read_text())
    assert data["seed"] == 5 and data["tiling"]["overlap"] == 32  # defaults written out
    again = load_config(path)
    assert again.model_dump() == cfg.model_dump()


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_its_augmentation_builds(path):
    from pipeline.data.augment import build_augmenter

    cfg = load_config(path)
    for scene in cfg.tiling.scenes:
        # bundled data must be there; data/synthetic/ is what `satdet synth data/synthetic` writes
        assert Path(scene.image).exists() or "synthetic" in Path(scene.image).parts, scene.image
    stats = {"dtype": "uint8", "channels": 3, "bands": [1, 2, 3], "tile_size": cfg.tiling.tile_size,
             "low": [0.0] * 3, "high": [255.0] * 3, "mean": [100.0] * 3, "std": [50.0] * 3}
    assert (build_augmenter(cfg, stats) is None) == (not cfg.data.augment)
