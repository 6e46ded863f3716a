"""Strict YAML: `yaml.safe_load` that refuses duplicate keys and numbers no config takes.

PyYAML keeps the last of two equal keys and drops the first without a word, so a config
with `lr: 0.1` and, further down, `lr: 0.2` (or two `train:` sections) would silently
lose half of what the user wrote. Here the second key is an error naming the key and the
line of both. YAML merge keys (`<<: *base`) still override as the YAML spec says: only
keys written out twice in the same mapping are refused.

Numbers: `.inf` and `.nan` (and a bare `inf`, `nan` or `infinity`, which YAML reads as
text but pydantic would turn into a float) and integers outside the signed 64-bit range
are refused with their line. No dlion setting takes them, and letting one through ends
in a crash far from the config (strict JSON, an int64 seed) instead of a one-line error.
Quote a name that happens to read `nan` and it stays a string.
"""

from __future__ import annotations

import math
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, ScalarNode

_MERGE_TAG = "tag:yaml.org,2002:merge"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_NON_FINITE_WORDS = {"inf", "infinity", "nan"}


class StrictLoader(yaml.SafeLoader):
    """SafeLoader whose mappings refuse duplicate keys (every mapping, at any depth, goes
    through `construct_mapping`)."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
                seen.setdefault(key, key_node.start_mark.line)
            except TypeError:
                continue  # an unhashable key: SafeLoader reports it below
            if first is not None:
                raise ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first given on line {first + 1})",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_float(self, node: ScalarNode) -> float:
        value = super().construct_yaml_float(node)
        if not math.isfinite(value):
            raise ConstructorError(
                None, None, f"{node.value}: not a finite number", node.start_mark
            )
        return value

    def construct_yaml_int(self, node: ScalarNode) -> int:
        value = super().construct_yaml_int(node)
        if not INT64_MIN <= value <= INT64_MAX:
            raise ConstructorError(
                None, None, f"{node.value}: integer out of the 64-bit range", node.start_mark
            )
        return value

    def construct_yaml_str(self, node: ScalarNode) -> str:
        value = super().construct_yaml_str(node)
        if node.style is None and value.lower().lstrip("+-") in _NON_FINITE_WORDS:
            raise ConstructorError(
                None,
                None,
                f"{value}: not a finite number (quote it if it is meant as text)",
                node.start_mark,
            )
        return value


StrictLoader.add_constructor("tag:yaml.org,2002:float", StrictLoader.construct_yaml_float)
StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)
StrictLoader.add_constructor("tag:yaml.org,2002:str", StrictLoader.construct_yaml_str)


def strict_load(text: str) -> Any:
    """Parse YAML like `yaml.safe_load`, refusing duplicate mapping keys (a YAMLError whose
    problem names the key and whose mark is the duplicate's line)."""
    return yaml.load(text, Loader=StrictLoader)
