"""Memory grows with what is shown: a 1,000-token logit lens on a model with a 65,536-token vocabulary
peaks less than 500 MiB above the loaded model, forward pass included (its full logits alone would be 750
MiB), measured as peak RSS
in a fresh subprocess; path enumeration is capped (see test_input_checks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import json, os, resource, sys, tempfile
    from pathlib import Path
    os.environ["HF_HUB_OFFLINE"] = "1"
    sys.path.insert(0, {tests!r})
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    import hf_families
    from minterp_tl import load_model
    from minterp_tl.lens import logit_lens

    folder = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=65536, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=1024)).save_pretrained(folder)
    hf_families._tokenizer(folder)
    model = load_model(str(folder), progress=False)
    tokens = torch.randint(3, 65536, (1, 1000), generator=torch.Generator().manual_seed(0))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lens = logit_lens(model, tokens, memory_budget=32 * 2**20)
    table = lens.table(position=-1, k=5, answer=7)
    probs, ids = lens.top_k(1)           # the heatmap's pass over every cell
    rank = lens.answer_rank(7)
    lens.plot(folder / "lens.png")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({{"base_kib": base, "peak_kib": peak, "cells": list(ids.shape),
                      "rank": list(rank.shape)}}))
    """
)


def test_a_1000_token_lens_stays_within_its_budget(tmp_path):
    tests = str(Path(__file__).parent)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(tests=tests)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["cells"] == [3, 1, 1000, 1] and result["rank"] == [3, 1, 1000]
    grew_mib = (result["peak_kib"] - result["base_kib"]) / 1024
    print(f"lens grew the peak RSS by {grew_mib:.0f} MiB")
    full_logits_mib = 3 * 1000 * 65536 * 4 / 2**20  # 750 MiB: what holding every cell's logits takes
    # the forward pass itself (its [1000, 65536] logits included) is about 316 MiB here
    assert grew_mib < 500, (
        f"the lens grew the peak by {grew_mib:.0f} MiB (bound 500; full logits alone {full_logits_mib:.0f})"
    )
