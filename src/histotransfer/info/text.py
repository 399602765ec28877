"""A description printed as aligned text: one line per field, nested fields indented, data keys as they are."""

from __future__ import annotations

from typing import Any

from .records import Keyed


def _scalar(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if value == [] or value == {}:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_scalar(v)}" for k, v in value.items())
    return str(value)


def _flat(value: Any) -> bool:
    """Whether a value reads well on one line: scalars, lists of scalars, short dicts of those."""
    if isinstance(value, dict):
        return (not value or all(_flat(v) and not isinstance(v, dict) for v in value.values())) and len(
            _scalar(value)
        ) <= 96
    if isinstance(value, list):
        return all(not isinstance(v, (dict, list)) for v in value)
    return True


def _lines(mapping: dict[str, Any], indent: int) -> list[str]:
    pad = " " * indent
    labels = {k: str(k) if isinstance(mapping, Keyed) else str(k).replace("_", " ") for k in mapping}
    width = max((len(v) for v in labels.values()), default=0)
    lines = []
    for key, value in mapping.items():
        if isinstance(value, dict) and not _flat(value):
            lines.append(f"{pad}{labels[key]}")
            lines += _lines(value, indent + 2)
        elif isinstance(value, list) and value and not _flat(value):
            lines.append(f"{pad}{labels[key]}")
            lines += [f"{pad}  {_scalar(item)}" for item in value]
        else:
            lines.append(f"{pad}{labels[key]:<{width}}  {_scalar(value)}".rstrip())
    return lines


def render(description: dict[str, Any]) -> str:
    """A description as aligned text: the kind and path, then one line per field (nested fields indented)."""
    fields = {k: v for k, v in description.items() if k not in ("kind", "path")}
    return "\n".join([f"{description['kind']}: {description['path']}", *_lines(fields, 2)])
