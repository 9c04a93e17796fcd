"""Content-based cache keys for the pipeline's Prefect tasks.

Prefect's default INPUTS policy hashes a path *string*, so a changed file behind the same path would be
served from cache. Our keys fingerprint the files themselves (size + mtime of every file under a path),
plus the JSON of the config sections the stage reads, plus the *code* the stage runs: change any of them
and the stage re-runs; change none and it is skipped. Outputs are written atomically, so a re-run stage
gives its outputs new mtimes and every downstream key changes with it.

The code part is a hash of the installed source of the stage's `pipeline` modules and of every
`pipeline` module they import, directly or inside functions (found by parsing the source, not by
importing it), plus the source of the Prefect task function itself. Upgrading satdet therefore re-runs
the stages whose code changed (and, through their new outputs, the stages after them), even when the
package version stayed the same; a change to, say, the trainer leaves the tiles cached.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pipeline
from pipeline.config import Config

# The `pipeline` modules each stage calls into (the import closure of these is what the stage runs).
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "tile-scene": ("pipeline.geo.scene",),
    "tile-row-block": ("pipeline.geo.blocks",),
    "merge-row-blocks": ("pipeline.geo.blocks",),
    "finalize-tiling": ("pipeline.geo.finalize",),
    "build-dataset": ("pipeline.data.check",),
    "train": ("pipeline.train.run",),
    "evaluate": ("pipeline.evaluate.run",),
    "predict-scenes": ("pipeline.predict.scene", "pipeline.predict.adapt", "pipeline.predict.vectors"),
}

# The config each stage reads: a whole section, or one field of another section as "section.field". Its
# cache key hashes exactly these (plus `classes` and `seed`); tests/flows/test_stage_sections.py reads the
# stage's code and fails on any read of a section declared nowhere here.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "tile-scene": ("tiling",),
    "tile-row-block": ("tiling",),
    "merge-row-blocks": ("tiling",),
    "finalize-tiling": ("tiling",),
    "build-dataset": ("data", "tiling", "train.eval_every", "train.early_stopping_patience", "evaluate.split"),
    "train": ("data", "model", "train", "tiling", "evaluate.max_dets",
              "predict"),  # test-time settings stored with the export; the threshold calibrated with them
    "evaluate": ("evaluate", "predict", "tiling", "data"),
    "predict-scenes": ("predict",),
}

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


# ------------------------------------------------------------------------------------------------ code
PACKAGE = "pipeline"


def _module_file(name: str, root: Path) -> Path | None:
    """The source file of module `name` (dotted, starting with the package name) under package `root`."""
    parts = name.split(".")[1:]
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(name: str, path: Path, package: str) -> set[str]:
    """Modules of `package` that the source of module `name` imports anywhere (top level or in functions)."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = here[: len(here) - (node.level - 1)]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                base = node.module or ""
            found.add(base)
            # `from pipeline.geo import plan` imports the submodule pipeline.geo.plan
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m == package or m.startswith(package + ".")}


def module_closure(roots: Iterable[str], root_dir: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of `package` (under `root_dir`) that importing the `roots` can run: their static
    import closure, including the parent packages' __init__ files, as {module name: source file}."""
    todo = list(roots)
    seen: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name, root_dir)
        if path is None:  # an attribute imported with `from x import name`, not a module
            continue
        seen[name] = path
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        todo += parents + sorted(_imports(name, path, package))
    return seen


def _read_source(path: Path) -> bytes:
    return path.read_bytes()


@functools.lru_cache(maxsize=64)
def code_fingerprint(roots: tuple[str, ...]) -> str:
    """Hash of the installed source of the `roots` modules and their `pipeline` import closure."""
    root_dir = Path(pipeline.__file__).resolve().parent
    digest = hashlib.sha256()
    for name, path in sorted(module_closure(roots, root_dir).items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(_read_source(path)).digest())
    return digest.hexdigest()[:32]


def task_source(task: Any) -> str:
    """Hash of a Prefect task's function source ('' when it cannot be read)."""
    fn = getattr(task, "fn", None)
    try:
        return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16] if fn else ""
    except (OSError, TypeError):
        return ""


def stage_code(stage: str, task: Any = None) -> str:
    """The code part of a stage's cache key: its pipeline modules' closure plus the task function."""
    return f"{code_fingerprint(STAGE_MODULES.get(stage, ()))}:{task_source(task)}"


# ------------------------------------------------------------------------------------------------ keys
def stage_key(
    stage: str,
    config: Config,
    sections: Iterable[str],
    inputs: dict[str, Any],
    output: str | Path,
    code: str | None = None,
) -> str:
    """Hash of what determines a stage's result: code, config sections, input files, output place.

    `code` defaults to the fingerprint of the stage's `pipeline` modules (STAGE_MODULES)."""
    payload = {
        "stage": stage,
        "version": pipeline.__version__,
        "code": stage_code(stage) if code is None else code,
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
    stage: str, inputs: Callable[[dict[str, Any]], dict[str, Any]], output: str
) -> Callable[[Any, dict[str, Any]], str]:
    """A Prefect `cache_key_fn` for a task whose parameters include `config` and the named output path.

    `inputs(parameters)` picks the paths (or plain values) whose content decides the result; the config
    part is the stage's STAGE_SECTIONS.
    """
    sections = STAGE_SECTIONS[stage]

    def _key(context: Any, parameters: dict[str, Any]) -> str:
        code = stage_code(stage, getattr(context, "task", None))
        return stage_key(stage, parameters["config"], sections, inputs(parameters), parameters[output], code)

    _key.__name__ = f"{stage}_cache_key"
    return _key
