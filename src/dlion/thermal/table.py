"""Sparta's start table: what previous runs learned, keyed by (application, ambient bucket).

Sparta (EDGE '21) starts each run from a frequency learned from history for this application
at this ambient temperature. An entry holds that frequency (the one the run sustained once
hot), the workload's heat scale (its dynamic-power activity as the observer estimated it) and
its progress rate. The file is JSON, written atomically (temp file + rename).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dlion.core.config import format_validation_error
from dlion.report import write_json_atomic
from dlion.thermal.errors import ThermalError

TABLE_VERSION = 1


class TableEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    app: str = Field(description="Application (workload or command) name.")
    ambient_c: float = Field(description="Centre of the ambient bucket (°C).")
    frequency_mhz: float = Field(gt=0, description="Frequency to start the next run at.")
    heat_scale: float = Field(gt=0, description="Learned dynamic-power activity.")
    progress_rate: float | None = Field(
        None, ge=0, description="Mean progress per second of the learning runs (work units)."
    )
    runs: int = Field(ge=1, description="How many runs this entry has learned from.")


class _TableFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int
    entries: list[TableEntry]


def default_table_path() -> Path:
    """$DLION_CACHE_DIR/thermal/sparta_table.json, else ~/.cache/dlion/thermal/..."""
    env = os.environ.get("DLION_CACHE_DIR")
    base = Path(env) if env else Path.home() / ".cache" / "dlion"
    return base / "thermal" / "sparta_table.json"


def ambient_bucket(ambient_c: float, bucket_c: float) -> float:
    """Centre of the bucket `ambient_c` falls in (buckets of width bucket_c centred on
    multiples of it)."""
    return round(ambient_c / bucket_c) * bucket_c


class StartTable:
    """The table in memory; `save()` writes it back. A path of None keeps it in memory only."""

    def __init__(self, path: Path | None, bucket_c: float = 5.0) -> None:
        self.path = path
        self.bucket_c = bucket_c
        self._entries: dict[tuple[str, float], TableEntry] = {}
        if path is not None and path.exists():
            for entry in _read(path):
                self._entries[(entry.app, entry.ambient_c)] = entry

    def _key(self, app: str, ambient_c: float) -> tuple[str, float]:
        return (app, ambient_bucket(ambient_c, self.bucket_c))

    def lookup(self, app: str, ambient_c: float) -> TableEntry | None:
        return self._entries.get(self._key(app, ambient_c))

    def entries(self) -> list[TableEntry]:
        return [self._entries[k] for k in sorted(self._entries)]

    def update(
        self,
        app: str,
        ambient_c: float,
        *,
        frequency_mhz: float,
        heat_scale: float,
        progress_rate: float | None,
        weight: float = 0.5,
    ) -> TableEntry:
        """Blend a finished run into the entry: new = (1 - weight) old + weight run."""
        key = self._key(app, ambient_c)
        old = self._entries.get(key)
        if old is None:
            entry = TableEntry(
                app=app,
                ambient_c=key[1],
                frequency_mhz=frequency_mhz,
                heat_scale=heat_scale,
                progress_rate=progress_rate,
                runs=1,
            )
        else:

            def blend(a: float, b: float) -> float:
                return (1.0 - weight) * a + weight * b

            rate = progress_rate
            if old.progress_rate is not None and progress_rate is not None:
                rate = blend(old.progress_rate, progress_rate)
            entry = TableEntry(
                app=app,
                ambient_c=key[1],
                frequency_mhz=blend(old.frequency_mhz, frequency_mhz),
                heat_scale=blend(old.heat_scale, heat_scale),
                progress_rate=rate if rate is not None else old.progress_rate,
                runs=old.runs + 1,
            )
        self._entries[key] = entry
        return entry

    def save(self) -> None:
        if self.path is None:
            return
        data = {
            "version": TABLE_VERSION,
            "entries": [e.model_dump(mode="json") for e in self.entries()],
        }
        write_json_atomic(self.path, data)


def _read(path: Path) -> list[TableEntry]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ThermalError(f"{path}: cannot read the start table ({exc})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ThermalError(f"{path}: the start table is not valid JSON ({exc.msg})") from None
    try:
        table = _TableFile.model_validate(raw)
    except ValidationError as err:
        raise ThermalError(f"{path}: start table: {format_validation_error(err)}") from None
    if table.version != TABLE_VERSION:
        raise ThermalError(f"{path}: start table version {table.version}, expected {TABLE_VERSION}")
    return table.entries
