"""Patch encoders (ImageNet and histopathology, optionally truncated) and feature extraction."""

from .encoders import (
    Encoder,
    create_encoder,
    encoder_id,
    encoder_info,
    list_encoders,
    register,
)
from .extract import extract_features, run_extraction
from .feature_file import FeatureBag, FeatureWriter, read_feature_attrs, read_feature_file
from .weights import load_state_dict_file

__all__ = [
    "Encoder",
    "FeatureBag",
    "FeatureWriter",
    "create_encoder",
    "encoder_id",
    "encoder_info",
    "extract_features",
    "list_encoders",
    "load_state_dict_file",
    "read_feature_attrs",
    "read_feature_file",
    "register",
    "run_extraction",
]
