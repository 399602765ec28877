"""Fingerprints: short, stable identities of settings and contents, recorded by every stage.

Each artifact records the fingerprints of its inputs and of its own settings; a stage that reads it compares
them with what it is given now, and refuses (or redoes its work) on a mismatch instead of computing a silently
wrong number. A fingerprint is the sha256 (hex) of a canonical form, so it is the same in every process and on
every machine.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace; numpy scalars and arrays as plain values, paths as text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_plain)


def _plain(obj: Any) -> Any:
    # numpy scalars and arrays have .tolist(); checked by duck typing so that settings (which fingerprint with
    # this module) do not load numpy, keeping `histotransfer --help` fast.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def json_fingerprint(obj: Any) -> str:
    """sha256 of ``obj``'s canonical JSON."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def array_fingerprint(*arrays: np.ndarray, meta: Any = None) -> str:
    """sha256 over arrays (dtype, shape and bytes, in C order) and optional JSON-able ``meta``."""
    import numpy as np

    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    if meta is not None:
        h.update(canonical_json(meta).encode())
    return h.hexdigest()


def short(fingerprint: str | None) -> str:
    """The first 12 hex digits, for messages and tables."""
    return (fingerprint or "none")[:12]
