"""Representation analysis: linear CKA between encoders, stage by stage."""

from .._lazy import lazy_exports

_EXPORTS = {
    "StreamingCKA": ".cka", "linear_cka": ".cka", "compare_encoders": ".compare", "resolve_encoder": ".compare",
    "CkaSettings": ".settings",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
