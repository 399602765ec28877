"""Top-k fine-tuning: train a run's encoder end to end on its most-attended patches, then re-extract."""

from .encoder_io import run_encoder, save_encoder
from .finetune import finetune
from .topk import select_top_k

__all__ = ["finetune", "run_encoder", "save_encoder", "select_top_k"]
