"""Stage settings: one pydantic model per stage, the single place each option is defined.

A stage's settings class (``TileSettings``, ``ExtractSettings``, ``MilSettings``, ...) declares every option once:
its type, default, bounds and help text. The CLI builds its options from it (:func:`add_options`,
:func:`from_args`), the Python API accepts it (or keyword overrides, :meth:`StageSettings.build`), the study file
validates its sections with it, and its :meth:`~StageSettings.fingerprint` is what caches and run folders record.
Fields marked ``runtime`` (devices, workers, batch sizes) change how fast a result is made, not the result, so
they are recorded but left out of the fingerprint. Fields marked ``omit_default`` (options added after a stage's
results were first recorded) are left out of the fingerprint while they keep their default, which makes the
result of before they existed: earlier results keep their fingerprints and are not redone.

pydantic validates; its errors are turned into one message listing every problem with the option (``--min-tissue``)
or key path (``datasets[0].min_tissue``) at fault.
"""

from __future__ import annotations

import argparse
import difflib
import re
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.config import JsonDict
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from .errors import HistotransferError
from .provenance import json_fingerprint

RUNTIME: JsonDict = {"runtime": True}
OMIT_DEFAULT: JsonDict = {"omit_default": True}
#: The largest seed numpy takes (its seeds are unsigned 32-bit integers).
SEED_MAX = 2**32 - 1
#: A seed option: 0 to SEED_MAX, so a bad seed is refused with the option's name, not by numpy mid-run.
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]


class StageSettings(BaseModel):
    """Base of every stage's settings: immutable, unknown keys refused, defaults validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
    #: How the settings are named in messages ("tile", "mil", ...).
    stage: ClassVar[str] = ""

    @classmethod
    def build(cls, settings: Self | None = None, **overrides: Any) -> Self:
        """``settings`` (or the defaults) with ``overrides`` applied and validated; errors name the options."""
        base = {} if settings is None else settings.model_dump(exclude_unset=True)
        try:
            return cls.model_validate({**base, **overrides})
        except ValidationError as exc:
            raise HistotransferError(describe_errors(exc, cls, style="api")) from None

    @classmethod
    def runtime_fields(cls) -> set[str]:
        return {name for name, f in cls.model_fields.items() if _marked(f, "runtime")}

    def record(self) -> dict[str, Any]:
        """Every field as plain JSON values (what config files hold)."""
        return self.model_dump(mode="json")

    @classmethod
    def omit_default_fields(cls) -> set[str]:
        return {name for name, f in cls.model_fields.items() if _marked(f, "omit_default")}

    def result_settings(self) -> dict[str, Any]:
        """The fields that determine the result (runtime fields left out, ``omit_default`` fields too while
        they hold their default)."""
        fields = type(self).model_fields
        at_default = {k for k in self.omit_default_fields() if getattr(self, k) == fields[k].default}
        return self.model_dump(mode="json", exclude=self.runtime_fields() | at_default)

    def fingerprint(self) -> str:
        """sha256 of :meth:`result_settings`: equal settings give equal fingerprints, in any process."""
        return json_fingerprint({"stage": self.stage, "settings": self.result_settings()})

    def differences(self, other: dict[str, Any]) -> list[str]:
        """``field (recorded vs now)`` for every result field on which a recorded dict differs from these."""
        mine = self.result_settings()
        return [
            f"{k} ({other.get(k)!r} vs {mine.get(k)!r})"
            for k in sorted(set(mine) | set(other))
            if k not in self.runtime_fields() and other.get(k) != mine.get(k)
        ]


def _marked(field: FieldInfo, mark: str) -> bool:
    """Whether a field carries ``mark`` (``RUNTIME``, ``OMIT_DEFAULT``) in its json_schema_extra."""
    extra = field.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get(mark))


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _loc(loc: Sequence[int | str], style: str) -> str:
    if style == "cli" and loc and isinstance(loc[0], str):
        return option_name(loc[0])
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def describe_errors(
    exc: ValidationError, model: type[BaseModel] | None = None, style: str = "key", prefix: str = ""
) -> str:
    """All problems of a ValidationError, one per line, each with its option or key path and, for a misspelt
    key, the closest valid spelling."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = [p for p in err["loc"] if p not in ("function-after", "function-before")]
        where = _loc(loc, style)
        if prefix:
            where = f"{prefix}.{where}" if where else prefix
        if err["type"] == "extra_forbidden":
            key = str(loc[-1]) if loc else ""
            lines.append(f"{where}: unknown key '{key}'{_did_you_mean(key, _siblings(model, loc))}")
            continue
        value = err.get("input")
        shown = "" if err["type"] in ("missing", "literal_error") else f" (got {value!r})"
        message = "missing (required)" if err["type"] == "missing" else _message(err)
        lines.append(f"{where}: {message}{shown}" if where else f"{message}{shown}")
    return "\n".join(lines)


def _message(err: ErrorDetails) -> str:
    if err["type"] == "literal_error":
        choices = re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", "")))
        value = str(err.get("input"))
        close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
        return f"{value!r} is not one of {', '.join(choices)}" + (f" (did you mean '{close[0]}'?)" if close else "")
    msg = str(err["msg"])
    return msg[len("Value error, ") :] if msg.startswith("Value error, ") else msg


def _siblings(model: type[BaseModel] | None, loc: Sequence[int | str]) -> list[str]:
    """The valid keys at the place ``loc`` points to (following nested models and lists of models)."""
    current: Any = model
    for part in loc[:-1]:
        if current is None:
            return []
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        current = _model_of(field.annotation) if field is not None else None
    return list(getattr(current, "model_fields", {})) if current is not None else []


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _did_you_mean(key: str, valid: Iterable[str]) -> str:
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f"; valid keys: {', '.join(valid)}" if valid else ""


def _unwrap_optional(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def add_options(
    parser: argparse.ArgumentParser, cls: type[StageSettings], skip: Iterable[str] = (), required: Iterable[str] = ()
) -> None:
    """Add one command-line option per field of ``cls`` (``--patch-size`` for ``patch_size``).

    Options that are not given stay absent from the parsed namespace, so :func:`from_args` passes only what
    the user typed and the settings class supplies every default. Booleans get ``--x`` / ``--no-x``.
    """
    skip, required = set(skip), set(required)
    for name, field in cls.model_fields.items():
        if name in skip:
            continue
        kind = _unwrap_optional(field.annotation)
        help_text = (field.description or "").replace("%", "%%")
        if field.default is not None and name not in required and not field.is_required():
            help_text += f" (default: {field.default})"
        kwargs: dict[str, Any] = {"dest": name, "help": help_text}
        if name in required:
            kwargs["required"] = True
        else:
            kwargs["default"] = argparse.SUPPRESS
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is Literal:
            kwargs["choices"] = [str(c) for c in typing.get_args(kind)]
        elif typing.get_origin(kind) in (list, tuple):
            kwargs["nargs"] = "+"
            kwargs["metavar"] = name.split("_")[-1].upper()
        else:
            kwargs["metavar"] = {int: "N", float: "X"}.get(kind, name.split("_")[-1].upper())
        parser.add_argument(option_name(name), **kwargs)


S = TypeVar("S", bound=StageSettings)


def from_args(cls: type[S], args: argparse.Namespace, **overrides: Any) -> S:
    """The settings the user gave on the command line (options of :func:`add_options`), validated, with
    messages naming the options."""
    given = {k: v for k, v in vars(args).items() if k in cls.model_fields}
    try:
        return cls.model_validate({**given, **overrides})
    except ValidationError as exc:
        raise HistotransferError(describe_errors(exc, cls, style="cli")) from None
