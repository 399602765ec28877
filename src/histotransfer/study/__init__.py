"""The study: one YAML file -> the whole encoder x truncation x dataset x seed grid -> tables, figures, report."""

from .config import CkaSettings, Dataset, EncoderConfig, FinetuneSettings, Study, load_study
from .runner import plan, run_study

__all__ = ["CkaSettings", "Dataset", "EncoderConfig", "FinetuneSettings", "Study", "load_study", "plan",
           "run_study"]
