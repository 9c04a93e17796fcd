"""Each stage's cache key covers every config value its code reads.

A stage is handed the whole Config, so its code *could* read any section; the contract is that it reads
only what flows/caching.STAGE_SECTIONS declares for it (a section, or one field of another section as
"section.field"), because that is what its cache key hashes. This test reads the source of every module
the stage can run (the same import closure its code fingerprint uses) and finds each `config.<section>`
and `config.<section>.<field>` read, so a new read of an undeclared section fails here, naming the
module and line, instead of letting a cached stage serve a result computed under other settings.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pipeline
from flows.caching import STAGE_MODULES, STAGE_SECTIONS, module_closure, stage_key
from pipeline.config import Config

SECTIONS = {name for name, field in Config.model_fields.items() if isinstance(field.default_factory, type)}
CONFIG_NAMES = {"config", "cfg"}  # what the pipeline calls a Config


def _config_reads(path: Path) -> list[tuple[str, int]]:
    """("section" or "section.field", line) for every read of a config section in one source file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    reads = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr in SECTIONS):
            continue
        base = node.value
        base_name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", None)
        if base_name not in CONFIG_NAMES:
            continue
        parent = parents.get(node)
        field = parent.attr if isinstance(parent, ast.Attribute) and parent.value is node else None
        reads.append((f"{node.attr}.{field}" if field else node.attr, node.lineno))
    return reads


def _covered(read: str, declared: tuple[str, ...]) -> bool:
    return read in declared or read.split(".")[0] in declared


def test_sections_match_the_config():
    assert SECTIONS == {"tiling", "data", "model", "train", "evaluate", "predict"}
    for stage, declared in STAGE_SECTIONS.items():
        for entry in declared:
            section, _, field = entry.partition(".")
            assert section in SECTIONS, f"{stage}: {entry}"
            assert not field or field in type(getattr(Config(), section)).model_fields, f"{stage}: {entry}"


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_stage_reads_only_what_its_cache_key_covers(stage):
    declared = STAGE_SECTIONS[stage]
    closure = module_closure(STAGE_MODULES[stage], Path(pipeline.__file__).parent)
    assert closure, stage
    undeclared = [f"{name}:{line} reads config.{read}"
                  for name, path in sorted(closure.items()) for read, line in _config_reads(path)
                  if not _covered(read, declared)]
    assert not undeclared, f"stage {stage!r} declares {declared} in STAGE_SECTIONS but " + "; ".join(undeclared)


def test_scanner_sees_section_and_field_reads(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f(config, self):\n    a = config.train.steps\n    b = self.config.evaluate\n"
                   "    c = cfg_like.model\n    return config.tiling.split.method\n")
    assert sorted(_config_reads(src)) == [("evaluate", 3), ("tiling.split", 5), ("train.steps", 2)]


def test_a_declared_field_is_in_the_key_and_an_undeclared_one_is_not():
    base = Config()
    changed_declared = base.model_copy(update={"evaluate": base.evaluate.model_copy(update={"max_dets": 7})})
    changed_other = base.model_copy(update={"evaluate": base.evaluate.model_copy(update={"split": "test"})})
    key = lambda c: stage_key("train", c, STAGE_SECTIONS["train"], {}, "/tmp/out", code="x")
    assert "evaluate.max_dets" in STAGE_SECTIONS["train"]
    assert key(changed_declared) != key(base)
    assert key(changed_other) == key(base)
