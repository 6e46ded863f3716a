"""`dlion transfer`: cross-modality transfer commands (RecycleML, EdgeSys '18)."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Cross-modality transfer (RecycleML): reuse a sensor model for a new modality.",
    no_args_is_help=True,
)
