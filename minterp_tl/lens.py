"""The logit lens: every layer's residual stream read out through the final norm and unembedding.

For each prompt, :func:`logit_lens` saves the residual stream entering every block
(``blocks.{l}.hook_resid_pre``) and leaving the last one (``blocks.{n-1}.hook_resid_post``) -- only
those hooks, through :class:`minterp_tl.wrapper.ModelWrapper` -- and projects each through
``model.ln_final`` and ``model.unembed``. Row ``l`` of the result is "what the model would say after
``l`` blocks"; the last row (after all blocks) is the model's own output, exactly.

Numerics: the model's own (raw HF weights, no LayerNorm folding); ``ln_final`` is applied with its
learned scale, as in the model's forward pass.

:class:`LensResult` gives top-k tokens with probabilities, the probability and rank of chosen answer
tokens, a text table, and a layers x positions heatmap PNG with the top token written in each cell. It
keeps the residual states and reads them out in chunks of at most ``memory_budget`` bytes of logits, so
a long prompt costs the states (``layers x positions x d_model``), not ``layers x positions x d_vocab``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from minterp_tl._checks import index, positive_int
from minterp_tl._files import save_png
from minterp_tl.context import Prompts, RepresentationContext
from minterp_tl.specs import SpecLike
from minterp_tl.state import StateManager
from minterp_tl.wrapper import Batch, ModelWrapper

_MAX_TEXT_COLUMNS = 48  # the heatmap writes each cell's top token up to this many positions

DEFAULT_MEMORY_BUDGET = 256 * 2**20
"""Bytes of logits a :class:`LensResult` computes at a time (per chunk of cells)."""


@dataclass(eq=False)
class LensResult:
    """The logit lens of every layer x selected position of every prompt.

    It holds the residual stream states (``[n_layers + 1, batch, k, d_model]``), not the logits: top-k
    tokens, answer probabilities and ranks are computed from them in chunks of at most
    ``memory_budget`` bytes of logits, so memory grows with what is asked for, not with
    ``layers x positions x d_vocab``. :attr:`logits` materialises every cell's logits when you want them.

    Attributes:
        resid: ``[n_layers + 1, batch, k, d_model]``; row ``l < n_layers`` is ``resid_pre`` of block ``l``
            (row 0 is the embeddings), the last row is the final ``resid_post``.
        positions: ``[batch, k]`` positions (in the right-padded batch) of the ``k`` columns.
        batch: The tokenized prompts.
        layer_labels: One label per row: ``"embed"``, ``"L0"``, ... ``"L{n-1}"`` (row ``l`` = output of
            block ``l - 1``).
        model: The model (its final norm, unembedding and soft-capping read the states out).
        tokenizer: Used to write tokens as text (``None``: token ids).
        memory_budget: Bytes of logits computed at a time.
    """

    resid: Float[Tensor, "layer batch pos d_model"]
    positions: Int[Tensor, "batch pos"]
    batch: Batch
    layer_labels: list[str]
    model: Any = None
    tokenizer: Any = None
    memory_budget: int = DEFAULT_MEMORY_BUDGET

    @property
    def n_rows(self) -> int:
        return int(self.resid.shape[0])

    @property
    def d_vocab(self) -> int:
        return int(self.model.cfg.d_vocab)

    def _cells(self, fn: Any, prompt: Optional[int] = None, position: Optional[int] = None) -> Tensor:
        """``fn(logits [cells, d_vocab], cell_index [cells]) -> [cells, ...]`` over every cell (or one
        prompt / column: those axes are then kept with size 1), in chunks within the memory budget;
        returns ``[rows, batch, k, ...]``."""
        resid = self.resid
        if prompt is not None:
            resid = resid[:, prompt : prompt + 1 if prompt != -1 else None]
        if position is not None:
            resid = resid[:, :, position : position + 1 if position != -1 else None]
        shape = resid.shape[:3]
        flat = resid.reshape(-1, resid.shape[-1])
        per_chunk = max(1, self.memory_budget // (4 * 3 * self.d_vocab))  # logits, softmax and a comparison
        outs = []
        with torch.no_grad():
            for start in range(0, flat.shape[0], per_chunk):
                logits = readout(self.model, flat[None, start : start + per_chunk])[0].float()
                outs.append(fn(logits, torch.arange(start, start + logits.shape[0])))
        out = torch.cat(outs)
        return out.reshape(*shape, *out.shape[1:])

    @property
    def logits(self) -> Float[Tensor, "layer batch pos d_vocab"]:
        """Every cell's logits, ``[n_layers + 1, batch, k, d_vocab]`` (all of them in memory at once)."""
        return self._cells(lambda logits, _: logits)

    def probs(self) -> Float[Tensor, "layer batch pos d_vocab"]:
        """Softmax over the vocabulary, for every cell (all in memory at once)."""
        return self._cells(lambda logits, _: logits.softmax(-1))

    def top_k(
        self, k: int = 5, prompt: Optional[int] = None, position: Optional[int] = None
    ) -> tuple[Float[Tensor, "layer batch pos k"], Int[Tensor, "layer batch pos k"]]:
        """``(probabilities, token ids)`` of the ``k`` most likely tokens in every cell (or only in one
        ``prompt`` / ``position``, kept as axes of size 1)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = min(k, self.d_vocab)

        def top(logits: Tensor, _: Tensor) -> Tensor:
            values = logits.softmax(-1).topk(k, dim=-1)
            return torch.cat([values.values, values.indices.float()], dim=-1)

        both = self._cells(top, prompt, position)
        return both[..., :k], both[..., k:].long()

    def _token_ids(self, tokens: Union[int, str, Sequence[int], Tensor]) -> Tensor:
        """One answer token (id or single-token string) or one per prompt -> ``[batch]`` ids."""
        if isinstance(tokens, str):
            tokens = _single_token(self.tokenizer, tokens)
        ids = torch.as_tensor(tokens, device=self.resid.device).reshape(-1)
        b = self.resid.shape[1]
        if ids.numel() == 1:
            ids = ids.expand(b)
        if ids.numel() != b:
            raise ValueError(f"give one answer token or one per prompt ({b}), got {ids.numel()}")
        if bool((ids < 0).any()) or bool((ids >= self.d_vocab).any()):
            raise ValueError(f"answer token ids must be in 0..{self.d_vocab - 1}, got {ids.tolist()}")
        return ids

    def _answer(self, tokens: Any, prompt: Optional[int], position: Optional[int]) -> tuple[Tensor, Tensor]:
        """``(probability, rank)`` of the answer token(s) in every cell (or one prompt / position)."""
        ids = self._token_ids(tokens)
        b, k = self.resid.shape[1], self.resid.shape[2]
        if prompt is not None:
            ids = ids[prompt : prompt + 1 if prompt != -1 else None]
            b = 1
        k = 1 if position is not None else k
        per_cell = ids.view(1, -1, 1).expand(self.n_rows, b, k).reshape(-1)

        def answer(logits: Tensor, cells: Tensor) -> Tensor:
            chosen = per_cell[cells].to(logits.device)
            value = logits.gather(-1, chosen[:, None])
            prob = logits.softmax(-1).gather(-1, chosen[:, None])[:, 0]
            rank = (logits > value).sum(-1).float()
            return torch.stack([prob, rank], dim=-1)

        both = self._cells(answer, prompt, position)
        return both[..., 0], both[..., 1].long()

    def answer_prob(self, tokens: Union[int, str, Sequence[int], Tensor]) -> Float[Tensor, "layer batch pos"]:
        """Probability of the answer token(s) in every cell."""
        return self._answer(tokens, None, None)[0]

    def answer_rank(self, tokens: Union[int, str, Sequence[int], Tensor]) -> Int[Tensor, "layer batch pos"]:
        """Rank of the answer token(s) in every cell (0 = the top token)."""
        return self._answer(tokens, None, None)[1]

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
        b, n_cols = self.resid.shape[1], self.resid.shape[2]
        prompt, position = index(prompt, b, "prompt"), index(position, n_cols, "position")
        probs, ids = self.top_k(k, prompt, position)  # only this column is computed
        pos = int(self.positions[prompt, position])
        token = self.batch.str_tokens[prompt][pos]
        head = f"logit lens at position {pos} ({token!r}) of prompt {prompt}"
        lines = [
            head,
            f"{'layer':<7}" + "  ".join(f"{'top ' + str(i + 1):<20}" for i in range(probs.shape[-1])),
        ]
        if answer is not None:
            answer_id = int(self._token_ids(answer)[prompt])
            p_answer, r_answer = (x[:, 0, 0] for x in self._answer(answer_id, prompt, position))
            lines[1] += f"  {'P(' + repr(self._text(answer_id)) + ')':>14} {'rank':>6}"
        for row in range(self.n_rows):
            cells = [
                f"{repr(self._text(int(i)))[:12]:<13}{float(p):.3f}  "
                for p, i in zip(probs[row, 0, 0], ids[row, 0, 0])
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

        b = self.resid.shape[1]
        prompt = index(prompt, b, "prompt")
        probs, ids = (x[:, 0, :, 0] for x in self.top_k(1, prompt))  # [rows, cols]
        colour = probs if answer is None else self._answer(answer, prompt, None)[0][:, 0]
        colour = colour.detach().float().cpu()
        rows, cols = colour.shape
        # long prompts: a bounded figure, the top token written only while the cells are wide enough
        fig = Figure(figsize=(min(max(5.0, 1.1 * cols + 2), 40.0), min(max(4.0, 0.28 * rows + 1.5), 30.0)))
        ax = fig.subplots()
        im = ax.imshow(colour.numpy(), aspect="auto", origin="lower", cmap="Blues", vmin=0.0, vmax=1.0)
        if cols <= _MAX_TEXT_COLUMNS:
            for r in range(rows):
                for c in range(cols):
                    text = self._text(int(ids[r, c])).replace("\n", "\\n")[:8]
                    ax.text(
                        c,
                        r,
                        text,
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if float(colour[r, c]) > 0.5 else "black",
                    )
        labels = [repr(self.batch.str_tokens[prompt][int(p)]) for p in self.positions[prompt]]
        step = max(1, cols // _MAX_TEXT_COLUMNS)
        ax.set_xticks(range(0, cols, step))
        ax.set_xticklabels(labels[::step], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(rows))
        ax.set_yticklabels(self.layer_labels, fontsize=6)
        ax.set_xlabel("position")
        ax.set_ylabel("residual stream after")
        what = (
            "P(top token)" if answer is None else f"P({self._text(int(self._token_ids(answer)[prompt]))!r})"
        )
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


def readout(
    model: Any, resid: Float[Tensor, "... d_model"], normalize: bool = True
) -> Float[Tensor, "... d_vocab"]:
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
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> LensResult:
    """Run the logit lens on ``prompts``.

    Args:
        model: A ``TransformerBridge``.
        prompts: A string, strings (padded on the right; positions resolved per prompt), or tokens.
        positions: Position spec (``"all"``, ``"last"``, ``"-3:"``, ``Token(" Paris")``, ...); it must
            select the same number of positions in every prompt.
        prepend_bos: As ``model.to_tokens``.
        memory_budget: Bytes of logits the result computes at a time (its readouts are chunked).

    Returns:
        A :class:`LensResult` with ``n_layers + 1`` rows.
    """
    n = int(model.cfg.n_layers)
    ctx = RepresentationContext(
        prompts,
        layers="all",
        positions=positions,
        hooks=("resid_pre", f"blocks.{n - 1}.hook_resid_post"),
        prepend_bos=prepend_bos,
    )
    manager = StateManager()
    out = ModelWrapper(model).run(ctx, manager, return_logits=False)
    rows = [out.saved[f"blocks.{l}.hook_resid_pre"] for l in range(n)] + [
        out.saved[f"blocks.{n - 1}.hook_resid_post"]
    ]
    b, k = rows[0].shape[0], rows[0].shape[1]
    held = manager.entry("blocks.0.hook_resid_pre").positions
    positions_t = torch.arange(k).expand(b, k) if held is None else held.cpu()
    labels = ["embed"] + [f"L{l}" for l in range(n)]
    return LensResult(
        torch.stack(rows).detach(),
        positions_t,
        out.batch,
        labels,
        model,
        getattr(model, "tokenizer", None),
        positive_int(memory_budget, "memory_budget"),
    )


__all__ = ["DEFAULT_MEMORY_BUDGET", "LensResult", "logit_lens", "readout"]
