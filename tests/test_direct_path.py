"""Direct-path (edge) patching (minterp_tl.patching.get_act_patch_direct_path[_all_sources]) against
TransformerLens's own functions on every family of the architecture matrix, against hand-written
``run_with_hooks`` where TransformerLens refuses (key/value inputs on GQA models), and on SmolLM2."""

from __future__ import annotations

import warnings

import pytest
import torch
from hf_families import FAMILIES
from transformer_lens import patching as tl_patching

from minterp_tl import _direct_path, _patch_engine, patching

TOL = 1e-4
GQA = {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"}  # n_key_value_heads < n_heads
POST_NORM = {"gemma2", "gemma3", "olmo2"}
NO_FORK = {"gptj", "opt"}  # TransformerLens's attention bridges offer no per-head q/k/v input


def _pair(model, batch: int = 2, pos: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, model.cfg.d_vocab, (batch, pos), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 3:] = torch.randint(3, model.cfg.d_vocab, (batch, pos - 3), generator=gen)
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean)
        _, corrupted_cache = model.run_with_cache(corrupted)
    target = clean_logits[:, -1].argmax(-1)
    metric = patching.logit_diff_metric(target, (target + 1) % model.cfg.d_vocab)
    return corrupted, clean_cache, corrupted_cache, metric


def _by_hand(model, corrupted, clean_cache, corrupted_cache, metric, source, dest, component) -> float:
    """One edge with TransformerLens's hooks: the source head's clean-minus-corrupted write added to one
    destination head's (or key/value head's) fork input."""
    (sl, sh), (dl, dh) = source, dest
    z = f"blocks.{sl}.attn.hook_z"
    w_o = model.blocks[sl].attn.W_O[sh]
    delta = clean_cache[z][:, :, sh] @ w_o - corrupted_cache[z][:, :, sh] @ w_o

    def hook(fork, hook):
        fork = fork.clone()
        fork[:, :, dh] += delta
        return fork

    model.set_use_split_qkv_input(True)
    try:
        with torch.no_grad():
            logits = model.run_with_hooks(
                corrupted, fwd_hooks=[(f"blocks.{dl}.attn.hook_{component}_input", hook)]
            )
    finally:
        model.set_use_split_qkv_input(False)
    return float(metric(logits))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_direct_path_on_every_family(hf_model, family) -> None:
    """Every family: equal to TransformerLens's function (two corrupted prompts, all sources) where it
    runs; on GQA models our key/value paths (per key/value head) equal hand-written hooks; post-norm
    models and models without per-head forks are refused with a clear error, as TransformerLens does."""
    model = hf_model(family)
    corrupted, clean_cache, corrupted_cache, metric = _pair(model)
    args = (model, corrupted, clean_cache, corrupted_cache, metric)
    for component in ("q", "k", "v"):
        if family in POST_NORM:
            with pytest.raises(ValueError, match="post-norm"):
                patching.get_act_patch_direct_path_all_sources(*args, component, verbose=False)
            continue
        if family in NO_FORK:
            with pytest.raises(NotImplementedError, match="query/key/value input"):
                patching.get_act_patch_direct_path_all_sources(*args, component, verbose=False)
            assert not model.cfg.use_split_qkv_input  # the caller's flags are restored
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # BLOOM: full forwards, said once
            ours = patching.get_act_patch_direct_path_all_sources(*args, component, verbose=False)
        assert not model.cfg.use_split_qkv_input
        if family in GQA and component != "q":
            n_kv = model.cfg.n_key_value_heads
            assert ours.shape == (model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_layers, n_kv)
            with pytest.raises(ValueError):  # TransformerLens refuses these
                tl_patching.get_act_patch_direct_path_all_sources(*args, component, verbose=False)
            for source, dest in (((0, 1), (1, 0)), ((0, 3), (1, n_kv - 1))):
                want = _by_hand(*args, source, dest, component)
                assert abs(float(ours[source + dest]) - want) <= TOL, (component, source, dest)
            continue
        ref = tl_patching.get_act_patch_direct_path_all_sources(*args, component, verbose=False)
        assert ours.shape == ref.shape
        with torch.no_grad():
            base = float(metric(model(corrupted)))
        # each path moves the metric by `effect` at most (1e-7 on random BLOOM, 1e-5 on Gemma, 1e-2 on
        # others): ours must agree to 1e-4 and to 1% of that, so doing nothing would fail
        effect = float((ref[0, :, 1] - base).abs().max())
        diff = float((ours - ref).abs().max())
        assert effect > 0 and diff <= min(TOL, 0.01 * effect), (component, diff, effect)


def test_one_source_equals_transformer_lens_and_runs_many_edges_per_forward(hf_model, monkeypatch) -> None:
    """The one-source function equals TransformerLens's (negative indices count from the end), and its
    edges share forwards: fewer forwards than edges."""
    model = hf_model("gpt2")
    corrupted, clean_cache, corrupted_cache, metric = _pair(model)
    args = (model, corrupted, clean_cache, corrupted_cache, metric)
    chunks: list[int] = []
    real = _patch_engine._run_chunk

    def counting(corrupted_run, patches, chunk, *rest):
        chunks.append(len(chunk))
        return real(corrupted_run, patches, chunk, *rest)

    monkeypatch.setattr(_patch_engine, "_run_chunk", counting)
    ours = patching.get_act_patch_direct_path(*args, -2, -1, "k", verbose=False)
    ref = tl_patching.get_act_patch_direct_path(*args, 0, model.cfg.n_heads - 1, "k", verbose=False)
    assert (ours - ref).abs().max() <= TOL and ref.abs().max() > 0
    assert len(chunks) < sum(chunks) == model.cfg.n_heads  # layer 1's heads, in fewer forwards


def test_direct_path_refuses_bad_input_before_any_compute(hf_model, monkeypatch) -> None:
    model = hf_model("llama")
    corrupted, clean_cache, corrupted_cache, metric = _pair(model)
    args = (model, corrupted, clean_cache, corrupted_cache, metric)

    def no_forward(*a, **k):
        raise AssertionError("a forward ran")

    monkeypatch.setattr(_direct_path, "run_patched", no_forward)
    with pytest.raises(ValueError, match="component must be one of"):
        patching.get_act_patch_direct_path(*args, 0, 0, "o")
    with pytest.raises(ValueError, match="src_layer=2 is out of range"):
        patching.get_act_patch_direct_path(*args, 2, 0)
    with pytest.raises(ValueError, match="src_head=4 is out of range"):
        patching.get_act_patch_direct_path(*args, 0, 4)
    with pytest.raises(ValueError, match="corrupted_tokens must be"):
        patching.get_act_patch_direct_path(model, corrupted[0], clean_cache, corrupted_cache, metric, 0, 0)
    shorter = type(clean_cache)({k: v[:, :-1] for k, v in clean_cache.items()}, model)
    with pytest.raises(ValueError, match=r"clean_cache holds .* \[2, 6\], but corrupted_tokens is \[2, 7\]"):
        patching.get_act_patch_direct_path(model, corrupted, shorter, corrupted_cache, metric, 0, 0)
    empty = type(clean_cache)({}, model)
    with pytest.raises(ValueError, match="clean_cache has no 'blocks.0.attn.hook_z'"):
        patching.get_act_patch_direct_path(model, corrupted, empty, corrupted_cache, metric, 0, 0)
    model.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            patching.get_act_patch_direct_path(*args, 0, 0)
    finally:
        model.eval()
    monkeypatch.undo()  # the guard could fail: with it gone, the same call runs
    assert patching.get_act_patch_direct_path(*args, 0, 0, verbose=False).shape == (2, 4)


def test_smollm2_direct_path_equals_transformer_lens(smollm2) -> None:
    """SmolLM2 (GQA, 30 layers): the paths from one head into every later head's query equal
    TransformerLens's, on the IOI pair."""
    model = smollm2
    clean = model.to_tokens("When Mary and John went to the store, John gave a drink to")
    corrupted = model.to_tokens("When Mary and John went to the store, Mary gave a drink to")
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
        _, corrupted_cache = model.run_with_cache(corrupted)
    metric = patching.logit_diff_metric(model.to_single_token(" Mary"), model.to_single_token(" John"))
    args = (model, corrupted, clean_cache, corrupted_cache, metric, 24, 3, "q")
    ours = patching.get_act_patch_direct_path(*args, verbose=False)
    ref = tl_patching.get_act_patch_direct_path(*args, verbose=False)
    assert (ours - ref).abs().max() <= TOL
    assert ref[25:].max() - ref[25:].min() > 1e-4
