"""Attention-MIL slide classification: labels, patient-level splits, training, evaluation, heatmaps."""

from .._lazy import lazy_exports

_EXPORTS = {
    "evaluate_run": ".evaluate", "write_heatmaps": ".heatmap", "AttentionMIL": ".models",
    "attention_scores": ".models", "load_run_model": ".rundir", "train_mil": ".train", "MilSettings": ".settings",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
