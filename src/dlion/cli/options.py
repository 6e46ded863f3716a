"""Command-line options that every `dlion` command group spells the same way."""

from typing import Annotated

import typer

ForceOption = Annotated[
    bool, typer.Option(help="Replace an earlier dlion output in --out (never other files).")
]
