"""The `satdet` command line (typer). Heavy imports happen inside commands so `--help` is instant.

Every user-facing problem is raised as `SatdetError` (or `ConfigError`) somewhere in pipeline/ and is
printed here as one line on stderr with a non-zero exit code.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from pipeline import __version__
from pipeline.config import Config, ConfigError, load_config
from pipeline.errors import SatdetError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="satdet: tile GeoTIFFs, train a Faster R-CNN with gradient clipping, evaluate, predict.",
)

ConfigArg = Annotated[Path, typer.Argument(help="YAML config file.", exists=False)]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", "-s", help="Override a config value: section.key=value (repeatable).")
]


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn SatdetError/ConfigError into one red line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (SatdetError, ConfigError) as err:
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return wrapper


def load(config: Path, overrides: list[str] | None) -> Config:
    """Load a config for a command (errors become one line)."""
    return load_config(config, overrides or [])


def _version(value: bool) -> None:
    if value:
        typer.echo(f"satdet {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """satdet command line."""


@app.command("config")
@friendly_errors
def config_cmd(config: ConfigArg, set_: SetOpt = None) -> None:
    """Print the resolved config (every default filled in) as YAML."""
    import yaml

    cfg = load(config, set_)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
