"""The house rules that a reader relies on: the README's layout names every module, and no function in
pipeline/ or flows/ grows past 60 lines (split it into named steps instead)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "flows")
MAX_FUNCTION_LINES = 60


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if p.name != "__init__.py")


def _layout() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Project layout")
    fence = readme.index("```", start)
    return readme[fence: readme.index("```", fence + 3)]


def _folder_lines(layout: str, folder: str) -> list[str]:
    """The lines indented under the layout line that names `folder` (e.g. "geo/")."""
    lines = layout.splitlines()
    for i, line in enumerate(lines):
        if line.split() and line.split()[0] == folder:
            indent = len(line) - len(line.lstrip())
            rest = []
            for below in lines[i + 1:]:
                if len(below) - len(below.lstrip()) <= indent:
                    break
                rest.append(below.strip())
            return rest
    return []


def test_readme_layout_lists_every_module_under_its_folder():
    layout = _layout()
    assert len(_modules()) > 40
    missing = []
    for path in _modules():
        listed = {line.split()[0] for line in _folder_lines(layout, path.parent.name + "/") if line}
        if path.name not in listed:
            missing.append(str(path.relative_to(ROOT)))
    assert not missing, f"README.md 'Project layout' lacks a line for: {', '.join(missing)}"


def test_no_function_over_60_lines():
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([d.lineno for d in node.decorator_list] + [node.lineno])
                if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - start + 1} lines)")
    assert not long, "split into named steps: " + "; ".join(long)
