"""Content-based cache keys for the pipeline's Prefect tasks.

Prefect's default INPUTS policy hashes a path *string*, so a changed file behind the same path would be
served from cache. Our keys fingerprint the files themselves (size + mtime of every file under a path),
plus the JSON of the config sections the stage reads, plus the code version: change any of them and the
stage re-runs; change none and it is skipped. Outputs are written atomically, so a re-run stage gives its
outputs new mtimes and every downstream key changes with it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pipeline
from pipeline.config import Config

# Files a stage adds next to its inputs and that must not count as input changes (build_dataset writes
# dataset.json into the tiles folder it reads).
IGNORED_NAMES = frozenset({"dataset.json"})


def fingerprint(path: str | Path, ignore: Iterable[str] = IGNORED_NAMES) -> list[Any]:
    """(relative path, size, mtime_ns) of every file under `path` (or of `path` itself).

    Remote inputs (s3://, https://, /vsi...) cannot be stat'ed cheaply: their URL stands for them, so a
    remote scene replaced in place needs `--force`. Hidden files (atomic-write temps) are skipped.
    """
    text = str(path)
    if "://" in text or text.startswith("/vsi"):
        return [text]
    root = Path(path)
    if not root.exists():
        return [text, "missing"]
    if root.is_file():
        st = root.stat()
        return [root.name, st.st_size, st.st_mtime_ns]
    ignored = set(ignore)
    entries: list[Any] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or name in ignored:
                continue
            full = Path(dirpath) / name
            st = full.stat()
            entries.append([full.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns])
    return entries


def stage_key(stage: str, config: Config, sections: Iterable[str], inputs: dict[str, Any], output: str | Path) -> str:
    """Hash of what determines a stage's result: code version, config sections, input files, output place."""
    payload = {
        "stage": stage,
        "version": pipeline.__version__,
        # The top-level fields every stage may depend on (label ids come from `classes`).
        "classes": config.classes,
        "seed": config.seed,
        "config": {name: config.section_dump(name) for name in sorted(sections)},
        "inputs": {str(name): fingerprint(p) if isinstance(p, (str, Path)) else p for name, p in inputs.items()},
        "output": str(Path(output).resolve()),
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return f"satdet-{stage}-{hashlib.sha256(blob).hexdigest()[:32]}"


def config_digest(config: Config, sections: Iterable[str]) -> str:
    """Short hash of some config sections (plus classes and seed): names work folders per configuration."""
    payload = {"classes": config.classes, "seed": config.seed,
               "config": {name: config.section_dump(name) for name in sorted(sections)}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def key_fn(
    stage: str, sections: Iterable[str], inputs: Callable[[dict[str, Any]], dict[str, Any]], output: str
) -> Callable[[Any, dict[str, Any]], str]:
    """A Prefect `cache_key_fn` for a task whose parameters include `config` and the named output path.

    `inputs(parameters)` picks the paths (or plain values) whose content decides the result.
    """
    sections = tuple(sections)

    def _key(_context: Any, parameters: dict[str, Any]) -> str:
        return stage_key(stage, parameters["config"], sections, inputs(parameters), parameters[output])

    _key.__name__ = f"{stage}_cache_key"
    return _key
