"""The logit lens: every layer's residual stream read out through the final norm and unembedding.

For each prompt, :func:`logit_lens` saves the residual stream entering every block
(``blocks.{l}.hook_resid_pre``) and leaving the last one (``blocks.{n-1}.hook_resid_post``) -- only
those hooks, through :class:`minterp_tl.wrapper.ModelWrapper` -- and projects each through
``model.ln_final`` and ``model.unembed``. Row ``l`` of the result is "what the model would say after
``l`` blocks"; the last row (after all blocks) is the model's own output, exactly.

Numerics: the model's own (raw HF weights, no LayerNorm folding); ``ln_final`` is applied with its
learned scale, as in the model's forward pass.

:class:`LensResult` gives top-k tokens with probabilities, the probability and rank of chosen answer
tokens, a text table, and a layers x positions heatmap PNG with the top token written in each cell.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from minterp_tl.context import Prompts, RepresentationContext
from minterp_tl._files import save_png
from minterp_tl.specs import SpecLike
from minterp_tl.state import StateManager
from minterp_tl.wrapper import Batch, ModelWrapper


@dataclass(eq=False)
class LensResult:
    """Logit-lens logits for every layer x selected position of every prompt.

    Attributes:
        logits: ``[n_layers + 1, batch, k, d_vocab]``; row ``l < n_layers`` reads ``resid_pre`` of
            block ``l`` (row 0 is the embeddings), the last row reads the final ``resid_post``.
        positions: ``[batch, k]`` positions (in the right-padded batch) of the ``k`` columns.
        batch: The tokenized prompts.
        layer_labels: One label per row: ``"embed"``, ``"L0"``, ... ``"L{n-1}"`` (row ``l`` = output of
            block ``l - 1``).
        tokenizer: Used to write tokens as text (``None``: token ids).
    """

    logits: Float[Tensor, "layer batch pos d_vocab"]
    positions: Int[Tensor, "batch pos"]
    batch: Batch
    layer_labels: list[str]
    tokenizer: Any = None

    @property
    def n_rows(self) -> int:
        return int(self.logits.shape[0])

    def probs(self) -> Float[Tensor, "layer batch pos d_vocab"]:
        """Softmax over the vocabulary."""
        return self.logits.float().softmax(-1)

    def top_k(self, k: int = 5) -> tuple[Float[Tensor, "layer batch pos k"], Int[Tensor, "layer batch pos k"]]:
        """``(probabilities, token ids)`` of the ``k`` most likely tokens in every cell."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        top = self.probs().topk(min(k, self.logits.shape[-1]), dim=-1)
        return top.values, top.indices

    def _token_ids(self, tokens: Union[int, str, Sequence[int], Tensor]) -> Tensor:
        """One answer token (id or single-token string) or one per prompt -> ``[batch]`` ids."""
        if isinstance(tokens, str):
            tokens = _single_token(self.tokenizer, tokens)
        ids = torch.as_tensor(tokens, device=self.logits.device).reshape(-1)
        b = self.logits.shape[1]
        if ids.numel() == 1:
            ids = ids.expand(b)
        if ids.numel() != b:
            raise ValueError(f"give one answer token or one per prompt ({b}), got {ids.numel()}")
        if bool((ids < 0).any()) or bool((ids >= self.logits.shape[-1]).any()):
            raise ValueError(f"answer token ids must be in 0..{self.logits.shape[-1] - 1}, got {ids.tolist()}")
        return ids

    def answer_prob(self, tokens: Union[int, str, Sequence[int], Tensor]) -> Float[Tensor, "layer batch pos"]:
        """Probability of the answer token(s) in every cell."""
        ids = self._token_ids(tokens)
        probs = self.probs()
        index = ids.view(1, -1, 1, 1).expand(probs.shape[0], -1, probs.shape[2], 1)
        return probs.gather(-1, index)[..., 0]

    def answer_rank(self, tokens: Union[int, str, Sequence[int], Tensor]) -> Int[Tensor, "layer batch pos"]:
        """Rank of the answer token(s) in every cell (0 = the top token)."""
        ids = self._token_ids(tokens)
        index = ids.view(1, -1, 1, 1).expand(self.logits.shape[0], -1, self.logits.shape[2], 1)
        answer = self.logits.gather(-1, index)
        return (self.logits > answer).sum(-1)

    def _text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return str(token_id)
        return self.tokenizer.decode([token_id])

    def table(
        self,
        position: int = -1,
        prompt: int = 0,
        k: int = 5,
        answer: Union[None, int, str] = None,
    ) -> str:
        """A text table for one column: one line per layer with its top-``k`` tokens and
        probabilities, and the answer's probability and rank if ``answer`` is given."""
        b, n_cols = self.logits.shape[1], self.logits.shape[2]
        if not -b <= prompt < b:
            raise ValueError(f"prompt {prompt} is out of range for a batch of {b}")
        if not -n_cols <= position < n_cols:
            raise ValueError(f"position {position} is out of range: the lens has {n_cols} column(s)")
        probs, ids = self.top_k(k)
        pos = int(self.positions[prompt, position])
        token = self.batch.str_tokens[prompt][pos]
        head = f"logit lens at position {pos} ({token!r}) of prompt {prompt}"
        lines = [head, f"{'layer':<7}" + "  ".join(f"{'top ' + str(i + 1):<20}" for i in range(probs.shape[-1]))]
        if answer is not None:
            answer_id = int(self._token_ids(answer)[prompt])
            p_answer = self.answer_prob(answer_id)[:, prompt, position]
            r_answer = self.answer_rank(answer_id)[:, prompt, position]
            lines[1] += f"  {'P(' + repr(self._text(answer_id)) + ')':>14} {'rank':>6}"
        for row in range(self.n_rows):
            cells = [
                f"{repr(self._text(int(i)))[:12]:<13}{float(p):.3f}  "
                for p, i in zip(probs[row, prompt, position], ids[row, prompt, position])
            ]
            line = f"{self.layer_labels[row]:<7}" + "".join(f"{c:<22}" for c in cells)
            if answer is not None:
                line += f"{float(p_answer[row]):>14.4f} {int(r_answer[row]):>6}"
            lines.append(line.rstrip())
        return "\n".join(lines)

    def plot(
        self,
        path: Union[str, Path],
        prompt: int = 0,
        answer: Union[None, int, str] = None,
        title: Optional[str] = None,
    ) -> Path:
        """Save a layers x positions heatmap as a PNG: colour = probability of the top token (or of
        ``answer``), text = the top token. Written to a temporary file and renamed."""
        from matplotlib.figure import Figure  # no pyplot: no global backend, no figure manager

        probs, ids = self.top_k(1)
        colour = probs[:, prompt, :, 0] if answer is None else self.answer_prob(answer)[:, prompt]
        colour = colour.detach().float().cpu()
        rows, cols = colour.shape
        fig = Figure(figsize=(max(5.0, 1.1 * cols + 2), max(4.0, 0.28 * rows + 1.5)))
        ax = fig.subplots()
        im = ax.imshow(colour.numpy(), aspect="auto", origin="lower", cmap="Blues", vmin=0.0, vmax=1.0)
        for r in range(rows):
            for c in range(cols):
                text = self._text(int(ids[r, prompt, c, 0])).replace("\n", "\\n")[:8]
                ax.text(c, r, text, ha="center", va="center", fontsize=6,
                        color="white" if float(colour[r, c]) > 0.5 else "black")
        labels = [repr(self.batch.str_tokens[prompt][int(p)]) for p in self.positions[prompt]]
        ax.set_xticks(range(cols))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(rows))
        ax.set_yticklabels(self.layer_labels, fontsize=6)
        ax.set_xlabel("position")
        ax.set_ylabel("residual stream after")
        what = "P(top token)" if answer is None else f"P({self._text(int(self._token_ids(answer)[prompt]))!r})"
        ax.set_title(title or f"logit lens: {what}, top token in each cell")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        return save_png(fig, path)


def _single_token(tokenizer: Any, text: str) -> int:
    if tokenizer is None:
        raise ValueError(f"answer {text!r} is text, but the model has no tokenizer; give a token id")
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise ValueError(f"answer {text!r} is {len(ids)} tokens {pieces}, not one; give a single token")
    return int(ids[0])


def readout(model: Any, resid: Float[Tensor, "... d_model"], normalize: bool = True) -> Float[Tensor, "... d_vocab"]:
    """Logits of residual stream states, by every transformation the model applies after its last block:
    the final norm (``model.ln_final``; skipped with ``normalize=False``), the unembedding, and final logit
    soft-capping (``cap * tanh(logits / cap)``, Gemma-2's ``final_logit_softcapping``, when
    ``cfg.output_logits_soft_cap > 0``). On the last block's output this is the model's own logits."""
    ln_final = getattr(model, "ln_final", None)
    x = ln_final(resid) if normalize and ln_final is not None else resid
    logits = model.unembed(x)
    cap = float(getattr(model.cfg, "output_logits_soft_cap", 0.0) or 0.0)
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


def logit_lens(
    model: Any,
    prompts: Prompts,
    *,
    positions: SpecLike = "all",
    prepend_bos: Optional[bool] = None,
) -> LensResult:
    """Run the logit lens on ``prompts``.

    Args:
        model: A ``TransformerBridge``.
        prompts: A string, strings (padded on the right; positions resolved per prompt), or tokens.
        positions: Position spec (``"all"``, ``"last"``, ``"-3:"``, ``Token(" Paris")``, ...); it must
            select the same number of positions in every prompt.
        prepend_bos: As ``model.to_tokens``.

    Returns:
        A :class:`LensResult` with ``n_layers + 1`` rows.
    """
    n = int(model.cfg.n_layers)
    ctx = RepresentationContext(
        prompts, layers="all", positions=positions,
        states=("resid_pre", f"blocks.{n - 1}.hook_resid_post"), prepend_bos=prepend_bos,
    )
    manager = StateManager()
    out = ModelWrapper(model).run(ctx, manager, return_logits=False)
    rows = [out.saved[f"blocks.{l}.hook_resid_pre"] for l in range(n)] + [out.saved[f"blocks.{n - 1}.hook_resid_post"]]
    with torch.no_grad():
        logits = torch.stack([readout(model, r) for r in rows])
    b, k = rows[0].shape[0], rows[0].shape[1]
    held = manager.entry("blocks.0.hook_resid_pre").positions
    positions_t = torch.arange(k).expand(b, k) if held is None else held.cpu()
    labels = ["embed"] + [f"L{l}" for l in range(n)]
    return LensResult(logits, positions_t, out.batch, labels, getattr(model, "tokenizer", None))

