"""Reading input files safely: regular files only, text decoded by its byte-order mark, CSV ids kept as text.

Every file a user gives (labels, splits, a study, annotations, slides) and every table an earlier stage wrote is
read through here, so that:

- a named pipe, a device or a socket is refused before it is opened (opening a pipe blocks until someone
  writes to it);
- UTF-8 (with or without a BOM) and the UTF-16/UTF-32 that Excel saves as "Unicode text" are read; any other
  encoding is refused in one line naming the file and the encoding it looks like, not a UnicodeDecodeError;
- id columns (slide, patient, case and group ids) are read as the text they hold: a slide named ``NA``,
  ``null``, ``nan``, ``None`` or ``N/A`` stays that slide, where pandas would read it as a missing value;
- YAML aliases (``*name``) are refused as the parser meets them, before anything is expanded: a few lines of
  nested aliases expand to billions of nodes (minutes and gigabytes before any check could run).
"""

from __future__ import annotations

import codecs
import io
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import HistotransferError

if TYPE_CHECKING:
    import pandas as pd

# Columns holding identifiers, whatever the file: never numbers, never missing values.
ID_COLUMNS = frozenset({"slide_id", "patient_id", "case_id", "group"})
# Byte-order marks, longest first (a UTF-32 LE mark starts with the UTF-16 LE one).
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_KINDS = {
    stat.S_ISFIFO: "a named pipe",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
    stat.S_ISSOCK: "a socket",
    stat.S_ISDIR: "a folder",
}


def special_file(path: str | os.PathLike[str]) -> str | None:
    """What ``path`` is when it exists and is not a regular file ("a named pipe", "a folder", ...), else None.

    Uses ``stat``, which never opens the file, so it cannot block on a pipe."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS.items() if test(mode)), "not a regular file")


def check_regular_file(path: str | os.PathLike[str], kind: str = "input") -> None:
    """Raise a one-line error when ``path`` exists but is a pipe, device, socket or folder, not a regular file."""
    what = special_file(path)
    if what is not None:
        raise HistotransferError(f"{path}: is {what}, not a regular file; pass a regular {kind} file.")


def decode_text(data: bytes, path: str | os.PathLike[str]) -> tuple[str, str]:
    """``data`` as text and its encoding: UTF-8, or the encoding its byte-order mark names; one line naming
    ``path`` otherwise."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(encoding), encoding
            except UnicodeDecodeError as exc:
                raise HistotransferError(
                    f"{path}: starts with a {encoding.upper()} byte-order mark but is not "
                    f"valid {encoding.upper()} (byte {exc.start}); save it again as UTF-8."
                ) from exc
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as exc:
        raise HistotransferError(
            f"{Path(path).name} is not UTF-8 (looks like {_guess_encoding(data)}; byte "
            f"0x{data[exc.start]:02x} at offset {exc.start}); save it as UTF-8 (in Excel: "
            f"'CSV UTF-8'). File: {path}"
        ) from exc


def _guess_encoding(data: bytes) -> str:
    """A name for the encoding of text that is not UTF-8 and has no byte-order mark."""
    sample = data[:4096]
    if sample.count(0) * 4 > len(sample):  # every other byte zero: UTF-16 saved without its mark
        return "UTF-16 without a byte-order mark"
    try:
        sample.decode("cp1252")
    except UnicodeDecodeError:
        return "an unknown 8-bit encoding"
    return "Latin-1 / Windows-1252"


def read_text(path: str | os.PathLike[str], kind: str = "input") -> str:
    """The text of a regular file (see :func:`decode_text`); a missing or special file is one line."""
    return _read_decoded(path, kind)[0]


def _read_decoded(path: str | os.PathLike[str], kind: str) -> tuple[str, str]:
    check_regular_file(path, kind)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise HistotransferError(f"{path}: no such {kind} file; check the path.") from exc
    return decode_text(data, path)


def read_csv(
    path: str | os.PathLike[str],
    ids: Iterable[str] = (),
    *,
    text: bool = False,
    missing: bool = True,
    kind: str = "input",
    **options: Any,
) -> pd.DataFrame:
    """A CSV file as a table whose id columns (:data:`ID_COLUMNS`, columns ending in ``_id`` and ``ids``) are
    text, never missing values. The other columns are parsed as usual (numbers; empty cells and pandas' NA
    spellings as missing values), without missing values with ``missing=False``, or kept as text with ``text``.

    ``options`` go to ``pandas.read_csv`` (e.g. ``usecols``, ``skipinitialspace``, ``sep``). The file is read
    with :func:`read_text`, so a special file or one in another encoding than UTF-8/UTF-16 is one line. A
    UTF-16 file whose header holds tabs and no comma is Excel's "Unicode text" and is read tab-separated.
    """
    import pandas as pd
    from pandas._libs.parsers import STR_NA_VALUES

    content, encoding = _read_decoded(path, kind)
    first = content.split("\n", 1)[0]
    if encoding.startswith("utf-16") and "sep" not in options and "\t" in first and "," not in first:
        options["sep"] = "\t"
    if text:
        return pd.read_csv(io.StringIO(content), dtype=str, keep_default_na=False, **options)
    header = pd.read_csv(io.StringIO(content), nrows=0, **{k: v for k, v in options.items() if k != "usecols"})
    named = set(ids)
    id_cols = [c for c in header.columns if c in ID_COLUMNS or c in named or str(c).endswith("_id")]
    na_values = {c: sorted(STR_NA_VALUES) for c in header.columns if c not in id_cols} if missing else None
    return pd.read_csv(
        io.StringIO(content), dtype=dict.fromkeys(id_cols, str), keep_default_na=False, na_values=na_values, **options
    )


class _AliasFound(Exception):
    """A YAML alias met by :class:`_NoAliasLoader` at ``line`` (1-based)."""

    def __init__(self, line: int, name: str):
        super().__init__(f"alias *{name} on line {line}")
        self.line, self.name = line, name


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing every alias (``*name``) when the parser reaches it."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasFound(event.start_mark.line + 1, event.anchor)
        return super().compose_node(parent, index)


def read_yaml(path: str | os.PathLike[str], kind: str = "study") -> tuple[str, Any]:
    """The text of a YAML file and what it holds (safe types only); invalid YAML and aliases are one line."""
    text = read_text(path, kind)
    try:
        return text, yaml.load(text, Loader=_NoAliasLoader)
    except _AliasFound as exc:
        raise HistotransferError(
            f"{path}: line {exc.line} uses the YAML alias *{exc.name}; anchors and aliases (&name, *name) are "
            f"refused in {kind} files (nested aliases expand to gigabytes); write the values out in full."
        ) from None
    except yaml.YAMLError as exc:
        raise HistotransferError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
