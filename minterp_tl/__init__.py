"""minterp_tl: mechanistic interpretability on TransformerLens 4."""

from minterp_tl.models import (
    DEFAULT_MODEL,
    InductionReport,
    ModelInfo,
    induction_report,
    load_model,
    model_info,
    toy_model,
    train_induction_model,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "InductionReport",
    "ModelInfo",
    "induction_report",
    "load_model",
    "model_info",
    "toy_model",
    "train_induction_model",
]
