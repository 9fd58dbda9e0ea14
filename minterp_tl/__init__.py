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
from minterp_tl.names import canonical_names, resolve_name, resolve_names, short_name

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "InductionReport",
    "ModelInfo",
    "canonical_names",
    "induction_report",
    "load_model",
    "model_info",
    "resolve_name",
    "resolve_names",
    "short_name",
    "toy_model",
    "train_induction_model",
]
