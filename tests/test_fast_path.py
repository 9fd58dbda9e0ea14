"""The fast path of batched patching (minterp_tl.fast_path), on tiny random Hugging Face models of several
families and on the native toys, against TransformerLens's own patching functions and hand-written hooks."""

from __future__ import annotations

import contextlib
import warnings
import weakref
from unittest import mock

import pytest
import torch
import transformers
from transformer_lens import patching as tl_patching

from minterp_tl import _patch_engine, fast_path, patching
from minterp_tl.fast_path import CorruptedRun, FastPathStatus

TOL = 1e-4
FAMILIES = ["gpt2", "gpt_neox", "llama", "mistral"]


def _pair(model, batch: int, pos: int, differ_at: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, model.cfg.d_vocab, (batch, pos), generator=gen)
    corrupted = clean.clone()
    corrupted[:, differ_at:] = torch.randint(3, model.cfg.d_vocab, (batch, pos - differ_at), generator=gen)
    return clean, corrupted


def _metric(clean_logits):
    target = clean_logits[:, -1].argmax(-1)
    return patching.logit_diff_metric(target, (target + 1) % clean_logits.shape[-1])


def _counting(monkeypatch) -> list[tuple[int, int, int]]:
    """Record (copies, last block a copy joins at, p0) of every chunk's forward."""
    seen: list[tuple[int, int, int]] = []
    real = _patch_engine._forward

    def forward(run, copies, l0, p0, hooks, last_only=False, joins=None):
        seen.append((copies, max(joins) if joins else l0, p0))
        return real(run, copies, l0, p0, hooks, last_only, joins)

    monkeypatch.setattr(_patch_engine, "_forward", forward)
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_is_on_and_exact_on_hf_families(hf_model, family, monkeypatch) -> None:
    """Chunks start at their lowest patched block and position on every family (the prompt fits Mistral's
    window), with the transformers installed; two corrupted prompts per copy, several copies per forward."""
    model = hf_model(family)
    clean, corrupted = _pair(model, batch=2, pos=6)
    clean_logits, cache = model.run_with_cache(clean)
    metric = _metric(clean_logits)
    assert patching.fast_path_status(model, corrupted) == FastPathStatus(True, True, True, per_layer=True), (
        transformers.__version__
    )
    seen = _counting(monkeypatch)
    for fn in (
        "get_act_patch_resid_pre",
        "get_act_patch_attn_head_out_by_pos",
        "get_act_patch_attn_head_k_by_pos",
    ):
        ref = getattr(tl_patching, fn)(model, corrupted, cache, metric)
        assert ref.abs().max() > 1e-3
        for max_batch in (2, 4, 8, None):  # 1, 2, 4 copies per forward and the default
            seen.clear()
            ours = getattr(patching, fn)(model, corrupted, cache, metric, progress=False, max_batch=max_batch)
            assert ours.shape == ref.shape
            assert (ours - ref).abs().max() <= TOL, (fn, max_batch)
            assert any(p0 > 0 for _, _, p0 in seen)  # the fast path ran
            if max_batch == 2:  # one copy per forward: each starts at its own block and position
                assert any(l0 > 0 and p0 > 0 for _, l0, p0 in seen)
    assert patching.fast_path_status(model) == FastPathStatus(True, True, True, per_layer=True)


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_batched_prompts_equal_hand_written_hooks(hf_model, family) -> None:
    """Two corrupted prompts, four copies per forward: a cell equals a hand-written ``run_with_hooks`` patch
    (the cache's rows must be in the residual's order, copy-major)."""
    model = hf_model(family)
    clean, corrupted = _pair(model, batch=2, pos=8)
    clean_logits, cache = model.run_with_cache(clean)
    metric = _metric(clean_logits)
    ours = patching.get_act_patch_resid_pre(model, corrupted, cache, metric, progress=False, max_batch=8)

    def put_clean(act, hook):
        act = act.clone()
        act[:, 5] = cache["blocks.1.hook_resid_pre"][:, 5]
        return act

    with torch.no_grad():
        by_hand = metric(model.run_with_hooks(corrupted, fwd_hooks=[("blocks.1.hook_resid_pre", put_clean)]))
    assert (
        abs(float(ours[1, 5] - by_hand)) <= TOL
        and abs(float(by_hand - metric(model(corrupted).detach()))) > 1e-3
    )


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_our_key_value_cache_holds_the_models_keys(hf_model, family) -> None:
    """The cache we fill (through the keyword shim on transformers >= 5.24) holds, per layer, the keys
    the attention computed: ``hook_rot_k`` (rotary) or ``hook_k``, as ``[batch, kv_heads, pos, d_head]``."""
    model = hf_model(family)
    _, corrupted = _pair(model, batch=2, pos=6)
    run = CorruptedRun(model, corrupted, set())
    assert run.kv is not None, run.kv_reason
    _, cache = model.run_with_cache(corrupted)
    for layer, (keys, values) in enumerate(run.kv):
        name = f"blocks.{layer}.attn.hook_rot_k"
        name = name if name in cache.cache_dict else f"blocks.{layer}.attn.hook_k"
        assert torch.allclose(keys.transpose(1, 2), cache[name], atol=1e-5)
        assert torch.allclose(values.transpose(1, 2), cache[f"blocks.{layer}.attn.hook_v"], atol=1e-5)
    n_layers = model.cfg.n_layers
    past = run.past(3, [2] * n_layers)  # positions 0..2, copy-major rows: b0 b1 b0 b1
    k0 = past.layers[0].keys
    assert k0.shape[0] == 4 and k0.shape[-2] == 3
    assert torch.equal(k0[2:], run.kv[0][0][..., :3, :]) and torch.equal(k0[:2], k0[2:])
    grown = run.past(3, [1] + [3] * (n_layers - 1))  # a copy per layer: the rows active there
    assert grown.layers[0].keys.shape[0] == 2 and grown.layers[-1].keys.shape[0] == 6


def test_sliding_window_is_decided_per_call(hf_model, monkeypatch) -> None:
    """Mistral's window is 6 tokens: a short call resumes at positions, a longer one does not (and says
    why), a short one after it does again; every value equals TransformerLens's."""
    monkeypatch.setattr(fast_path, "_WARNED", weakref.WeakKeyDictionary())
    model = hf_model("mistral")
    for pos, positions in ((6, True), (10, False), (5, True)):
        clean, corrupted = _pair(model, batch=2, pos=pos, seed=pos)
        clean_logits, cache = model.run_with_cache(clean)
        metric = _metric(clean_logits)
        ref = tl_patching.get_act_patch_resid_pre(model, corrupted, cache, metric)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours = patching.get_act_patch_resid_pre(model, corrupted, cache, metric, progress=False)
        status = patching.fast_path_status(model)
        assert (ours - ref).abs().max() <= TOL
        assert status.layers and status.positions == positions
        said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        if positions:
            assert not said
        else:
            assert (
                "sliding attention window of 6 tokens" in status.reason
                and "(this one has 10)" in status.reason
            )
            assert len(said) == 1 and "sliding attention window" in said[0] and "fast_path_status" in said[0]


def test_native_toys_start_at_layers_and_say_why_not_at_positions(toys, monkeypatch) -> None:
    """Native bridges take no key/value cache: the layer start stays on, the position start is off, and
    the reason is warned once per model, not once per call."""
    monkeypatch.setattr(fast_path, "_WARNED", weakref.WeakKeyDictionary())
    model = toys["gqa"]
    clean, corrupted = _pair(model, batch=2, pos=6)
    clean_logits, cache = model.run_with_cache(clean)
    metric = _metric(clean_logits)
    seen = _counting(monkeypatch)
    with pytest.warns(
        RuntimeWarning, match="position start off: the model.s attention layers left the key/value"
    ) as said:
        ours = patching.get_act_patch_attn_head_out_by_pos(model, corrupted, cache, metric, progress=False)
    runtime = [w for w in said if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1 and runtime[0].filename == __file__  # said once, at the caller's line
    status = patching.fast_path_status(model)
    assert status == FastPathStatus(True, False, True, status.reason, per_layer=True)
    assert "key/value cache" in status.reason
    assert any(l0 > 0 for _, l0, _ in seen) and all(p0 == 0 for _, _, p0 in seen)
    ref = tl_patching.get_act_patch_attn_head_out_by_pos(model, corrupted, cache, metric)
    assert (ours - ref).abs().max() <= TOL
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call warns no more
        patching.get_act_patch_resid_pre(model, corrupted, cache, metric, progress=False)


def test_a_start_that_disagrees_is_turned_off(hf_model, monkeypatch) -> None:
    """If resuming at positions gave other logits than the plain run, the check turns it off for the call
    (here: a cache whose keys are damaged), and the sweep still equals TransformerLens's."""
    monkeypatch.setattr(fast_path, "_WARNED", weakref.WeakKeyDictionary())
    model = hf_model("llama")
    clean, corrupted = _pair(model, batch=1, pos=6)
    clean_logits, cache = model.run_with_cache(clean)
    metric = _metric(clean_logits)
    real_past = CorruptedRun.past

    def damaged(self, p0, copies):
        past = real_past(self, p0, copies)
        for layer in past.layers:
            layer.keys.mul_(3.0)
        return past

    monkeypatch.setattr(CorruptedRun, "past", damaged)
    with pytest.warns(RuntimeWarning, match=r"position start off: resuming at block \d+, position 3"):
        ours = patching.get_act_patch_resid_pre(model, corrupted, cache, metric, progress=False)
    status = patching.fast_path_status(model)
    assert status.layers and not status.positions and "differ from the plain run" in status.reason
    assert (ours - tl_patching.get_act_patch_resid_pre(model, corrupted, cache, metric)).abs().max() <= TOL


@pytest.mark.parametrize("max_batch", [2, 64])
def test_a_setter_that_writes_before_its_position_is_exact(hf_model, max_batch) -> None:
    """A custom setter that patches its position and also the position before it: each chunk starts where
    its patches first change the activation (found by calling the setter on the corrupted activation), so
    the earlier write is kept; values equal TransformerLens's for any ``max_batch``."""
    model = hf_model("llama")
    clean, corrupted = _pair(model, batch=2, pos=7, differ_at=1)
    clean_logits, cache = model.run_with_cache(clean)
    metric = _metric(clean_logits)

    def also_before(act, index, clean_act):
        layer, pos = index
        act[:, max(pos - 1, 0) : pos + 1] = clean_act[:, max(pos - 1, 0) : pos + 1]
        return act

    ours = patching.generic_activation_patch(
        model,
        corrupted,
        cache,
        metric,
        also_before,
        "resid_pre",
        index_axis_names=("layer", "pos"),
        progress=False,
        max_batch=max_batch,
    )
    ref = tl_patching.generic_activation_patch(
        model, corrupted, cache, metric, also_before, "resid_pre", index_axis_names=("layer", "pos")
    )
    plain = tl_patching.get_act_patch_resid_pre(model, corrupted, cache, metric)
    assert (ours - ref).abs().max() <= TOL
    assert (ref - plain).abs().max() > 1e-3  # the earlier write matters


def test_a_setter_that_is_not_deterministic_is_refused(hf_model) -> None:
    """A setter that writes an earlier position only on its second call would be cut silently: it fails."""
    model = hf_model("llama")
    clean, corrupted = _pair(model, batch=1, pos=6, differ_at=1)
    clean_logits, cache = model.run_with_cache(clean)
    calls = []

    def sneaky(act, index, clean_act):
        calls.append(index)
        layer, pos = index
        act[:, pos] = clean_act[:, pos]
        if len(calls) > 12:  # after the check on the corrupted activation
            act[:, 0] += 1.0
        return act

    with pytest.raises(RuntimeError, match="setters must be deterministic"):
        patching.generic_activation_patch(
            model,
            corrupted,
            cache,
            _metric(clean_logits),
            sneaky,
            "resid_pre",
            index_axis_names=("layer", "pos"),
            progress=False,
            max_batch=1,
        )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_copies_join_the_batch_at_their_own_block(hf_model, family, monkeypatch) -> None:
    """With per-layer joins, a chunk's copies are ordered by patched block and each joins the batch there
    (the batch grows as the forward climbs): fewer layers are computed than from the chunk's lowest block,
    and every value still equals TransformerLens's."""
    model = hf_model(family)
    clean, corrupted = _pair(model, batch=2, pos=6)
    clean_logits, cache = model.run_with_cache(clean)
    metric = _metric(clean_logits)
    joined: list[list[int]] = []
    real = _patch_engine._forward

    def forward(run, copies, l0, p0, hooks, last_only=False, joins=None):
        joined.append(list(joins))
        return real(run, copies, l0, p0, hooks, last_only, joins)

    monkeypatch.setattr(_patch_engine, "_forward", forward)
    for fn in ("get_act_patch_resid_pre", "get_act_patch_attn_head_out_by_pos", "get_act_patch_mlp_out"):
        joined.clear()
        ours = getattr(patching, fn)(model, corrupted, cache, metric, progress=False)
        ref = getattr(tl_patching, fn)(model, corrupted, cache, metric)
        assert (ours - ref).abs().max() <= TOL, fn
        assert patching.fast_path_status(model).per_layer
        assert any(j[-1] > j[0] for j in joined) and all(j == sorted(j) for j in joined)
        n = model.cfg.n_layers
        assert sum(n - layer for j in joined for layer in j) < sum(len(j) * (n - j[0]) for j in joined)


@pytest.mark.parametrize("fault", ["raises", "silent"])
def test_per_layer_joins_off_when_they_fail_and_values_stay_exact(hf_model, monkeypatch, fault) -> None:
    """When copies joining at later blocks fail (an error, or silently wrong rows), the first chunk's
    sentinels disagree, the check runs, each start is tried on its own: the others stay on, per-layer
    joins are off with the reason, and values still equal TL's."""
    monkeypatch.setattr(fast_path, "_WARNED", weakref.WeakKeyDictionary())
    monkeypatch.setattr(fast_path, "_CHECKED_OFF", weakref.WeakSet())
    model = hf_model("llama")
    clean, corrupted = _pair(model, batch=2, pos=6)
    clean_logits, cache = model.run_with_cache(clean)
    metric = _metric(clean_logits)
    real = CorruptedRun._joining

    @contextlib.contextmanager
    def joining(self, joins, p0):
        if len(set(joins)) > 1 and fault == "raises":
            raise RuntimeError("a per-row argument the hook cannot see")
        acts = self.acts
        if len(set(joins)) > 1:  # the joining rows start from a slightly wrong residual
            self.acts = {k: v + 1e-2 if "resid_pre" in k else v for k, v in acts.items()}
        try:
            with real(self, joins, p0):
                yield
        finally:
            self.acts = acts

    monkeypatch.setattr(CorruptedRun, "_joining", joining)
    why = "a per-row argument the hook cannot see" if fault == "raises" else "differ from the plain run"
    with pytest.warns(RuntimeWarning, match=f"per-layer joins off: .*{why}"):
        ours = patching.get_act_patch_resid_pre(model, corrupted, cache, metric, progress=False)
    status = patching.fast_path_status(model)
    assert status == FastPathStatus(True, True, True, status.reason, per_layer=False)
    assert (ours - tl_patching.get_act_patch_resid_pre(model, corrupted, cache, metric)).abs().max() <= TOL
    assert model in fast_path._CHECKED_OFF  # the next call checks before it runs


def test_a_fault_the_check_misses_is_caught_by_the_sentinels(hf_model, monkeypatch) -> None:
    """A resumed forward that is wrong only for chunks larger than any the check runs: the check passes,
    the chunk's sentinels still disagree, so the fast path goes off with a warning and every value is a
    plain forward's, equal to TL's."""
    monkeypatch.setattr(fast_path, "_WARNED", weakref.WeakKeyDictionary())
    monkeypatch.setattr(fast_path, "_CHECKED_OFF", weakref.WeakSet())
    model = hf_model("gpt2")
    clean, corrupted = _pair(model, batch=2, pos=6)
    clean_logits, cache = model.run_with_cache(clean)
    metric = _metric(clean_logits)
    real = CorruptedRun.past

    def past(self, p0, copies):
        cache_ = real(self, p0, copies)
        if max(copies) > 4:  # the check's forwards hold at most three copies
            for layer in cache_.layers:
                layer.keys[-1] += 1.0
        return cache_

    monkeypatch.setattr(CorruptedRun, "past", past)
    with pytest.warns(RuntimeWarning, match="sentinel copies did not reproduce the corrupted run"):
        ours = patching.get_act_patch_resid_pre(model, corrupted, cache, metric, progress=False)
    assert patching.fast_path_status(model) == FastPathStatus(False, False, False, mock.ANY, False)
    assert (ours - tl_patching.get_act_patch_resid_pre(model, corrupted, cache, metric)).abs().max() <= TOL


def test_position_chunks_are_the_cheapest_consecutive_split() -> None:
    """The per-layer chunker covers every patch once, respects the chunk size, and its modelled cost is
    the minimum over every split of its order into consecutive chunks (brute force on small cases)."""
    import itertools
    import random

    rng = random.Random(0)
    n_layers, n_pos = 6, 8

    def cost(chunk, starts, batch):
        p0 = min(starts[i][1] for i in chunk)
        work = sum((n_layers - starts[i][0]) / n_layers for i in chunk) * (n_pos - p0) / n_pos
        return _patch_engine._FORWARD_OVERHEAD / batch + work

    for trial in range(40):
        m, per_forward, batch = rng.randint(1, 9), rng.randint(1, 5), rng.choice([1, 8])
        starts = [(rng.randrange(n_layers), rng.randrange(n_pos)) for _ in range(m)]
        # half the trials: chunks resumed later may hold more copies (as copies_per_forward allows)
        room = (lambda q: per_forward) if trial % 2 else (lambda q: per_forward * n_pos // q)
        chunks = _patch_engine._position_chunks(starts, room, n_layers, n_pos, batch)
        assert sorted(i for c in chunks for i in c) == list(range(m))
        assert all(0 < len(c) <= room(n_pos - min(starts[i][1] for i in c)) for c in chunks)
        order = [i for c in chunks for i in c]
        splits = [
            list(zip((0, *cuts), (*cuts, m)))
            for k in range(m)
            for cuts in itertools.combinations(range(1, m), k)
        ]
        best = min(
            sum(cost(order[a:b], starts, batch) for a, b in split)
            for split in splits
            if all(b - a <= room(n_pos - starts[order[a]][1]) for a, b in split)
        )
        assert sum(cost(c, starts, batch) for c in chunks) == pytest.approx(best), trial


def test_resumed_forwards_hold_more_copies_by_default(hf_model) -> None:
    """With the default max_batch the cap is in tokens: a forward resumed at a later position holds more
    copies (never fewer); an explicit max_batch caps sequences whatever the start; memory still caps."""
    model = hf_model("llama")
    full = patching.copies_per_forward(model, 2, 12)
    assert patching.copies_per_forward(model, 2, 12, positions=12) == full
    assert patching.copies_per_forward(model, 2, 12, positions=3) == 4 * full
    assert patching.copies_per_forward(model, 2, 12, positions=3, max_batch=10) == 5
    assert patching.copies_per_forward(model, 2, 12, positions=3, memory_budget=1) == 1
    with pytest.raises(ValueError, match="positions"):
        patching.copies_per_forward(model, 2, 12, positions=0)
