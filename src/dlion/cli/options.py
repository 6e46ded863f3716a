"""Command-line options that every `dlion` command group spells the same way."""

import sys
from typing import Annotated

import typer
from rich.console import Console

ForceOption = Annotated[
    bool, typer.Option(help="Replace an earlier dlion output in --out (never other files).")
]


def wide_console(width: int = 160) -> Console:
    """rich's console; off a terminal (CI, a log file) rich would wrap tables at 80 columns,
    so they get `width`."""
    return Console() if sys.stdout.isatty() else Console(width=width)
