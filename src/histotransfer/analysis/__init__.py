"""Representation analysis: linear CKA between encoders, stage by stage, and Grad-CAM inside attended patches."""

from .._lazy import lazy_exports

_EXPORTS = {
    "StreamingCKA": ".cka",
    "linear_cka": ".cka",
    "compare_encoders": ".compare",
    "resolve_encoder": ".cka_encoders",
    "CkaSettings": ".settings",
    "CamSettings": ".settings",
    "grad_cam": ".cam",
    "CamResult": ".cam",
    "write_cams": ".cam_run",
    "CamRun": ".cam_run",
    "read_cam_file": ".cam_file",
    "cam_localisation_summary": ".cam_run",
    "describe_cam_localisation": ".cam_run",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
