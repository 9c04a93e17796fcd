"""What a person watching a training run sees: a rich progress bar (step, loss, img/s, clip fraction), and
the throughput window its img/s and the log's `images_per_s` / `steps_per_s` are measured over."""

from __future__ import annotations

from typing import Any


class TrainProgressBar:
    """A rich progress bar showing step, loss, img/s and clip fraction (silent when disabled)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  {task.fields[ips]} img/s  clip {task.fields[clip]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),  # stdout stays clean for what a command prints (JSON, paths)
            )
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-", ips="-", clip="-")
            self.bar.start()

    def update(self, step: int, record: dict[str, Any] | None = None) -> None:
        """Move to `step`; with a logged `record`, show its loss, img/s and clip fraction."""
        if self.bar is None:
            return
        fields = {}
        if record:
            fields = {
                "loss": f"{record['loss']:.4f}" if isinstance(record.get("loss"), float) else "nan",
                "ips": f"{record['images_per_s']:.1f}" if "images_per_s" in record else "-",
                "clip": f"{record['clip_fraction_total']:.0%}",
            }
        self.bar.update(self.task, completed=step, **fields)

    def set_total(self, total: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, total=total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class ThroughputWindow:
    """Steps and images since the last logged step, and since when: the rates logged at the next one."""

    def __init__(self, since: float):
        self.since, self.steps, self.images = since, 0, 0

    def skip_first_step(self, now: float, images: int) -> None:
        """Restart at `now` with the step just taken counted out: a process's first step traces (and may
        compile) the graph, which is not training throughput."""
        self.since, self.steps, self.images = now, -1, -images

    def add(self, images: int) -> None:
        self.steps += 1
        self.images += images

    def rates(self, now: float) -> dict[str, float]:
        """images_per_s and steps_per_s up to `now`; none when the window holds no step (only when the
        first step of a process is a logged step)."""
        if self.steps <= 0:
            return {}
        elapsed = max(now - self.since, 1e-9)
        return {"images_per_s": self.images / elapsed, "steps_per_s": self.steps / elapsed}

    def restart(self, now: float) -> None:
        self.since, self.steps, self.images = now, 0, 0
