"""Attention-MIL slide classification: labels, patient-level splits, training, evaluation, heatmaps."""

from .evaluate import evaluate_run
from .heatmap import write_heatmaps
from .models import AttentionMIL, attention_scores
from .rundir import load_run_model
from .train import train_mil

__all__ = ["AttentionMIL", "attention_scores", "evaluate_run", "load_run_model", "train_mil", "write_heatmaps"]
