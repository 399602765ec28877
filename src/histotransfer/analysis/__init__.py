"""Representation analysis: linear CKA between encoders, stage by stage."""

from .cka import StreamingCKA, linear_cka
from .compare import compare_encoders, resolve_encoder

__all__ = ["StreamingCKA", "compare_encoders", "linear_cka", "resolve_encoder"]
