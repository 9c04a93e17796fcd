"""Progress of scene inference: a rich bar per scene (windows done/total, Mpx/s)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

WindowProgress = Callable[[int, int, float], None]  # (windows done, windows total, scene pixels done)


class SceneProgressBars:
    """Rich progress (windows done/total, Mpx/s) per scene; a no-op when disabled.

    `with SceneProgressBars(True) as bar:` gives `bar(scene_name)`, the WindowProgress callback of a new
    bar for that scene (None when disabled).
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None

    def __enter__(self) -> Callable[[str], WindowProgress | None]:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("windows  {task.fields[mpx]:.2f} Mpx/s"), TimeElapsedColumn(),
                                      console=Console(stderr=True))
            self._progress.start()
        return self._make

    def _make(self, name: str) -> WindowProgress | None:
        if self._progress is None:
            return None
        task = self._progress.add_task(name, total=None, mpx=0.0)
        start = time.perf_counter()

        def update(done: int, total: int, pixels: float) -> None:
            rate = pixels / 1e6 / max(time.perf_counter() - start, 1e-9)
            self._progress.update(task, completed=done, total=total, mpx=rate)

        return update

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
