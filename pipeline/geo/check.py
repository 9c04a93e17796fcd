"""Read rasters in full before a long run: `satdet inspect SCENE...` and `satdet tile CONFIG --check`.

A cut-short download usually keeps a valid header, so opening it succeeds and the damage only shows when
the missing blocks are decoded, possibly an hour into tiling. `check_rasters` decodes every block of
every file (flat memory, one progress bar over all of them) and reports each file's header facts and
its first read error as one line, instead of stopping at the first bad file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import SatdetError
from pipeline.geo.raster import RasterInfo, check_raster, raster_info


@dataclass(frozen=True)
class RasterCheck:
    """The outcome for one file: its header (None when even that is unreadable) and the error, if any."""

    path: str
    info: RasterInfo | None
    error: str | None  # the one-line SatdetError message; None = every block decoded

    @property
    def ok(self) -> bool:
        return self.error is None


def _crs_text(crs: str | None) -> str:
    if crs is None:
        return "no CRS"
    if crs.startswith("EPSG:"):
        return crs
    name = crs.split('"')[1] if crs.count('"') >= 2 else crs[:40]
    return f"CRS {name!r} (no EPSG code)"


def describe(info: RasterInfo) -> str:
    """'160x128 px, 3 bands uint8, EPSG:32617, nodata none' — the header facts a user checks first."""
    nodata = "none" if info.nodata is None else f"{info.nodata:g}"
    return (f"{info.width}x{info.height} px, {info.count} band{'s' if info.count != 1 else ''} {info.dtype}, "
            f"{_crs_text(info.crs)}, nodata {nodata}")


@contextlib.contextmanager
def _bar(total: int, enabled: bool) -> Iterator[Any]:
    """A rich progress bar over rows read (stderr, only on a terminal); yields advance(k)."""
    if not enabled:
        yield lambda k: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress(TextColumn("reading"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"), TimeRemainingColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("rows", total=max(total, 1))
        yield lambda k: bar.advance(task, k)


def check_rasters(paths: Sequence[str | Path], progress: bool = True) -> list[RasterCheck]:
    """Decode every block of every raster in `paths`; one RasterCheck per path, in order (never raises for a
    bad file: a missing, non-raster or corrupt file is reported in its RasterCheck)."""
    headers: list[tuple[str, RasterInfo | None, str | None]] = []
    for path in paths:
        try:
            headers.append((str(path), raster_info(path), None))
        except SatdetError as err:
            headers.append((str(path), None, str(err)))
    results: list[RasterCheck] = []
    with _bar(sum(i.height for _, i, _ in headers if i is not None), progress) as advance:
        for path, info, error in headers:
            if info is None:
                results.append(RasterCheck(path, None, error))
                continue
            done = 0

            def step(k: int) -> None:
                nonlocal done
                done += k
                advance(k)

            try:
                check_raster(path, step)
            except SatdetError as err:
                error = str(err)
                advance(info.height - done)
            results.append(RasterCheck(path, info, error))
    return results
