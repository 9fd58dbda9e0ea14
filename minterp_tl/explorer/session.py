"""What the explorer shows, as JSON-ready dicts: one prompt run once, every click answered from that run.

An :class:`Explorer` holds one model and the state of its last prompt (a
:class:`~minterp_tl.transparent.TransformerLensTransparentLlm` after ``run``); the contribution graph,
the logit lens and a patching sweep are computed once per prompt (and per threshold / norm / corrupted
prompt) and reused. Bad input raises ``ValueError`` with a message meant for the page.

"Promoted" and "suppressed" tokens of a vector a component writes (a block's, a head's, an FFN's or a
neuron's output) are the largest and smallest entries of its projection to the vocabulary without the
final norm (the direction it pushes the logits); a representation's top tokens are its logit-lens
readout, with the final norm (probabilities).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

import torch
from torch import Tensor
from transformer_lens import ActivationCache

from minterp_tl import patching
from minterp_tl._checks import index, positive_int, text_tokens
from minterp_tl.lens import readout
from minterp_tl.metrics import logit_diff_metric, normalized_metric
from minterp_tl.routes import attention_contributions, build_graph, paths_to_prediction, strongest_paths
from minterp_tl.transparent import TransformerLensTransparentLlm

Json = dict[str, Any]


class Explorer:
    """The explorer's state and answers for one model.

    Args:
        model: A ``TransformerBridge``.
        max_tokens: The longest prompt accepted (tokens, BOS included).
        top_k: Tokens listed per projection.
    """

    def __init__(self, model: Any, *, max_tokens: int = 64, top_k: int = 10) -> None:
        if getattr(model, "tokenizer", None) is None:
            name = getattr(model.cfg, "model_name", "this model")
            raise ValueError(f"model {name!r} has no tokenizer: the explorer reads text prompts")
        self.model = model
        self.max_tokens = positive_int(max_tokens, "max_tokens")
        self.top_k = positive_int(top_k, "top_k")
        self.llm = TransformerLensTransparentLlm(model)
        self.prompt: Optional[str] = None
        self._graphs: OrderedDict[tuple[float, int], Any] = OrderedDict()
        self._patches: OrderedDict[str, Json] = OrderedDict()

    # -- the prompt -----------------------------------------------------------------------------------

    def _tokens(self, prompt: Any, what: str) -> Tensor:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"the {what} is empty: type some text")
        tokens = text_tokens(self.model, prompt, f"the {what}")  # never truncated silently
        if tokens.shape[1] > self.max_tokens:
            raise ValueError(
                f"the {what} is {tokens.shape[1]} tokens long; at most {self.max_tokens} are accepted"
            )
        return tokens

    def run(self, prompt: str) -> Json:
        """Run ``prompt`` (once; every later answer reads this run). Returns its tokens, the model's size
        and the prediction at the last position."""
        self._tokens(prompt, "prompt")
        self.llm.run([prompt])
        self.prompt = prompt
        self._graphs.clear()
        self._patches.clear()
        n = self.llm.n_tokens(0)
        info = self.llm.model_info()
        logits = self.llm.logits()[0, n - 1]
        return {
            "prompt": prompt,
            "tokens": self.llm.tokens_to_strings(self.llm.tokens()[0, :n]),
            "n_layers": info.n_layers,
            "n_heads": info.n_heads,
            "prediction": self._top(logits.softmax(-1), self.top_k),
        }

    def _need_run(self) -> int:
        if self.prompt is None:
            raise ValueError("run a prompt first")
        return self.llm.n_tokens(0)

    # -- projections ----------------------------------------------------------------------------------

    def _strings(self, ids: list[int]) -> list[str]:
        return self.llm.tokens_to_strings(torch.tensor(ids))

    def _top(self, values: Tensor, k: int, largest: bool = True) -> list[Json]:
        top = values.topk(min(k, values.numel()), largest=largest)
        return [
            {"token": t, "value": round(float(v), 6)}
            for t, v in zip(self._strings(top.indices.tolist()), top.values.tolist())
        ]

    def _pushes(self, vector: Tensor) -> Json:
        logits = self.llm.unembed(vector, normalize=False)
        return {"promoted": self._top(logits, self.top_k), "suppressed": self._top(logits, self.top_k, False)}

    def representation(self, layer: int, pos: int) -> Json:
        """The residual stream after block ``layer`` at ``pos`` (``layer = -1``: the embeddings): its top
        tokens, and what block ``layer`` promoted and suppressed there."""
        n = self._need_run()
        p = index(pos, n, "pos")
        n_layers = self.llm.model_info().n_layers
        if not (isinstance(layer, int) and -1 <= layer < n_layers):
            raise ValueError(f"layer must be in -1..{n_layers - 1} (-1: the embeddings), got {layer!r}")
        state = self.llm.residual_in(0)[0, p] if layer == -1 else self.llm.residual_out(layer)[0, p]
        out: Json = {
            "layer": layer,
            "pos": p,
            "top": self._top(self.llm.unembed(state, True).softmax(-1), self.top_k),
        }
        if layer >= 0:
            out.update(self._pushes(state - self.llm.residual_in(layer)[0, p]))
        return out

    def head(self, layer: int, pos: int, head: int) -> Json:
        """What head ``head`` of ``layer`` wrote at ``pos``, projected."""
        n = self._need_run()
        vector = self.llm.attention_output_per_head(0, layer, index(pos, n, "pos"), head)
        return {"layer": layer, "pos": pos, "head": head, **self._pushes(vector)}

    def edge(self, layer: int, target: int, source: int, distance_norm: int = 1) -> Json:
        """The attention edge ``source -> target`` of ``layer``: its heads by their share of the edge (the
        graph's contributions, unthresholded, with ``distance_norm``), and what the strongest head wrote at
        ``target``."""
        n = self._need_run()
        t, s = index(target, n, "target"), index(source, n, "source")
        if s > t:
            raise ValueError(f"source {s} comes after target {t}: attention only reads earlier positions")
        layer = index(layer, self.llm.model_info().n_layers, "layer")
        c_attn, _ = attention_contributions(self.llm, 0, layer, n_tokens=n, distance_norm=distance_norm)
        share = c_attn[t, s] / c_attn[t, s].sum()
        order = share.argsort(descending=True).tolist()
        heads = [{"head": h, "share": round(float(share[h]), 6)} for h in order]
        return {
            "layer": layer,
            "target": t,
            "source": s,
            "heads": heads,
            "top_head": self.head(layer, t, order[0]),
        }

    def ffn(self, layer: int, pos: int) -> Json:
        """The FFN of ``layer`` at ``pos``: what it promoted and suppressed, and its top neurons by
        contribution (|out|_1 - |out - neuron's vector|_1, the graph's rule)."""
        n = self._need_run()
        p = index(pos, n, "pos")
        parts = self.llm.decomposed_ffn_out(0, layer, p)  # [hidden, d_model]
        out = self.llm.ffn_out(layer)[0, p]
        share = (out.abs().sum() - (out - parts).abs().sum(-1)).clamp_min(0)
        top = share.topk(min(self.top_k, share.numel()))
        acts = self.llm.neuron_activations(0, layer, p)
        neurons = [
            {
                "neuron": i,
                "share": round(float(v / share.sum().clamp_min(1e-12)), 6),
                "activation": round(float(acts[i]), 6),
            }
            for i, v in zip(top.indices.tolist(), top.values.tolist())
        ]
        return {"layer": layer, "pos": p, "neurons": neurons, **self._pushes(out)}

    def neuron(self, layer: int, neuron: int) -> Json:
        """What neuron ``neuron`` of ``layer`` writes (its row of the output projection), projected."""
        self._need_run()
        return {"layer": layer, "neuron": neuron, **self._pushes(self.llm.neuron_output(layer, neuron))}

    # -- whole-prompt views -----------------------------------------------------------------------------

    def graph(self, token: int = -1, threshold: float = 0.04, distance_norm: int = 1, k: int = 5) -> Json:
        """The contribution graph leading to the prediction at ``token`` (edges above ``threshold``) and
        its ``k`` strongest paths; built once per (threshold, norm) for this prompt."""
        n = self._need_run()
        t = index(token, n, "token")
        key = (float(threshold), int(distance_norm) if distance_norm in (1, 2) else -1)
        graph = self._graphs.get(key)
        if graph is None:
            graph = build_graph(self.llm, 0, threshold=threshold, distance_norm=distance_norm, progress=False)
            self._graphs[key] = graph
            while len(self._graphs) > 8:
                self._graphs.popitem(last=False)
        sub = paths_to_prediction(graph, t)
        tokens = graph.graph["tokens"]
        return {
            "token": t,
            "threshold": key[0],
            "nodes": [{"id": u, **d} for u, d in sub.nodes(data=True)],
            "edges": [
                {
                    "source": u,
                    "target": v,
                    "weight": round(d["weight"], 6),
                    "heads": [round(h, 6) for h in d.get("heads", [])],
                }
                for u, v, d in sub.edges(data=True)
            ],
            "paths": [
                {"weight": round(r.weight, 6), "nodes": list(r.nodes), "text": r.describe(tokens)}
                for r in strongest_paths(graph, t, k=k)
            ],
        }

    def _lens_cells(self, states: Tensor) -> list[Json]:
        """Top token and probability of each state of ``states [..., d_model]`` (in one readout)."""
        probs = readout(self.model, states.reshape(1, -1, states.shape[-1]), normalize=True)[0].softmax(-1)
        best = probs.max(-1)
        return [
            {"token": tok, "prob": round(float(p), 6)}
            for tok, p in zip(self._strings(best.indices.tolist()), best.values.tolist())
        ]

    def lens(self) -> Json:
        """The logit lens of the prompt: for each layer output (row 0: the embeddings) and position, the
        top token and its probability."""
        n = self._need_run()
        n_layers = self.llm.model_info().n_layers
        rows = [self.llm.residual_in(0)[0, :n]] + [self.llm.residual_out(l)[0, :n] for l in range(n_layers)]
        cells = self._lens_cells(torch.stack(rows))
        return {
            "rows": ["embed"] + [f"L{l}" for l in range(n_layers)],
            "cells": [cells[r * n : (r + 1) * n] for r in range(len(rows))],
        }

    def patch(self, corrupted_prompt: str) -> Json:
        """Patching of the residual stream (``resid_pre`` of each block x each position) from this prompt
        into ``corrupted_prompt`` (same token length), with the batched engine. The metric is the logit
        difference, at the last position, between this prompt's predicted token and the corrupted one's,
        scaled so that the clean run is 1 and the corrupted run 0."""
        n = self._need_run()
        corrupted = self._tokens(corrupted_prompt, "corrupted prompt")
        if corrupted.shape[1] != n:
            raise ValueError(
                f"the corrupted prompt is {corrupted.shape[1]} tokens long and the prompt {n}: patching "
                "pairs them position by position, so they need the same number of tokens"
            )
        if corrupted_prompt in self._patches:
            return self._patches[corrupted_prompt]
        n_layers = self.llm.model_info().n_layers
        # the clean run is the prompt's own run: its logits and residual stream, no second forward
        clean_logits = self.llm.logits()[:1, :n]
        resid = {f"blocks.{l}.hook_resid_pre": self.llm.residual_in(l)[:1, :n] for l in range(n_layers)}
        clean_cache = ActivationCache(resid, self.model)
        with torch.no_grad():
            corrupted_logits = self.model(corrupted)
        answer, wrong = int(clean_logits[0, -1].argmax()), int(corrupted_logits[0, -1].argmax())
        if answer == wrong:
            wrong = int(clean_logits[0, -1].topk(2).indices[1])
        diff = logit_diff_metric(answer, wrong)
        metric = normalized_metric(diff, clean_logits, corrupted_logits)
        values = patching.get_act_patch_resid_pre(self.model, corrupted, clean_cache, metric, progress=False)
        result = {
            "corrupted_prompt": corrupted_prompt,
            "corrupted_tokens": self.llm.tokens_to_strings(corrupted[0]),
            "answer": self._strings([answer])[0],
            "corrupted_answer": self._strings([wrong])[0],
            "rows": [f"L{l}" for l in range(values.shape[0])],
            "values": [[round(float(v), 6) for v in row] for row in values.tolist()],
        }
        self._patches[corrupted_prompt] = result
        while len(self._patches) > 4:
            self._patches.popitem(last=False)
        return result

    def patched_lens(self, corrupted_prompt: str, layer: int, pos: int) -> Json:
        """The logit lens, at the last position, of the corrupted run with ``resid_pre`` of block ``layer``
        at ``pos`` patched from this prompt (a cell of :meth:`patch`)."""
        cell = self.patch(corrupted_prompt)  # checks the prompts
        n = self._need_run()
        n_layers = self.llm.model_info().n_layers
        layer, p = index(layer, n_layers, "layer"), index(pos, n, "pos")
        corrupted = text_tokens(self.model, corrupted_prompt, "the corrupted prompt")
        clean_state = self.llm.residual_in(layer)[0, p]
        states: dict[str, Tensor] = {}

        def put(act: Tensor, hook: Any) -> Tensor:
            act = act.clone()
            act[:, p] = clean_state
            return act

        def keep(name: str) -> Any:
            def hook(act: Tensor, hook: Any) -> None:
                states[name] = act[0, -1].detach()

            return hook

        names = [f"blocks.{l}.hook_resid_pre" for l in range(n_layers)] + [
            f"blocks.{n_layers - 1}.hook_resid_post"
        ]
        with (
            torch.no_grad(),
            self.model.hooks(fwd_hooks=[(names[layer], put)] + [(m, keep(m)) for m in names]),
        ):
            self.model(corrupted)
        cells = self._lens_cells(torch.stack([states[m] for m in names]))
        return {
            "layer": layer,
            "pos": p,
            "value": cell["values"][layer][p],
            "rows": ["embed"] + [f"L{l}" for l in range(n_layers)],
            "cells": cells,
        }


__all__ = ["Explorer"]
