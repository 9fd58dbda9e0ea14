"""Tiny random-weight Hugging Face models of several families, built offline for the tests.

Each family is a ``transformers`` config small enough to build and load in about a second, saved with a
byte-level BPE tokenizer trained here with ``tokenizers`` (no hub), then loaded the way a user loads a
local model: ``minterp_tl.load_model(folder)``. ``tests/conftest.py`` builds each once per session.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

VOCAB = 320
_TEXT = [
    "When Mary and John went to the store, John gave a drink to Mary.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "I love you. I hate you. I think that you are so kind.",
] * 20


def _tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_TEXT, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    fast.save_pretrained(folder)


# Every family: 2 layers, d_model 64, 4 query heads (2 key/value heads where the family has GQA), a
# vocabulary of VOCAB tokens. Sliding windows (Mistral, Gemma-2, Gemma-3) are 6 tokens, shorter than
# some test prompts. Each entry: (transformers class names, config keyword arguments).
_SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)
_GQA = dict(_SMALL, num_key_value_heads=2)
_SPECS: dict[str, tuple[str, str, dict]] = {
    # family: (config class, model class, config arguments)                  what the family adds
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",  # Conv1D, learned positions
        dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64),
    ),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(_SMALL)),  # parallel attn + MLP, partial rotary
    "gptj": (
        "GPTJConfig",
        "GPTJForCausalLM",  # parallel block, one LayerNorm
        dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, rotary_dim=8),
    ),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",  # learned positions offset by 2
        dict(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=64,
        ),
    ),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_GQA)),  # RMSNorm, rotary, gated MLP, GQA
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_GQA, sliding_window=6)),  # sliding window
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_GQA)),  # q/k/v biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_GQA, head_dim=16)),  # q/k norms
    "gemma": (
        "GemmaConfig",
        "GemmaForCausalLM",
        dict(_GQA, head_dim=16),
    ),  # (1 + w) RMSNorm, scaled embeddings
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",  # post-norms, soft-capping, window
        dict(_GQA, head_dim=16, sliding_window=6, layer_types=["sliding_attention", "full_attention"]),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",  # post-norms, q/k norms, window
        dict(_GQA, head_dim=16, sliding_window=6, layer_types=["sliding_attention", "full_attention"]),
    ),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(_SMALL, partial_rotary_factor=0.5)),  # parallel block, biases
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_GQA, pad_token_id=2)),  # fused qkv and gate_up
    "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(_SMALL)),  # non-parametric LayerNorm
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(_GQA)),  # post-norms only, q/k norms
    "bloom": (
        "BloomConfig",
        "BloomForCausalLM",  # ALiBi, embedding LayerNorm
        dict(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4),
    ),
}


def _make(family: str) -> Any:
    import transformers

    config_cls, model_cls, kwargs = _SPECS[family]
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs))


FAMILIES: dict[str, Callable[[], Any]] = {family: (lambda f=family: _make(f)) for family in _SPECS}
"""Family name -> a function building a random model of it (seeded by the caller)."""


def build(family: str, folder: Path) -> Path:
    """Save a random ``family`` model and its tokenizer to ``folder`` and return it."""
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    model.save_pretrained(folder)
    _tokenizer(folder)
    return folder
