"""The task the edge tests share: which models they run on, a clean/corrupted pair and a metric."""

from __future__ import annotations

from typing import Any

import torch

EDGE_FAMILIES = [
    "gpt2",
    "gpt_neox",
    "gptj",
    "opt",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "phi",
    "phi3",
]
EDGE_FAMILIES += ["olmo", "bloom"]
"""The families edges are defined on (every one without post-norms)."""

EDGE_MODELS = EDGE_FAMILIES + ["toy:ln", "toy:gqa", "toy:attn_only", "induction"]
"""Those families and the native models (no per-head forks: virtual forks)."""


def pick(name: str, hf_model: Any, toys: Any, induction_model: Any) -> Any:
    """The model of ``name`` in :data:`EDGE_MODELS`, from the session fixtures."""
    if name.startswith("toy:"):
        return toys[name[4:]]
    return induction_model if name == "induction" else hf_model(name)


def pair(model: Any, batch: int = 2, n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Random clean prompts and corrupted ones that differ at position 1 only."""
    torch.manual_seed(1)
    clean = torch.randint(0, model.cfg.d_vocab, (batch, n))
    corrupted = clean.clone()
    corrupted[:, 1] = (corrupted[:, 1] + 7) % model.cfg.d_vocab
    return clean, corrupted


def metric(logits: torch.Tensor) -> torch.Tensor:
    """Mean logit difference of tokens 3 and 5 at the last position."""
    return (logits[:, -1, 3] - logits[:, -1, 5]).mean()
