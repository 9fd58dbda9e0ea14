"""minterp_tl: mechanistic interpretability on TransformerLens 4."""

from minterp_tl import attribution, circuits, lens, patching, routes, transparent
from minterp_tl.attribution import AttributionSweep, attribution_patch
from minterp_tl.circuits import CircuitConfig, CircuitModel, SubnetworkHistory, find_subnetwork
from minterp_tl.context import RepresentationContext
from minterp_tl.edits import Edit, Edits
from minterp_tl.lens import LensResult, logit_lens
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
from minterp_tl.patching import PatchSweep, activation_patch
from minterp_tl.names import (
    canonical_names,
    expand_name,
    resolve_name,
    resolve_names,
    short_name,
)
from minterp_tl.routes import Route, build_graph, paths_to_prediction, plot_routes, strongest_paths
from minterp_tl.specs import Token
from minterp_tl.transparent import TransformerLensTransparentLlm, TransparentLlm
from minterp_tl.store import LazyTensor, SaveReport, StateStore, tensor_hash
from minterp_tl.state import (
    Add,
    Compose,
    LoadRule,
    MeanOverBatch,
    SavedState,
    SaveRule,
    Scale,
    StateConfig,
    StateManager,
)
from minterp_tl.wrapper import (
    Experiment,
    ExperimentResult,
    ModelWrapper,
    Phase,
    RunResult,
)

__version__ = "0.1.0"

__all__ = [
    "Route",
    "TransformerLensTransparentLlm",
    "TransparentLlm",
    "build_graph",
    "paths_to_prediction",
    "plot_routes",
    "routes",
    "strongest_paths",
    "transparent",
    "CircuitConfig",
    "CircuitModel",
    "SubnetworkHistory",
    "circuits",
    "find_subnetwork",
    "Edit",
    "Edits",
    "LazyTensor",
    "SaveReport",
    "StateStore",
    "tensor_hash",
    "AttributionSweep",
    "LensResult",
    "PatchSweep",
    "activation_patch",
    "attribution",
    "attribution_patch",
    "lens",
    "logit_lens",
    "patching",
    "Add",
    "Compose",
    "DEFAULT_MODEL",
    "Experiment",
    "ExperimentResult",
    "InductionReport",
    "LoadRule",
    "MeanOverBatch",
    "ModelInfo",
    "ModelWrapper",
    "Phase",
    "RepresentationContext",
    "RunResult",
    "SaveRule",
    "SavedState",
    "Scale",
    "StateConfig",
    "StateManager",
    "Token",
    "canonical_names",
    "expand_name",
    "induction_report",
    "load_model",
    "model_info",
    "resolve_name",
    "resolve_names",
    "short_name",
    "toy_model",
    "train_induction_model",
]
