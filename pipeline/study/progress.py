"""Terminal progress for the study: a bar over runs and one over the current run's steps, the latter fed
by following the run's train_log.jsonl (the trainer writes one complete line per step in a study)."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from pipeline.study.plan import RunSpec


def last_record(log: Path) -> dict[str, Any] | None:
    """The last complete JSON line of a training log (None before the first one)."""
    try:
        with log.open("rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(fh.tell() - 4096, 0))
            lines = [ln for ln in fh.read().splitlines() if ln.strip()]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


class StudyProgress:
    """`on_event` callback for `run_study` drawing rich progress bars; prints one line per finished run."""

    def __init__(self, steps: int, every_s: float = 0.5):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.steps, self.every_s = steps, every_s
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=Console(stderr=True),
        )
        self.runs = self.bar.add_task("[bold]study", total=1, info="")
        self.run = self.bar.add_task("run", total=steps, info="")
        self._log: Path | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> Self:
        self.bar.start()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.bar.stop()

    def __call__(self, kind: str, spec: RunSpec, info: dict[str, Any]) -> None:
        if kind == "start":
            self.bar.update(self.runs, total=info["total"], completed=info["index"])
            self.bar.reset(self.run, total=self.steps, description=spec.run_id, info="")
            self._log = Path(info["log"])
            if info.get("stale"):
                self.bar.console.print(f"{spec.run_id}: config or tiles changed since its stored result: training again")
        elif kind == "end":
            self._log = None
            self.bar.advance(self.runs)
            self.bar.console.print(summary_line(spec, info))

    def _follow(self) -> None:
        while not self._stop.wait(self.every_s):
            log = self._log
            rec = last_record(log) if log is not None else None
            if rec and "step" in rec and self._log == log:
                loss = rec.get("loss")
                text = f"loss {loss:.3f}" if isinstance(loss, float) and math.isfinite(loss) else "loss nan"
                if isinstance(rec.get("clip_fraction_total"), float):
                    text += f"  clip {rec['clip_fraction_total']:.0%}"
                self.bar.update(self.run, completed=int(rec["step"]), info=text)


def summary_line(spec: RunSpec, result: dict[str, Any]) -> str:
    """One line per finished run, e.g. 'agc-lr0.2-s0: ok  loss 1.31 → 0.97  AP50 0.123  clip 45%  82 s'.

    The status is the trainer's (ok / diverged / failed); the report also flags finite blow-ups ('unstable')."""
    status = result.get("status", "?")
    parts = [f"{spec.run_id}: {status}"]
    if result.get("reused"):
        parts.append("(reused)")
    if status == "failed":
        parts.append(str(result.get("error", "")))
    else:
        first, last = result.get("first_loss"), result.get("last_loss")
        if isinstance(first, float) and isinstance(last, float):
            parts.append(f"loss {first:.3g} → {last:.3g}")
        ap = result.get("val_ap50")
        parts.append(f"AP50 {ap:.3f}" if isinstance(ap, float) else "AP50 -")
        if isinstance(result.get("clip_fraction"), float):
            parts.append(f"clip {result['clip_fraction']:.0%}")
        if result.get("skipped_steps"):
            parts.append(f"skipped {result['skipped_steps']}")
    if isinstance(result.get("wall_s"), float):
        parts.append(f"{result['wall_s']:.0f} s")
    return "  ".join(parts)
