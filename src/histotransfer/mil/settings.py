"""``MilSettings``: every option of attention-MIL training, defined once (CLI, Python API, study file, run
folder's ``config.json``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from ..settings import OMIT_DEFAULT, Seed, StageSettings

SMALL_SPLIT = 20  # below this many slides an AUC (and its interval) is too unstable to compare encoders
# The protocol ``auto`` cross-validates cohorts of fewer patients than this. Below 200 patients the 20% test split
# of a single 65/15/20 split holds fewer than 40 patients; their AUC then has a standard error of about 0.07
# (Hanley & McNeil at AUC 0.8, balanced classes), as large as the differences between encoders, and which
# patients land in it decides the result. K-fold tests every patient once and pools their predictions.
CV_BELOW_PATIENTS = 200
DEFAULT_FOLDS = 5
DEFAULT_HIDDEN = 256
# std floor as a fraction of the median per-dimension std of the training patches: 30% was never more than 0.02
# AUC from the best of raw, global and 1%/10%/30% floors on four bag sets (benchmarks/bench_standardize.py).
STD_FLOOR_FRACTION = 0.30
# Lesion annotations supervising the attention, at weight 1 beside the slide's cross-entropy, raised the
# within-centre AUC of a confounded two-centre cohort from 0.73 to 0.78 (benchmarks/bench_lesion_levers.py).
DEFAULT_ATTENTION_WEIGHT = 1.0
# What each recipe means for the options it sets (an option given explicitly wins over its recipe).
RECIPES: dict[str, dict[str, Any]] = {
    # Ours: features standardised with the training patches' statistics, the epoch with the best validation AUC.
    "histotransfer": {"standardize": True, "select_by": "auc"},
    # The paper's code: raw features, the epoch with the best validation accuracy.
    "paper": {"standardize": False, "select_by": "accuracy"},
}


class MilSettings(StageSettings):
    """How an attention-MIL slide classifier is trained."""

    stage: ClassVar[str] = "mil"

    recipe: Literal["histotransfer", "paper"] = Field(
        "histotransfer",
        description="histotransfer: standardised features, selection on validation AUC; paper: "
        "raw features, selection on validation accuracy (as the paper's code)",
    )
    model: Literal["histotransfer", "gated"] = Field(
        "histotransfer", description="histotransfer: the paper's network; gated: Ilse et al.'s gated attention"
    )
    epochs: int = Field(20, ge=1, le=100000, description="training epochs (the paper: 20)")
    lr: float = Field(1e-3, gt=0, le=10, description="Adam learning rate")
    standardize: bool | None = Field(
        None, description="z-score features with training-split statistics (default: as the recipe says)"
    )
    select_by: Literal["auc", "accuracy", "loss"] | None = Field(
        None,
        description="validation metric that picks the kept epoch (default: as the recipe says); ties: "
        "lower validation loss",
    )
    early_stopping: int | None = Field(
        None, ge=1, description="stop after this many epochs without a better validation score"
    )
    hidden: int | None = Field(None, ge=1, le=65536, description="width of the first layer (default: 256)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout after the hidden layers")
    seed: Seed = Field(0, description="seeds the split and the training")
    split_rule: Literal["camelyon16"] | None = Field(
        None,
        description="a dataset's official split by slide id (camelyon16: test_NNN slides are the test "
        "split, validation drawn from the training slides) instead of the 65/15/20 split",
    )
    protocol: Literal["auto", "split", "cv"] = Field(
        "auto",
        description="split: one patient-level train/val/test split; cv: patient-level K-fold "
        f"cross-validation (--folds); auto: cv for cohorts of fewer than {CV_BELOW_PATIENTS} "
        "patients or when --folds is given, else split (a split file or rule: split)",
    )
    folds: int = Field(
        DEFAULT_FOLDS,
        ge=2,
        le=1000,
        description="K of the cross-validation (auto lowers it when a class has fewer than K + 2 patients)",
    )
    group_column: str | None = Field(
        None,
        description="a column of the labels file (e.g. centre): splits are stratified by group and label, "
        "and metrics are reported per group with the mean within-group AUC",
    )
    balance: Literal["none", "groups"] = Field(
        "none",
        json_schema_extra=OMIT_DEFAULT,
        description="groups: each epoch draws the training slides so that every label x group cell of "
        "--group-column weighs the same, so the group (e.g. a centre's stain) cannot stand in for the "
        "label; no effect without --group-column",
    )
    annotations: Path | None = Field(
        None,
        json_schema_extra=OMIT_DEFAULT,
        description="folder of lesion annotations (<slide_id>.geojson or .png mask, as for evaluate): on each "
        "positive training slide that has one, the attention is trained as well to score the patches "
        "touching the lesion high (--attention-weight), so that it learns the lesion rather than what "
        "else tells the label apart (e.g. the centre); other slides get the slide loss only",
    )
    attention_weight: float = Field(
        DEFAULT_ATTENTION_WEIGHT,
        gt=0,
        le=1000,
        json_schema_extra=OMIT_DEFAULT,
        description="weight of the attention loss of --annotations (binary cross-entropy of each patch's raw "
        "attention score against whether it touches the lesion), added to the slide's loss; no effect "
        "without --annotations",
    )

    @model_validator(mode="after")
    def _recipe_defaults(self) -> MilSettings:
        # Options left unset take the recipe's value; they stay out of model_fields_set, so building these
        # settings again with another recipe re-derives them.
        for key, value in RECIPES[self.recipe].items():
            if getattr(self, key) is None:
                self.__dict__[key] = value
        return self


class HeatmapSettings(StageSettings):
    """The sizes of an attention heatmap: its thumbnail, the patch side and the slide's scale."""

    stage: ClassVar[str] = "heatmap"

    max_side: int = Field(2048, ge=64, le=16384, description="thumbnail size: its longest side in pixels")
    patch_size_level0: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="patch side in level-0 pixels (default: from the attention, feature or patch file attrs)",
    )
    mpp: float | None = Field(None, gt=0, le=1000, description="level-0 microns per pixel for slides without it")
