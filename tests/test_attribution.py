"""Attribution patching: exact against an independent autograd reference, close to real patching."""

from __future__ import annotations

import math

import pytest
import torch

from minterp_tl import attribution, patching
from minterp_tl.models import induction_report, repeated_random_tokens


def _pair(model, seed: int, batch: int = 2, pos: int = 6):
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 1] = torch.randint(0, model.cfg.d_vocab, (batch,), generator=gen)
    corrupted[:, 3] = torch.randint(0, model.cfg.d_vocab, (batch,), generator=gen)
    return clean, corrupted


def _metric(model, clean):
    with torch.no_grad():
        target = model(clean)[:, -1].argmax(-1)
    return patching.logit_diff_metric(target, (target + 1) % model.cfg.d_vocab)


def _hooks(model) -> list:
    """Every forward and backward hook handle on the model's hook points."""
    return [(name, list(hp._forward_hooks), list(hp._backward_hooks)) for name, hp in model.hook_dict.items()]


def _alpha_derivative(model, name, clean_act, corrupted, metric, mask):
    """``d/dalpha metric(act + alpha * mask * (clean - act))`` at ``alpha = 0``, by autograd on alpha."""
    alpha = torch.zeros((), requires_grad=True)

    def hook(act, hook=None):
        return act + alpha * mask * (clean_act.detach() - act)

    with torch.enable_grad(), model.hooks(fwd_hooks=[(name, hook)]):
        value = metric(model(corrupted))
    (grad,) = torch.autograd.grad(value, alpha)
    return float(grad)


# (hook, canonical name, positions, heads, mask builder: (shape, pos, head) -> which entries are patched)
def _mask_resid(shape, p, h):
    mask = torch.zeros(shape)
    mask[:, p, :] = 1  # [batch, pos, d_model]
    return mask


def _mask_by_pos_head(shape, p, h):
    mask = torch.zeros(shape)
    if p is None:
        mask[:, :, h, :] = 1  # [batch, pos, head, d_head], every position
    else:
        mask[:, p, h, :] = 1
    return mask


def _mask_pattern(shape, p, h):
    mask = torch.zeros(shape)
    mask[:, h, p, :] = 1  # [batch, head, query, key]: query position p, every key
    return mask


CASES = {
    "resid_pre": ("blocks.{}.hook_resid_pre", "all", None, _mask_resid, [(0, 1), (2, 3), (3, 5), (1, 3)]),
    "z": (
        "blocks.{}.attn.hook_z",
        "all",
        "all",
        _mask_by_pos_head,
        [(1, 2, 3), (3, 5, 0), (0, 4, 1), (2, 3, 2)],
    ),
    "pattern": (
        "blocks.{}.attn.hook_pattern",
        "all",
        "all",
        _mask_pattern,
        [(1, 3, 2), (3, 5, 0), (2, 4, 3)],
    ),
    "k": ("blocks.{}.attn.hook_k", None, "all", _mask_by_pos_head, [(0, 1), (3, 0), (2, 1)]),
}


@pytest.mark.parametrize("kind", ["ln", "gqa"])
@pytest.mark.parametrize("hook", list(CASES))
def test_attribution_equals_the_alpha_derivative(toys, kind, hook) -> None:
    """attr = d/dalpha metric(corrupted + alpha (clean - corrupted) on the slice) at alpha = 0, exactly."""
    model = toys[kind]
    clean, corrupted = _pair(model, 0)
    _, cache = model.run_with_cache(clean)
    metric = _metric(model, clean)
    name_fmt, positions, heads, make_mask, indices = CASES[hook]
    before = _hooks(model)
    sweep = attribution.attribution_patch(
        model, clean, corrupted, metric, hook, positions=positions, heads=heads
    )
    assert _hooks(model) == before
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated into parameters
    n_heads = model.cfg.n_key_value_heads if hook == "k" and kind == "gqa" else model.cfg.n_heads
    expected_shape = (4,) + ((6,) if positions else ()) + ((n_heads,) if heads else ())
    assert tuple(sweep.values.shape) == expected_shape
    with torch.no_grad():
        assert math.isclose(
            sweep.corrupted_metric, float(metric(model(corrupted))), rel_tol=1e-5, abs_tol=1e-5
        )
    for index in indices:
        layer = index[0]
        p = index[1] if positions else None
        h = index[-1] if heads else None
        name = name_fmt.format(layer)
        clean_act = cache[name]
        mask = make_mask(clean_act.shape, p, h)
        reference = _alpha_derivative(model, name, clean_act, corrupted, metric, mask)
        ours = float(sweep.values[index])
        assert math.isclose(ours, reference, rel_tol=1e-4, abs_tol=1e-5), (index, ours, reference)
    assert sweep.values.abs().max() > 1e-3  # the sweep measured something


def test_sums_subsets_drop_ins_and_cache_forms(toys, tmp_path) -> None:
    model = toys["gqa"]
    clean, corrupted = _pair(model, 1, batch=3, pos=7)
    _, cache = model.run_with_cache(clean)
    metric = _metric(model, clean)
    by_pos = attribution.attribution_patch(model, cache, corrupted, metric, "z", heads="all")
    assert by_pos.axis_names == ("layer", "pos", "head")
    all_pos = attribution.attribution_patch(model, cache, corrupted, metric, "z", positions=None, heads="all")
    heads_summed = attribution.attribution_patch(model, cache, corrupted, metric, "z")
    assert torch.allclose(all_pos.values, by_pos.values.sum(1), atol=1e-5)  # linear: sums over the slice
    assert torch.allclose(heads_summed.values, by_pos.values.sum(2), atol=1e-5)
    subset = attribution.attribution_patch(
        model, cache, corrupted, metric, "z", layers="n//2:", positions="-3:", heads=[3, 0]
    )
    assert subset.layers == [2, 3] and subset.positions == [4, 5, 6] and subset.heads == [3, 0]
    assert torch.allclose(subset.values, by_pos.values[2:, 4:][..., [3, 0]], atol=1e-6)

    drop_ins = {  # the shapes of patching's get_act_patch_* of the same name
        attribution.get_attr_patch_resid_pre: ("resid_pre", "all", None, (4, 7)),
        attribution.get_attr_patch_attn_out: ("attn_out", "all", None, (4, 7)),
        attribution.get_attr_patch_mlp_out: ("mlp_out", "all", None, (4, 7)),
        attribution.get_attr_patch_attn_head_out_all_pos: ("z", None, "all", (4, 4)),
        attribution.get_attr_patch_attn_head_out_by_pos: ("z", "all", "all", (4, 7, 4)),
    }
    for fn, (hook, positions, heads, shape) in drop_ins.items():
        ours = fn(model, corrupted, cache, metric)
        ref = attribution.attribution_patch(
            model, cache, corrupted, metric, hook, positions=positions, heads=heads
        )
        assert ours.shape == shape and torch.equal(ours, ref.values), fn.__name__

    from_tokens = attribution.attribution_patch(model, clean, corrupted, metric, "resid_pre")
    from_cache = attribution.attribution_patch(model, cache, corrupted, metric, "resid_pre")
    bridge_names = {f"blocks.{l}.hook_in": cache[f"blocks.{l}.hook_resid_pre"] for l in range(4)}  # an alias
    from_aliases = attribution.attribution_patch(model, bridge_names, corrupted, metric, "resid_pre")
    assert torch.allclose(from_tokens.values, from_cache.values, atol=1e-6)
    assert torch.equal(from_cache.values, from_aliases.values)
    # one clean prompt broadcast over the corrupted batch equals that prompt repeated
    one = attribution.attribution_patch(model, clean[:1], corrupted, metric, "resid_pre")
    repeated = attribution.attribution_patch(model, clean[:1].repeat(3, 1), corrupted, metric, "resid_pre")
    assert torch.allclose(one.values, repeated.values, atol=1e-6)
    assert torch.allclose(from_cache.estimate, from_cache.values + from_cache.corrupted_metric)

    png = from_cache.plot(tmp_path / "attr.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob("*.png.*"))
    with pytest.raises(ValueError, match="2-D sweep"):
        by_pos.plot(tmp_path / "bad.png")


def _induction_pair(model, length: int = 11, batch: int = 8, seed: int = 0):
    """Clean: ``[BOS, t, t]``; corrupted: ``[BOS, s, t]`` (the first copy replaced, so nothing repeats)."""
    gen = torch.Generator().manual_seed(seed)
    n_rand = model.cfg.d_vocab - 1  # the last id is BOS
    clean = repeated_random_tokens(batch, length, n_rand, gen)
    corrupted = clean.clone()
    corrupted[:, 1 : length + 1] = torch.randint(0, n_rand, (batch, length), generator=gen)
    targets = clean[:, length + 2 :]

    def metric(logits):  # mean log prob of the next token over the second copy (t_2..t_L)
        logprobs = logits[:, length + 1 : 2 * length].log_softmax(-1)
        return logprobs.gather(-1, targets[..., None]).mean()

    return clean, corrupted, metric


def test_induction_heads_agree_with_real_patching(induction_model) -> None:
    model = induction_model
    clean, corrupted, metric = _induction_pair(model)
    _, cache = model.run_with_cache(clean)
    attr = attribution.get_attr_patch_attn_head_out_all_pos(model, corrupted, cache, metric)
    patched = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, cache, metric, progress=False)
    with torch.no_grad():
        baseline = float(metric(model(corrupted)))
    report = attribution.compare(attr, patched, baseline=baseline, k=2)
    # measured: pearson 0.931, spearman 0.833, top-2 overlap 2/2, top head L1H2 for both
    # (pearson 0.91-0.94 over four seeds and repeat lengths 8, 11, 16)
    assert report.same_top and report.top_k_overlap == 1.0, str(report)
    assert report.pearson > 0.8, str(report)
    top = divmod(int(attr.argmax()), model.cfg.n_heads)
    assert top[0] == 1 and attr[top] > 1.0  # an induction head in layer 1 restores > 1 nat
    # Where first order fails: patching the clean previous-token head alone makes the induction heads
    # copy the corrupted first copy's tokens, so the metric *drops*; attribution only sees the local
    # slope and calls it helpful (measured +0.54 vs -0.51).
    prev = induction_report(model).best_prev_token_head()
    assert prev[0] == 0
    assert attr[prev] > 0.1 and patched[prev] - baseline < -0.1


def test_smollm2_resid_pre_agrees_with_real_patching(smollm2) -> None:
    model = smollm2
    clean = model.to_tokens("The capital of France is")
    corrupted = model.to_tokens("The capital of Italy is")
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
    metric = patching.logit_diff_metric(model.to_single_token(" Paris"), model.to_single_token(" Rome"))
    sweep = attribution.attribution_patch(model, cache, corrupted, metric, "resid_pre")
    patched = patching.get_act_patch_resid_pre(model, corrupted, cache, metric, progress=False)
    effect = patched - sweep.corrupted_metric
    report = attribution.compare(sweep, effect)
    # measured: pearson 0.979, spearman 0.817, max |error| 4.13 (effects up to 12.8)
    assert report.pearson > 0.9, str(report)
    assert sweep.values.shape == (30, 6) and sweep.labels[4] == " Italy"  # corrupted tokens
    assert torch.equal(sweep.values[:, :4], torch.zeros(30, 4))  # same tokens there: nothing to patch
    # layer 0, subject position: right sign, and most of the size (measured 8.69 vs 12.81)
    assert 0.5 * effect[0, 4] < sweep.values[0, 4] < effect[0, 4] + 3
    # both put the effect at the subject up to the same layer, then at the last position (from layer 24)
    assert torch.equal(sweep.values.argmax(1), effect.argmax(1))
    assert sweep.values[24:, 5].min() > 5 and sweep.values[24:, 4].abs().max() < 1


def test_bad_inputs_raise_and_leave_no_hooks(toys) -> None:
    model = toys["ln"]
    clean, corrupted = _pair(model, 2)
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
    metric = _metric(model, clean)
    before = _hooks(model)
    bad = [
        (dict(hook="resid_pre", heads=0), "no head axis"),
        (dict(hook="resid_pre", layers=9), "n_layers=4"),
        (dict(hook="resid_pre", layers=slice(2, 2)), "selects no layers"),
        (dict(hook="z", positions=None), "leaves nothing"),
        (dict(hook="z"), "has no 'blocks.0.attn.hook_z'"),
        (dict(hook="not_a_hook"), "not_a_hook"),
        (
            dict(hook="resid_pre", metric=patching.logit_diff_metric(1, 2, reduce="none")),
            r"scalar tensor, got \(2,\)",
        ),
        (dict(hook="resid_pre", metric=lambda logits: logits[:, -1, 0].mean().detach()), "does not depend"),
        (dict(hook="resid_pre", metric=lambda logits: 1.0), "scalar tensor, got float"),
        (dict(hook="resid_pre", metric="logit_diff"), "metric must be a function"),
        (dict(hook="resid_pre", corrupted=corrupted[0]), r"\[batch, pos\]"),
        (dict(hook="resid_pre", corrupted=corrupted + model.cfg.d_vocab), "outside 0..49"),
        (dict(hook="resid_pre", corrupted=cache), "argument order"),
        (dict(hook="resid_pre", clean=clean[:, :4]), "same number of positions"),
        (dict(hook="resid_pre", clean=clean.float()), "integer tensor"),
    ]
    for kwargs, message in bad:
        args = dict(clean=cache, corrupted=corrupted, metric=metric)
        args.update(kwargs)
        with pytest.raises(ValueError, match=message):
            attribution.attribution_patch(
                model, args.pop("clean"), args.pop("corrupted"), args.pop("metric"), **args
            )
        assert _hooks(model) == before, kwargs
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())

    def failing(logits):
        raise RuntimeError("metric broke")

    with pytest.raises(RuntimeError, match="metric broke"):  # any failure inside the hooked run
        attribution.attribution_patch(model, cache, corrupted, failing)
    assert _hooks(model) == before
    assert all(p.grad is None for p in model.parameters())
    with torch.inference_mode(), pytest.raises(ValueError, match="inference_mode"):
        attribution.attribution_patch(model, cache, corrupted, metric)
    with torch.no_grad():  # fine: attribution turns autograd on itself
        assert attribution.attribution_patch(model, cache, corrupted, metric).values.abs().max() > 0


def test_compare_by_hand() -> None:
    report = attribution.compare(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 2.0]))
    # deviations (-1, 0, 1) and (-1, 1, 0): covariance 1, variances 2 and 2 -> 0.5; ranks are the same
    assert math.isclose(report.pearson, 0.5, abs_tol=1e-12) and math.isclose(
        report.spearman, 0.5, abs_tol=1e-12
    )
    assert report.n == 3 and report.k == 3 and report.top_k_overlap == 1.0 and report.max_abs_error == 1.0

    # ties share their average rank: ranks (0.5, 0.5, 2, 3) vs (0, 1, 2, 3) -> 4.5 / sqrt(4.5 * 5)
    report = attribution.compare(
        torch.tensor([[1.0, 1.0], [2.0, 3.0]]), torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    )
    assert math.isclose(report.spearman, math.sqrt(0.9), rel_tol=1e-12)
    # values: deviations (-.75, -.75, .25, 1.25) and (-1.5, -.5, .5, 1.5) -> 3.5 / sqrt(2.75 * 5)
    assert math.isclose(report.pearson, 3.5 / math.sqrt(2.75 * 5), rel_tol=1e-12)

    attr = torch.tensor([4.0, -3.0, 0.0, 0.3, 5.0])
    patch = torch.tensor([0.1, -5.0, 3.0, 0.2, 4.0])
    report = attribution.compare(attr, patch, k=2)
    # largest |patch|: indices 1, 4; largest |attr|: 4, 0 -> one of two; the single largest differ
    assert report.top_k_overlap == 0.5 and not report.same_top
    assert math.isclose(report.max_abs_error, 3.9, rel_tol=1e-6)  # |4 - 0.1|
    assert math.isclose(report.pearson, float(torch.corrcoef(torch.stack([attr, patch]))[0, 1]), rel_tol=1e-5)
    assert math.isclose(attribution.compare(attr, patch, k=3).top_k_overlap, 2 / 3)  # {1, 4, 2} vs {4, 0, 1}
    shifted = attribution.compare(attr, patch + 10.0, k=2, baseline=10.0)
    assert shifted.top_k_overlap == 0.5 and math.isclose(shifted.max_abs_error, 3.9, rel_tol=1e-6)
    assert math.isclose(shifted.pearson, report.pearson, rel_tol=1e-6)
    text = str(report)
    assert (
        "pearson" in text and "top-2 overlap 1/2" in text and "max |error| 3.9" in text and "\n" not in text
    )

    sweep = attribution.AttributionSweep(
        attr.reshape(1, 5), ("layer", "pos"), [0], list(range(5)), None, "resid_pre"
    )
    assert attribution.compare(sweep, patch.reshape(1, 5), k=2) == report  # sweeps are unwrapped
    assert math.isnan(attribution.compare(torch.ones(3), torch.tensor([1.0, 2.0, 3.0])).pearson)
    with pytest.raises(ValueError, match="same indices"):
        attribution.compare(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="positive int"):
        attribution.compare(attr, patch, k=0)
    with pytest.raises(ValueError, match="non-finite"):
        attribution.compare(attr, torch.tensor([0.0, math.nan, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="at least 2"):
        attribution.compare(torch.ones(1), torch.ones(1))
