"""histotransfer: transfer learning for histopathology whole-slide images.

The public API, one function per pipeline step (slide -> patches -> features -> MIL -> fine-tune -> analysis
-> study). Names are imported on first use (PEP 562), so ``import histotransfer`` and the CLI stay fast and a
stage's heavy dependencies (torch, torchvision) load only when that stage is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# ``name -> module`` (the module's attribute of that name, except where ``_RENAMED`` says otherwise). No name
# is a subpackage's: importing ``histotransfer.finetune`` sets the package attribute ``finetune`` to the
# subpackage, which would replace a function of that name.
_RENAMED = {"fine_tune": "finetune"}
_API = {
    "open_slide": "histotransfer.slide",
    "tile_slides": "histotransfer.patches",
    "tile_slide": "histotransfer.patches",
    "read_patch_file": "histotransfer.patches.patch_file",
    "create_encoder": "histotransfer.encoders",
    "list_encoders": "histotransfer.encoders",
    "encoder_info": "histotransfer.encoders",
    "extract_features": "histotransfer.features",
    "read_feature_file": "histotransfer.features",
    "train_mil": "histotransfer.mil",
    "evaluate_run": "histotransfer.mil",
    "load_run_model": "histotransfer.mil",
    "write_heatmaps": "histotransfer.mil",
    "select_top_k": "histotransfer.finetune",
    "fine_tune": "histotransfer.finetune",
    "linear_cka": "histotransfer.analysis",
    "compare_encoders": "histotransfer.analysis",
    "load_study": "histotransfer.study",
    "run_study": "histotransfer.study",
    "make_demo_slides": "histotransfer.demo_slides",
    "HistotransferError": "histotransfer.errors",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'histotransfer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
