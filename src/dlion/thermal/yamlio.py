"""Reading YAML sources (a user's file or a shipped preset) and validating them in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from dlion.core.config import (
    format_validation_error,
    parse_yaml_mapping,
    read_source,
    read_text_file,
)
from dlion.core.errors import ConfigError
from dlion.thermal.errors import ThermalError

PROFILE_FOLDER = "thermal_profiles"

M = TypeVar("M", bound=BaseModel)


def read_profile_text(source: str) -> str:
    """Text of a profile YAML file, or of the shipped profile of that name."""
    try:
        return read_source(source, PROFILE_FOLDER, "profile", "profile")
    except ConfigError as exc:  # keep the message; one error type for the thermal package
        raise ThermalError(str(exc)) from None


def read_file(path: Path, what: str) -> str:
    try:
        return read_text_file(path, what)
    except ConfigError as exc:  # keep the message; one error type for the thermal package
        raise ThermalError(str(exc)) from None


def parse_mapping(text: str, origin: str) -> dict[str, Any]:
    """YAML text that must hold a mapping at the top level; errors name the line."""
    try:
        return parse_yaml_mapping(text, origin)
    except ConfigError as exc:  # keep the message; one error type for the thermal package
        raise ThermalError(str(exc)) from None


def validate(model: type[M], raw: Any, origin: str) -> M:
    """Validate raw data into `model`; a failure is one ThermalError line naming the field."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ThermalError(f"{origin}: {format_validation_error(err)}") from None
