"""One check for the `from_dict` of every config dataclass: a mapping with known fields only."""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Mapping


def known_fields(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """`data` as a dict, or a ValueError naming unknown keys (usually typos) and the valid ones."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{cls.__name__}.from_dict expects a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}")
    return dict(data)
