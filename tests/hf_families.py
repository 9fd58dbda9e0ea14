"""Tiny random-weight Hugging Face models of several families, built offline for the tests.

Each family is a ``transformers`` config small enough to build and load in about a second, saved with a
byte-level BPE tokenizer trained here with ``tokenizers`` (no hub), then loaded the way a user loads a
local model: ``minterp_tl.load_model(folder)``. ``tests/conftest.py`` builds each once per session.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

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
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")
    fast.save_pretrained(folder)


def _gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=64))


def _gpt_neox() -> Any:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=64))


def _llama() -> Any:  # GQA: 4 query heads share 2 key/value heads
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _mistral() -> Any:  # GQA and a sliding attention window of 6 tokens
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=64, sliding_window=6))


FAMILIES: dict[str, Callable[[], Any]] = {
    "gpt2": _gpt2,            # Conv1D projections, learned absolute positions
    "gpt_neox": _gpt_neox,    # parallel attention and MLP, rotary on part of each head
    "llama": _llama,          # RMSNorm, rotary, gated MLP, GQA
    "mistral": _mistral,      # as llama, with a sliding window
}
"""Family name -> a function building a random model of it (seeded by the caller)."""


def build(family: str, folder: Path) -> Path:
    """Save a random ``family`` model and its tokenizer to ``folder`` and return it."""
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    model.save_pretrained(folder)
    _tokenizer(folder)
    return folder
