"""The trained induction model: a 2-layer attention-only model trained on repeated random tokens until it
has a previous-token head (layer 0) and an induction head (layer 1), cached on disk, and the report that
checks it.

- :func:`train_induction_model` -- train (or load from the cache) the model; 1 layer is the negative control.
- :func:`induction_report` / :class:`InductionReport` -- per-head induction / previous-token scores and the
  first- / second-half losses on held-out repeated random sequences.
- :func:`repeated_random_tokens`, :func:`second_half_loss` -- the task's data and loss.

Every public name here is also importable from :mod:`minterp_tl.models`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge

from minterp_tl._cache import (
    atomic_write_bytes,
    default_cache_dir,
    package_version,
    read_cached_weights,
    set_name,
    state_hash,
)

logger = logging.getLogger(__name__)

# Repeat lengths for training the induction model: 8..24 with 11, 16 and 21 held out for testing.
HELD_OUT_LENGTHS: tuple[int, ...] = (11, 16, 21)
DEFAULT_TRAIN_LENGTHS: tuple[int, ...] = tuple(L for L in range(8, 25) if L not in HELD_OUT_LENGTHS)
_RETRAIN = "Training again and rewriting the cache."


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
        versions = {"transformer_lens": package_version("transformer-lens"), "torch": torch.__version__}
        payload = json.dumps({**fields, "format": 1, **versions}, sort_keys=True)
        return hashlib.blake2b(payload.encode(), digest_size=10).hexdigest()


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
        boot_native = TransformerBridge.boot_native  # type: ignore[attr-defined]  # attached by transformer_lens
        model = boot_native(_induction_config(t), model_name=f"induction-{t.n_layers}l")
    return set_name(model, f"induction-{t.n_layers}l")


def _next_token_losses(
    logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch pos-1"]:
    logprobs = logits[:, :-1].log_softmax(-1)
    return -logprobs.gather(-1, tokens[:, 1:, None])[..., 0]


def second_half_loss(
    logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, ""]:
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
    picked = torch.randint(t.n_heads, keep.shape[:2], generator=gen)
    pick = torch.nn.functional.one_hot(picked, t.n_heads).float()
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
    for name, value, low in (
        ("n_layers", n_layers, 1),
        ("steps", steps, 1),
        ("batch_size", batch_size, 1),
        ("d_vocab", d_vocab, 2),
        ("d_model", d_model, 1),
        ("n_heads", n_heads, 1),
    ):
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
        state = read_cached_weights(weights, "train_induction_model", _RETRAIN)
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
        meta = {
            "training": json.dumps(asdict(t)),
            "seconds": f"{seconds:.2f}",
            "final_loss": f"{history[-1]:.4f}",
            "content_hash": state_hash(state),
        }
        try:
            atomic_write_bytes(weights, save(state, metadata=meta))
            atomic_write_bytes(
                weights.with_suffix(".json"),
                json.dumps({"training": asdict(t), "seconds": seconds, "loss_history": history}).encode(),
            )
        except OSError as err:
            warnings.warn(
                f"train_induction_model: the trained model could not be cached at {str(weights)!r} "
                f"({err.strerror or err}); it is returned, and will be trained again next time.",
                RuntimeWarning,
                stacklevel=2,
            )
    logger.info(
        "trained %d-layer induction model in %.1f s (final loss %.3f)", n_layers, seconds, history[-1]
    )
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
            f"induction_report: length={length} needs {2 * length + 1} positions but "
            f"n_ctx={model.cfg.n_ctx}; "
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
    "DEFAULT_TRAIN_LENGTHS",
    "HEAD_DROPOUT_START",
    "HELD_OUT_LENGTHS",
    "InductionReport",
    "InductionTraining",
    "default_cache_dir",
    "induction_report",
    "repeated_random_tokens",
    "second_half_loss",
    "train_induction_model",
]
