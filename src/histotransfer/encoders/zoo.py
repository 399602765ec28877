"""The zoo: the registry with every catalogue registered, and the lookups and builders that need its entries.

Importing this module registers the CNNs, then the ViTs (the order ``list_encoders`` gives); the package's front
door takes every lookup from here, so no caller has to know which catalogue holds an encoder.
"""

from . import cnn, vit  # noqa: F401  (importing a catalogue registers its encoders)
from .build import create_encoder, create_encoders, encoder_id
from .registry import encoder_info, encoder_spec, list_encoders, weights_top1
from .weights import resolve_weights

__all__ = [
    "create_encoder",
    "create_encoders",
    "encoder_id",
    "encoder_info",
    "encoder_spec",
    "list_encoders",
    "resolve_weights",
    "weights_top1",
]
