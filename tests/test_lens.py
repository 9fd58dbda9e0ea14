"""The logit lens against the model's own logits and TransformerLens's cache."""

from __future__ import annotations

import pytest
import torch

from minterp_tl.cli import main
from minterp_tl.lens import logit_lens


def _check_last_row_is_the_model(lens, logits, k: int = 5) -> None:
    probs, ids = lens.top_k(k)
    ref = logits.float().softmax(-1).topk(k, dim=-1)
    assert torch.equal(ids[-1], ref.indices)  # exact tokens at every position
    assert (probs[-1] - ref.values).abs().max() <= 1e-5


def test_lens_rows_equal_manual_readout_on_toys(toys) -> None:
    for kind in ("ln", "gqa", "attn_only"):
        model = toys[kind]
        tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
        lens = logit_lens(model, tokens)
        logits, cache = model.run_with_cache(tokens)
        assert lens.logits.shape == (5, 2, 7, 50) and lens.layer_labels == ["embed", "L0", "L1", "L2", "L3"]
        _check_last_row_is_the_model(lens, logits)
        ln_final = getattr(model, "ln_final", None)
        for layer in range(4):
            resid = cache[f"blocks.{layer}.hook_resid_pre"]
            expected = model.unembed(ln_final(resid) if ln_final is not None else resid)
            assert torch.allclose(lens.logits[layer], expected, atol=1e-5, rtol=0)


def test_answer_prob_rank_and_positions(toys) -> None:
    model = toys["ln"]
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    lens = logit_lens(model, tokens, positions="-2:")
    assert lens.positions.tolist() == [[4, 5], [4, 5]]
    full = logit_lens(model, tokens)
    assert torch.allclose(lens.logits, full.logits[:, :, 4:], atol=1e-5, rtol=0)
    ans = torch.tensor([3, 7])
    p, r = lens.answer_prob(ans), lens.answer_rank(ans)
    probs = lens.probs()
    for b in range(2):
        assert torch.allclose(p[:, b], probs[:, b, :, ans[b]])
        manual = (probs[:, b] > probs[:, b, :, ans[b]].unsqueeze(-1)).sum(-1)
        assert torch.equal(r[:, b], manual)
    top_id = int(lens.top_k(1)[1][2, 0, 1, 0])
    assert int(lens.answer_rank(top_id)[2, 0, 1]) == 0
    with pytest.raises(ValueError, match="one per prompt"):
        lens.answer_prob([1, 2, 3])
    with pytest.raises(ValueError, match="no tokenizer"):
        lens.answer_prob(" Paris")
    with pytest.raises(ValueError, match="out of range"):
        lens.table(position=5)


def test_smollm2_lens_finds_paris_in_the_upper_layers(smollm2, tmp_path) -> None:
    prompt = "The capital of France is"
    lens = logit_lens(smollm2, prompt)
    with torch.no_grad():
        logits = smollm2(prompt)
    _check_last_row_is_the_model(lens, logits)
    rank = lens.answer_rank(" Paris")[:, 0, -1]
    assert int(rank[-1]) == 0
    assert int(rank[10]) > 100 and int(rank[20]) > int(rank[25]) > int(rank[27]) >= int(rank[-1])
    table = lens.table(answer=" Paris")
    assert "' Paris'" in table.splitlines()[-1] and len(table.splitlines()) == 2 + 31
    png = lens.plot(tmp_path / "lens.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
    # a ragged batch: each prompt's own last token
    ragged = logit_lens(smollm2, [prompt, "One, two, three,"], positions="last")
    assert ragged.positions.tolist() == [[5], [6]]
    assert torch.equal(ragged.answer_rank(" Paris")[-1, 0, 0], torch.tensor(0))


def test_cli_lens_prints_the_table_and_writes_the_png(smollm2, tmp_path, capsys) -> None:
    out = tmp_path / "lens.png"
    assert main(["lens", "The capital of France is", "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    last = [line for line in text.splitlines() if line.startswith("L29")][0]
    assert last.split()[1] == "'" and "Paris'" in last  # top token of the last layer
    assert abs(float(last.split()[-2]) - 0.7491) < 1e-3 and last.split()[-1] == "0"
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert main(["lens", "hi", "--out", str(tmp_path / "x.txt")]) == 2
    assert main(["lens", "hi", "--no-progress", "--answer", " Paris France", "--out", str(out)]) == 2
