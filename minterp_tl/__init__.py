"""minterp_tl: mechanistic interpretability on TransformerLens 4."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# Nothing heavy is imported here: the modules are imported when a public name is first used (PEP 562), so
# `import minterp_tl` and `minterp-tl --help` load neither torch nor TransformerLens, matplotlib or networkx.
_MODULES = ("attribution", "circuits", "lens", "patching", "routes", "transparent")
_EXPORTS: dict[str, str] = {
    "AttributionSweep": "attribution",
    "attribution_patch": "attribution",
    "CircuitConfig": "circuits",
    "CircuitModel": "circuits",
    "SubnetworkHistory": "circuits",
    "find_subnetwork": "circuits",
    "RepresentationContext": "context",
    "Edit": "edits",
    "Edits": "edits",
    "Intervention": "interventions",
    "LensResult": "lens",
    "logit_lens": "lens",
    "DEFAULT_MODEL": "models",
    "InductionReport": "models",
    "ModelInfo": "models",
    "induction_report": "models",
    "load_model": "models",
    "model_info": "models",
    "toy_model": "models",
    "train_induction_model": "models",
    "canonical_names": "names",
    "expand_name": "names",
    "resolve_name": "names",
    "resolve_names": "names",
    "short_name": "names",
    "PatchSweep": "patching",
    "activation_patch": "patching",
    "Route": "routes",
    "build_graph": "routes",
    "paths_to_prediction": "routes",
    "plot_routes": "routes",
    "strongest_paths": "routes",
    "Token": "specs",
    "Add": "state",
    "Compose": "state",
    "LoadRule": "state",
    "MeanOverBatch": "state",
    "SavedState": "state",
    "SaveRule": "state",
    "Scale": "state",
    "StateConfig": "state",
    "StateManager": "state",
    "LazyTensor": "store",
    "SaveReport": "store",
    "StateStore": "store",
    "tensor_hash": "store",
    "TransformerLensTransparentLlm": "transparent",
    "TransparentLlm": "transparent",
    "Experiment": "wrapper",
    "ExperimentResult": "wrapper",
    "ModelWrapper": "wrapper",
    "Phase": "wrapper",
    "RunResult": "wrapper",
}

if TYPE_CHECKING:  # for type checkers and editors: the same names, imported eagerly
    from minterp_tl import attribution, circuits, lens, patching, routes, transparent
    from minterp_tl.attribution import AttributionSweep, attribution_patch
    from minterp_tl.circuits import CircuitConfig, CircuitModel, SubnetworkHistory, find_subnetwork
    from minterp_tl.context import RepresentationContext
    from minterp_tl.edits import Edit, Edits
    from minterp_tl.interventions import Intervention
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
    from minterp_tl.names import canonical_names, expand_name, resolve_name, resolve_names, short_name
    from minterp_tl.patching import PatchSweep, activation_patch
    from minterp_tl.routes import Route, build_graph, paths_to_prediction, plot_routes, strongest_paths
    from minterp_tl.specs import Token
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
    from minterp_tl.store import LazyTensor, SaveReport, StateStore, tensor_hash
    from minterp_tl.transparent import TransformerLensTransparentLlm, TransparentLlm
    from minterp_tl.wrapper import Experiment, ExperimentResult, ModelWrapper, Phase, RunResult


def __getattr__(name: str) -> Any:
    if name not in _MODULES and name not in _EXPORTS:
        raise AttributeError(f"module 'minterp_tl' has no attribute {name!r}")
    # The first public name asked for loads the modules (static imports; each binds its module here).
    import minterp_tl.attribution
    import minterp_tl.circuits
    import minterp_tl.context
    import minterp_tl.edits
    import minterp_tl.interventions
    import minterp_tl.lens
    import minterp_tl.models
    import minterp_tl.names
    import minterp_tl.patching
    import minterp_tl.routes
    import minterp_tl.specs
    import minterp_tl.state
    import minterp_tl.store
    import minterp_tl.transparent
    import minterp_tl.wrapper  # noqa: F401

    here = globals()
    value = here[name] if name in _MODULES else getattr(here[_EXPORTS[name]], name)
    here[name] = value  # later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_MODULES))


__version__ = "0.1.0"

__all__ = [
    # models
    "DEFAULT_MODEL",
    "load_model",
    "toy_model",
    "train_induction_model",
    "induction_report",
    "InductionReport",
    "model_info",
    "ModelInfo",
    # hook names and specs
    "canonical_names",
    "resolve_name",
    "resolve_names",
    "expand_name",
    "short_name",
    "Token",
    # phases: save / load / intervene in one run
    "RepresentationContext",
    "StateConfig",
    "SaveRule",
    "LoadRule",
    "Scale",
    "Add",
    "MeanOverBatch",
    "Compose",
    "StateManager",
    "SavedState",
    "ModelWrapper",
    "RunResult",
    "Experiment",
    "Phase",
    "ExperimentResult",
    # interventions and persistent edits
    "Intervention",
    "Edits",
    "Edit",
    # sweeps
    "patching",
    "activation_patch",
    "PatchSweep",
    "attribution",
    "attribution_patch",
    "AttributionSweep",
    # reading the model
    "lens",
    "logit_lens",
    "LensResult",
    "transparent",
    "TransparentLlm",
    "TransformerLensTransparentLlm",
    "routes",
    "build_graph",
    "Route",
    "strongest_paths",
    "paths_to_prediction",
    "plot_routes",
    # circuits
    "circuits",
    "CircuitConfig",
    "CircuitModel",
    "find_subnetwork",
    "SubnetworkHistory",
    # on disk
    "StateStore",
    "LazyTensor",
    "SaveReport",
    "tensor_hash",
]
