"""TransparentLlm: the LLM Transparency Tool's model interface on TransformerLens 4, exact decompositions.

:class:`TransparentLlm` is the tool's abstract, stateful interface (same method names and meanings):
``run`` a batch of sentences once, then ask what any layer read, wrote and where it came from --
residual stream states, FFN outputs split per neuron, attention outputs split per head and per
source token. :class:`TransformerLensTransparentLlm` implements it over any ``TransformerBridge``
(the toys, SmolLM2, the induction model), including gated MLPs and grouped-query attention.

Numerics: the model's own (raw HF weights, no LayerNorm folding, no ``enable_compatibility_mode``);
logits are the model's logits. Every decomposition is exact on these numerics (float32, to about
1e-6 relative):

- ``decomposed_attn(b, l)`` summed over sources and heads, plus :meth:`attention_output_bias`, is
  ``hook_attn_out``: each part is ``pattern[h, t, s] * (v[s, kv(h)] @ W_O[h])`` from the forward
  pass's own ``hook_pattern`` and ``hook_v`` (which already includes the value bias ``b_V``, so it
  is not added again) and the model's ``o_proj`` weights; ``b_O`` is added once, to the whole, and
  belongs to no head or source. This fixes the tool's TransformerLens wrapper, which added ``b_V``
  a second time and dropped ``b_O``.
- ``decomposed_ffn_out(b, l, p)`` summed over neurons plus :meth:`ffn_output_bias` is ``ffn_out``.
- ``residual_in(l) + attention output == residual_after_attn(l)``,
  ``residual_after_attn(l) + ffn_out(l) == residual_out(l)``, and
  ``unembed(residual_out(n_layers - 1), normalize=True)`` is the model's logits.

What a neuron is: one input of the FFN's output projection (``W_out`` / ``down_proj``), i.e. one
coordinate of ``blocks.{l}.mlp.hook_post``. In a plain MLP that is ``act(x @ W_in + b_in)``; in a
gated MLP (SwiGLU: SmolLM2, the ``"gqa"`` toy) it is ``act(x @ W_gate) * (x @ W_in)``, the product
of the gate and the up projection -- the only quantity that enters ``W_out`` linearly, so the
per-neuron split is exact. Attention-only models have no neurons: ``ffn_out`` is zero,
``residual_after_attn == residual_out``, and the neuron methods raise ``ValueError``.

Grouped-query attention: query head ``h`` reads key/value head ``h // (n_heads // n_kv_heads)``
(HF's ``repeat_kv``); every per-head method speaks in query heads (``n_heads``).

Axis order of :meth:`TransparentLlm.decomposed_attn`: ``[target, source, head, d_model]`` (target =
query position, source = key position), as the tool's TransformerLens implementation returns it and
its graph code consumes it, and as :meth:`TransparentLlm.attention_matrix` is ``[query, key]``. (The
seed's docstring says ``[source, target, ...]``; the tool's own code does not follow it.)

The forward pass runs through :class:`minterp_tl.wrapper.ModelWrapper` with a
:class:`minterp_tl.state.StateManager` that saves only the hooks the accessors need (residual
stream, block outputs, ``hook_v``, ``hook_pattern``, ``mlp.hook_post``): no per-head results, no
``run_with_cache``. Decompositions are computed when asked for, one layer at a time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from minterp_tl._checks import index
from minterp_tl.context import Prompts, RepresentationContext
from minterp_tl.hooks import n_heads
from minterp_tl.lens import readout
from minterp_tl.models import ModelInfo, model_info
from minterp_tl.state import SaveRule, StateConfig, StateManager
from minterp_tl.wrapper import Batch, ModelWrapper


class TransparentLlm(ABC):
    """An abstract stateful interface for a language model (the LLM Transparency Tool's).

    The model is loaded when the object is made. The internal state is what the last call of
    :meth:`run` computed; most methods read it, some do cheap computations on it. Methods that read
    the state raise ``RuntimeError`` before the first :meth:`run`; out-of-range layers, positions,
    heads, neurons or batch indices raise ``ValueError`` naming the valid range. Negative indices
    count from the end, as in Python.
    """

    @abstractmethod
    def model_info(self) -> ModelInfo:
        """General info about the model; available before any call of :meth:`run`."""

    @abstractmethod
    def run(self, sentences: list[str]) -> None:
        """Run the model on ``sentences`` in a single batch and keep what the accessors need."""

    @abstractmethod
    def batch_size(self) -> int:
        """The size of the batch of the last call of :meth:`run`."""

    @abstractmethod
    def tokens(self) -> Int[Tensor, "batch pos"]:
        """The token ids of the last run (padded on the right to the longest sentence)."""

    @abstractmethod
    def tokens_to_strings(self, tokens: Int[Tensor, pos]) -> list[str]:
        """Each token id as its text."""

    @abstractmethod
    def logits(self) -> Float[Tensor, "batch pos d_vocab"]:
        """The model's logits of the last run."""

    @abstractmethod
    def unembed(self, t: Float[Tensor, d_model], normalize: bool) -> Float[Tensor, vocab]:
        """Project a vector (e.g. one residual stream state) into the vocabulary.

        Args:
            t: The vector, ``[d_model]``.
            normalize: Apply the final normalization first. With ``True``, applied to
                ``residual_out(n_layers - 1)`` at a position, this gives the model's logits there.
        """

    # ================= residual stream =================

    @abstractmethod
    def residual_in(self, layer: int) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream entering ``layer`` (for layer 0: the embeddings, positional ones included)."""

    @abstractmethod
    def residual_after_attn(self, layer: int) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream after the attention of ``layer``, before its FFN."""

    @abstractmethod
    def residual_out(self, layer: int) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream leaving ``layer`` (the next layer's input)."""

    def parallel_blocks(self) -> bool:
        """Whether attention and FFN of a block both read its input (GPT-NeoX, GPT-J, Phi-2); the FFN
        then does not read :meth:`residual_after_attn`. ``False`` unless an implementation says so."""
        return False

    # ================= feed-forward =================

    @abstractmethod
    def ffn_out(self, layer: int) -> Float[Tensor, "batch pos d_model"]:
        """What the FFN of ``layer`` adds to the residual stream."""

    @abstractmethod
    def decomposed_ffn_out(self, batch_i: int, layer: int, pos: int) -> Float[Tensor, "hidden d_model"]:
        """The vector each neuron adds to the residual stream: its activation times its output vector."""

    @abstractmethod
    def neuron_activations(self, batch_i: int, layer: int, pos: int) -> Float[Tensor, d_ffn]:
        """The FFN's hidden layer right after the activation function (for gated MLPs: times the up
        projection), i.e. the input of the output projection."""

    @abstractmethod
    def neuron_output(self, layer: int, neuron: int) -> Float[Tensor, d_model]:
        """The vector the neuron adds to the residual stream per unit of activation (a row of
        ``W_out``; no activation involved)."""

    # ================= attention =================

    @abstractmethod
    def attention_matrix(self, batch_i: int, layer: int, head: int) -> Float[Tensor, "query_pos key_pos"]:
        """The (lower-triangular) attention pattern of one head."""

    @abstractmethod
    def attention_output_per_head(
        self, batch_i: int, layer: int, pos: int, head: int
    ) -> Float[Tensor, d_model]:
        """What one head adds to the residual stream at ``pos`` (without the output bias, which
        belongs to no head)."""

    @abstractmethod
    def attention_output(
        self, batch_i: int, layer: int, pos: int, head: Optional[int] = None
    ) -> Float[Tensor, d_model]:
        """What the attention of ``layer`` adds to the residual stream at ``pos`` (the tool's app calls
        it so); with ``head``, :meth:`attention_output_per_head` (the seed interface's signature)."""

    @abstractmethod
    def decomposed_attn(self, batch_i: int, layer: int) -> Float[Tensor, "target source head d_model"]:
        """The vector each (source token, head) contributes to each target token's attention output.

        Axis order ``[target, source, head, d_model]``: target = query position (this layer's
        token), source = key position (the token of the previous layer it reads from).
        """

    def decomposed_attn_rows(
        self, batch_i: int, layer: int, start: int, stop: int
    ) -> Float[Tensor, "target source head d_model"]:
        """Rows ``start:stop`` (targets) of :meth:`decomposed_attn`, with sources ``0..stop-1`` only
        (causal: later sources contribute nothing). Implementations compute just these rows, so a
        caller can walk a layer in chunks of targets and never hold the whole decomposition."""
        return self.decomposed_attn(batch_i, layer)[start:stop, :stop]


class TransformerLensTransparentLlm(TransparentLlm):
    """:class:`TransparentLlm` over a TransformerLens 4 ``TransformerBridge``, exact on its raw numerics.

    Args:
        model: The model (any ``TransformerBridge``: toys, SmolLM2, the induction model). It is not
            modified; hooks are installed for one forward pass per :meth:`run` and removed.
        name: Name for :meth:`model_info` (default: the name minterp_tl gave the model).
        prepend_bos: For string sentences, passed to ``model.to_tokens`` (``None``: the model's default).

    State after :meth:`run` (``L`` = n_layers, ``B`` = batch, ``P`` = padded positions):

    - per layer ``[B, P, d_model]``: ``hook_resid_pre``, ``hook_resid_mid`` (not on attention-only
      models), ``hook_resid_post``, ``hook_attn_out``, ``hook_mlp_out``;
    - per layer ``attn.hook_v`` ``[B, P, n_kv_heads, d_head]`` and ``attn.hook_pattern``
      ``[B, n_heads, P, P]``; ``mlp.hook_post`` ``[B, P, d_mlp]``;
    - the logits ``[B, P, d_vocab]``.

    Sentences of different lengths are padded on the right; positions past a sentence's own length
    (see :meth:`n_tokens`) hold padding and mean nothing.
    """

    def __init__(
        self, model: TransformerBridge, *, name: Optional[str] = None, prepend_bos: Optional[bool] = None
    ) -> None:
        if not isinstance(model, TransformerBridge):
            raise ValueError(
                f"TransformerLensTransparentLlm needs a TransformerBridge, got {type(model).__name__}."
            )
        self.model = model
        self._wrapper = ModelWrapper(model)
        self._info = model_info(model, name)
        self._prepend_bos = prepend_bos
        cfg = model.cfg
        self._n_layers = int(cfg.n_layers)
        self._n_heads = int(cfg.n_heads)
        self._n_kv = n_heads(cfg, "attn.hook_k")
        self._has_mlp = not bool(getattr(cfg, "attn_only", False))
        # Parallel blocks (GPT-NeoX, GPT-J, Phi-2): attention and MLP both read the block input.
        self._parallel = self._has_mlp and bool(getattr(cfg, "parallel_attn_mlp", False))
        # Post-norms (Gemma-2/3, OLMo-2): hook_attn_out / hook_mlp_out are taken after them.
        self._post = {
            kind: f"blocks.0.{ln}.hook_scale" in model.hook_dict
            for kind, ln in (("attn", "ln1_post"), ("mlp", "ln2_post"))
        }
        self._batch: Optional[Batch] = None
        self._logits: Optional[Tensor] = None
        self._saved: dict[str, Tensor] = {}
        self._vo_cache: Optional[tuple[tuple[int, int], Tensor]] = None

    # ---- general ------------------------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        return self._info

    def run(self, sentences: Union[list[str], Prompts]) -> None:
        """Run one forward pass on ``sentences`` and keep the states the accessors need.

        Args:
            sentences: A list of strings (models with a tokenizer), or token ids (a ``[batch, pos]``
                tensor or lists of ids) for models without one.
        """
        if isinstance(sentences, str):
            sentences = [sentences]
        states = ["resid_pre", "resid_post", "attn_out", "v", "pattern"]
        if self._has_mlp:
            states += ["mlp_out", "mlp_post"] + ([] if self._parallel else ["resid_mid"])
        states += [
            f"{ln}.hook_scale" for kind, ln in (("attn", "ln1_post"), ("mlp", "ln2_post")) if self._post[kind]
        ]
        config = StateConfig(
            save=tuple(SaveRule(hook=s, layers="all", positions="all", heads="all") for s in states)
        )
        context = RepresentationContext(
            sentences, layers="all", positions="all", heads="all", prepend_bos=self._prepend_bos
        )
        out = self._wrapper.run(context, StateManager({"transparent": config}), phase="transparent")
        self._batch, self._logits, self._saved = out.batch, out.logits, dict(out.saved)
        self._vo_cache = None

    def batch_size(self) -> int:
        return len(self._state().lengths)

    def n_tokens(self, batch_i: int) -> int:
        """The number of real (not padding) tokens of sentence ``batch_i``."""
        return self._state().lengths[self._index(batch_i, self.batch_size(), "batch_i")]

    def tokens(self) -> Int[Tensor, "batch pos"]:
        return self._state().tokens

    def tokens_to_strings(self, tokens: Int[Tensor, pos]) -> list[str]:
        ids = [int(t) for t in torch.as_tensor(tokens).reshape(-1)]
        if self.model.tokenizer is None:
            return [str(i) for i in ids]
        return [self.model.tokenizer.decode([i]) for i in ids]

    def logits(self) -> Float[Tensor, "batch pos d_vocab"]:
        self._state()
        assert self._logits is not None
        return self._logits

    @torch.no_grad()
    def unembed(self, t: Float[Tensor, d_model], normalize: bool) -> Float[Tensor, vocab]:
        t = torch.as_tensor(t)
        if t.shape != (self._info.d_model,):
            raise ValueError(
                f"unembed: t must be a [d_model] = [{self._info.d_model}] vector, got shape {tuple(t.shape)}"
            )
        x = t.reshape(1, 1, -1).to(self.model.cfg.device, self.model.cfg.dtype)
        return readout(self.model, x, normalize=normalize)[0, 0]

    # ---- residual stream ----------------------------------------------------------------------
    def residual_in(self, layer: int) -> Float[Tensor, "batch pos d_model"]:
        return self._get("blocks.{}.hook_resid_pre", layer)

    def residual_after_attn(self, layer: int) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream after the attention of ``layer``. In a parallel block (see
        :meth:`parallel_blocks`) the MLP does not read it: it is ``residual_in + attention output``, what
        the block would output without its MLP, so ``residual_after_attn + ffn_out == residual_out``
        holds for every block."""
        if not self._has_mlp:
            return self._get("blocks.{}.hook_resid_post", layer)
        if self._parallel:
            return self._get("blocks.{}.hook_resid_pre", layer) + self._get("blocks.{}.hook_attn_out", layer)
        return self._get("blocks.{}.hook_resid_mid", layer)

    def parallel_blocks(self) -> bool:
        """Whether attention and FFN of a block both read the block's input (GPT-NeoX / Pythia, GPT-J,
        Phi-2): ``residual_out = residual_in + attention output + ffn_out``, and the FFN reads
        ``residual_in``, not ``residual_after_attn``."""
        return self._parallel

    def residual_out(self, layer: int) -> Float[Tensor, "batch pos d_model"]:
        return self._get("blocks.{}.hook_resid_post", layer)

    # ---- feed-forward -------------------------------------------------------------------------
    def ffn_out(self, layer: int) -> Float[Tensor, "batch pos d_model"]:
        if not self._has_mlp:
            return torch.zeros_like(self.residual_out(layer))
        return self._get("blocks.{}.hook_mlp_out", layer)

    def ffn_output_bias(self, layer: int) -> Float[Tensor, d_model]:
        """The FFN output projection's bias (zeros if it has none or there is no FFN): the part of
        :meth:`ffn_out` that no neuron writes."""
        layer = self._layer(layer)
        if not self._has_mlp:
            return torch.zeros(self._info.d_model, dtype=self.model.cfg.dtype, device=self.model.cfg.device)
        return self._no_bias_under_post_norm("mlp", layer, self._ffn_weights(layer)[1])

    def decomposed_ffn_out(self, batch_i: int, layer: int, pos: int) -> Float[Tensor, "hidden d_model"]:
        act = self.neuron_activations(batch_i, layer, pos)
        w_out, _ = self._ffn_weights(self._layer(layer))
        parts = act[:, None] * w_out
        b, p = self._bp(batch_i, pos)
        factor = self._post_factor("mlp", b, self._layer(layer))
        return parts if factor is None else parts * factor[p]

    def neuron_activations(self, batch_i: int, layer: int, pos: int) -> Float[Tensor, d_ffn]:
        self._need_mlp("neuron_activations")
        post = self._get("blocks.{}.mlp.hook_post", layer)
        b, p = self._bp(batch_i, pos)
        return post[b, p]

    def neuron_output(self, layer: int, neuron: int) -> Float[Tensor, d_model]:
        self._need_mlp("neuron_output")
        w_out, _ = self._ffn_weights(self._layer(layer))
        return w_out[self._index(neuron, w_out.shape[0], "neuron")]

    # ---- attention ----------------------------------------------------------------------------
    def attention_matrix(self, batch_i: int, layer: int, head: int) -> Float[Tensor, "query_pos key_pos"]:
        pattern = self._get("blocks.{}.attn.hook_pattern", layer)
        b = self._index(batch_i, pattern.shape[0], "batch_i")
        return pattern[b, self._index(head, self._n_heads, "head")]

    def attention_output_bias(self, layer: int) -> Float[Tensor, d_model]:
        """The attention output projection's bias ``b_O`` (zeros if none): the part of the attention
        output that no (source, head) writes."""
        layer = self._layer(layer)
        return self._no_bias_under_post_norm("attn", layer, self._attn_weights(layer)[1])

    @torch.no_grad()
    def attention_output(
        self, batch_i: int, layer: int, pos: int, head: Optional[int] = None
    ) -> Float[Tensor, d_model]:
        """The attention's ``hook_attn_out`` at ``(batch_i, pos)``: every head's output, the output bias and
        any post-norm (``residual_in + attention_output == residual_after_attn``); with ``head``,
        :meth:`attention_output_per_head`."""
        if head is not None:
            return self.attention_output_per_head(batch_i, layer, pos, head)
        b, p = self._bp(batch_i, pos)
        return self._get("blocks.{}.hook_attn_out", self._layer(layer))[b, p]

    @torch.no_grad()
    def attention_output_per_head(
        self, batch_i: int, layer: int, pos: int, head: int
    ) -> Float[Tensor, d_model]:
        b, p = self._bp(batch_i, pos)
        h = self._index(head, self._n_heads, "head")
        layer = self._layer(layer)
        pattern = self._get("blocks.{}.attn.hook_pattern", layer)[b, h, p, : p + 1]  # [source]
        v = self._get("blocks.{}.attn.hook_v", layer)[b, : p + 1, self._kv(h)]  # [source, d_head]
        w_o, _ = self._attn_weights(layer)
        out = (pattern @ v) @ w_o[h]
        factor = self._post_factor("attn", b, layer)
        return out if factor is None else out * factor[p]

    def decomposed_attn(self, batch_i: int, layer: int) -> Float[Tensor, "target source head d_model"]:
        n = self._state().tokens.shape[1]
        rows = self.decomposed_attn_rows(batch_i, layer, 0, n)
        return rows

    @torch.no_grad()
    def decomposed_attn_rows(
        self, batch_i: int, layer: int, start: int, stop: int
    ) -> Float[Tensor, "target source head d_model"]:
        n = self._state().tokens.shape[1]
        if not 0 <= start < stop <= n:
            raise ValueError(
                f"decomposed_attn_rows: need 0 <= start < stop <= {n} (positions), got {start}:{stop}"
            )
        b = self._index(batch_i, self.batch_size(), "batch_i")
        layer = self._layer(layer)
        pattern = self._get("blocks.{}.attn.hook_pattern", layer)[b, :, start:stop, :stop]  # [head, t, s]
        vo = self._value_outputs(b, layer, stop)  # [s, head, d_model]
        parts = pattern.permute(1, 2, 0)[..., None] * vo[None]
        factor = self._post_factor("attn", b, layer)
        return parts if factor is None else parts * factor[start:stop, None, None, :]

    @torch.no_grad()
    def value_outputs(
        self, batch_i: int, layer: int, n_sources: Optional[int] = None
    ) -> Float[Tensor, "source head d_model"]:
        """``v[s, kv(h)] @ W_O[h]`` for every source position and query head: what head ``h`` would
        write if it attended only to ``s``. ``decomposed_attn[t, s, h] = pattern[h, t, s] * this[s, h]``
        (times the post-attention norm's factor of target ``t`` on models with one, see
        :meth:`post_norm_factor`).

        Args:
            batch_i: The sentence.
            layer: The layer.
            n_sources: Only the first ``n_sources`` positions (default: all).
        """
        return self._value_outputs(batch_i, layer, n_sources).clone()

    def _value_outputs(
        self, batch_i: int, layer: int, n_sources: Optional[int] = None
    ) -> Float[Tensor, "source head d_model"]:
        b = self._index(batch_i, self.batch_size(), "batch_i")
        layer = self._layer(layer)
        key = (b, layer)
        if self._vo_cache is None or self._vo_cache[0] != key:
            # One layer's worth (every position) is kept, so walking a layer in chunks of targets
            # computes it once.
            v = self._get("blocks.{}.attn.hook_v", layer)[b]  # [s, kv, d_head]
            w_o, _ = self._attn_weights(layer)
            w_o = w_o.reshape(
                self._n_kv, self._n_heads // self._n_kv, *w_o.shape[1:]
            )  # [kv, group, d_head, d_model]
            vo = torch.einsum("skd,kgdm->skgm", v, w_o).reshape(v.shape[0], self._n_heads, -1)
            self._vo_cache = (key, vo)
        return self._vo_cache[1][:n_sources]

    # ---- post-norms ---------------------------------------------------------------------------
    def post_norm_factor(self, kind: str, batch_i: int, layer: int) -> Optional[Float[Tensor, "pos d_model"]]:
        """The per-token linear map of a post-norm (Gemma-2/3, OLMo-2), or ``None`` without one.

        A post-RMSNorm maps the block's raw output ``x[t]`` to ``gain * x[t] / scale[t]`` with ``scale[t]``
        the RMS of the whole ``x[t]``: at fixed ``scale[t]`` it is linear, so each part of ``x[t]`` (a
        head's and source's vector, a neuron's vector) maps exactly to ``gain * part / scale[t]``, and the
        parts still add up to ``hook_attn_out`` / ``hook_mlp_out``. Returns ``gain / scale[t]``, one row
        per position.

        Args:
            kind: ``"attn"`` (``ln1_post``) or ``"mlp"`` (``ln2_post``).
            batch_i: The sentence.
            layer: The layer.
        """
        if kind not in self._post:
            raise ValueError(f"post_norm_factor: kind must be 'attn' or 'mlp', got {kind!r}")
        b = self._index(batch_i, self.batch_size(), "batch_i")
        return self._post_factor(kind, b, self._layer(layer))

    def _post_factor(self, kind: str, b: int, layer: int) -> Optional[Tensor]:
        if not self._post[kind]:
            return None
        ln_name = "ln1_post" if kind == "attn" else "ln2_post"
        ln: Any = getattr(self.model.blocks[layer], ln_name)
        if not getattr(ln, "uses_rms_norm", False):
            raise ValueError(
                f"model {self._info.name!r}: blocks.{layer}.{ln_name} is a LayerNorm post-norm, which "
                "the decompositions do not support (RMSNorm post-norms are supported)"
            )
        weight = ln.weight.detach()
        gain = 1.0 + weight if getattr(ln, "uses_weight_offset", False) else weight
        scale = self._get("blocks.{}." + ln_name + ".hook_scale", layer)[b]  # [pos, 1]
        return gain / scale

    def _no_bias_under_post_norm(self, kind: str, layer: int, bias: Tensor) -> Tensor:
        """An output bias is one vector only without a post-norm (with one it would be per token)."""
        if self._post[kind] and bool(bias.abs().max() > 0):
            raise ValueError(
                f"model {self._info.name!r}: layer {layer}'s {kind} output bias passes through a "
                "post-norm, so it is a different vector at every token; decompositions of such "
                "models are not supported"
            )
        return bias

    # ---- helpers ------------------------------------------------------------------------------
    def _state(self) -> Batch:
        if self._batch is None:
            raise RuntimeError("TransparentLlm: call run(sentences) before reading the model's state.")
        return self._batch

    def _index(self, i: int, n: int, what: str) -> int:
        return index(i, n, what)

    def _layer(self, layer: int) -> int:
        return self._index(layer, self._n_layers, "layer")

    def _bp(self, batch_i: int, pos: int) -> tuple[int, int]:
        batch = self._state()
        return self._index(batch_i, len(batch.lengths), "batch_i"), self._index(
            pos, batch.tokens.shape[1], "pos"
        )

    def _kv(self, head: int) -> int:
        return head // (self._n_heads // self._n_kv)

    def _get(self, template: str, layer: int) -> Tensor:
        self._state()
        return self._saved[template.format(self._layer(layer))]

    def _need_mlp(self, what: str) -> None:
        if not self._has_mlp:
            raise ValueError(f"{what}: model {self._info.name!r} is attention-only; it has no FFN neurons")

    def _attn_weights(
        self, layer: int
    ) -> tuple[Float[Tensor, "head d_head d_model"], Float[Tensor, d_model]]:
        attn: Any = self.model.blocks[layer].attn
        return _weight_and_bias(attn.W_O, attn.b_O)

    def _ffn_weights(self, layer: int) -> tuple[Float[Tensor, "d_mlp d_model"], Float[Tensor, d_model]]:
        mlp: Any = self.model.blocks[layer].mlp
        return _weight_and_bias(mlp.W_out, mlp.b_out)


def _weight_and_bias(weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """An output projection's weight ``[..., d_model]`` and bias (zeros when it has none), detached."""
    weight = weight.detach()
    if bias is None:
        return weight, torch.zeros(weight.shape[-1], dtype=weight.dtype, device=weight.device)
    return weight, bias.detach()


__all__ = ["ModelInfo", "TransparentLlm", "TransformerLensTransparentLlm"]
