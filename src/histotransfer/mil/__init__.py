"""Attention-MIL slide classification: labels, patient-level splits, training, evaluation, heatmaps, and the
run folder (what other stages, such as fine-tuning, read and write through this front door)."""

from .._lazy import lazy_exports

_EXPORTS = {
    "evaluate_run": ".evaluate", "write_heatmaps": ".heatmap",
    "annotation_files": ".localisation", "describe_localisation": ".evaluate", "describe_scored": ".evaluate",
    "load_annotations": ".localisation",
    "localisation_of_run": ".evaluate", "localisation_summary": ".evaluate", "run_splits": ".evaluate",
    "attention_overlay": ".heatmap", "heatmap_image": ".heatmap", "outline_lesion": ".heatmap",
    "attention_localisation": ".localisation", "cam_localisation": ".localisation", "cell_squares": ".localisation",
    "cohort_localisation": ".localisation",
    "AttentionMIL": ".models", "attention_scores": ".models", "predict": ".models",
    "train_mil": ".train", "validation_scores": ".train", "MilSettings": ".settings",
    "SPLITS": ".splits", "read_split_file": ".splits", "parse_labels": ".labels", "feature_fingerprint": ".plan",
    "BagSet": ".bags", "load_bags": ".bags", "feature_files": ".labels",
    "FitResult": ".rundir", "check_inputs": ".rundir", "config_differences": ".rundir", "guard": ".rundir",
    "load_run_model": ".rundir", "run_finished": ".rundir", "run_fingerprint": ".rundir",
    "fold_dirs": ".rundir", "model_run": ".rundir",
    "read_attention": ".rundir", "read_checkpoint": ".rundir", "read_config": ".rundir", "save_model": ".rundir",
    "write_config": ".rundir", "write_run_outputs": ".rundir", "group_metrics": ".rundir",
    "colour_shortcut_auc": ".shortcut", "group_shortcut_auc": ".shortcut", "run_shortcut": ".shortcut",
    "describe_shortcut": ".shortcut", "judge": ".shortcut", "ordered_group_auc": ".shortcut",
    "shortcut_verdict": ".verdict", "within_group_auc": ".verdict", "infer_colour_batches": ".batches",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
