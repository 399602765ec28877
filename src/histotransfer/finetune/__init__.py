"""Top-k fine-tuning: train a run's encoder end to end on its most-attended patches, then re-extract."""

from .._lazy import lazy_exports

_EXPORTS = {
    "run_encoder": ".encoder_io",
    "save_encoder": ".encoder_io",
    "ENCODER_FILE": ".encoder_io",
    "encoder_from_attrs": ".encoder_io",
    "run_encoder_attrs": ".encoder_io",
    "finetune": ".run",
    "select_top_k": ".topk",
    "FinetuneSettings": ".settings",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
