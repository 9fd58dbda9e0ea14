"""Inputs are checked at the door: text longer than the context, token ids outside the vocabulary, empty
selections, non-integer or non-positive sizes and unusable output paths are refused before any compute,
with one clear message (exit 2 in the CLI), never truncated or clamped silently."""

from __future__ import annotations

import pytest
import torch

from minterp_tl import RepresentationContext, attribution, patching
from minterp_tl.cli import main
from minterp_tl.lens import logit_lens
from minterp_tl.routes import build_graph, strongest_paths
from minterp_tl.transparent import TransformerLensTransparentLlm
from minterp_tl.wrapper import ModelWrapper

LONG = "When Mary and John went to the store " * 20  # far more than the tiny models' 64 positions


def _metric(model):
    return patching.logit_diff_metric(3, 4)


def test_text_longer_than_the_context_is_refused(hf_model):
    model = hf_model("llama")
    assert model.to_tokens(LONG).shape[1] == model.cfg.n_ctx  # what TransformerLens alone does: truncates
    for run in (
        lambda: logit_lens(model, LONG),
        lambda: ModelWrapper(model).run(RepresentationContext(LONG)),
        lambda: TransformerLensTransparentLlm(model).run([LONG]),
    ):
        with pytest.raises(ValueError, match=r"is \d+ tokens, more than the model's context of 64"):
            run()


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda m: torch.full((1, 5), m.cfg.d_vocab), "outside 0..49"),
        (lambda m: torch.full((1, 5), -1), "outside 0..49"),
        (lambda m: torch.zeros(1, 65, dtype=torch.long), "more than the model's context of 64"),
        (lambda m: torch.zeros(1, 5), "integer t"),
        (
            lambda m: torch.zeros(5, dtype=torch.long),
            r"\[batch, pos\]",
        ),  # a [pos] prompt is fine for a context
    ],
)
def test_bad_token_ids_are_refused_everywhere(toys, bad, message):
    model = toys["ln"]
    tokens = bad(model)
    clean = torch.zeros(1, 5, dtype=torch.long)
    _, cache = model.run_with_cache(clean)
    for run in (
        lambda: patching.get_act_patch_resid_pre(model, tokens, cache, _metric(model), progress=False),
        lambda: patching.activation_patch(model, tokens, cache, _metric(model), progress=False),
        lambda: attribution.attribution_patch(model, cache, tokens, lambda x: x[:, -1, 0].mean()),
        lambda: ModelWrapper(model).run(RepresentationContext(tokens)),
    ):
        if tokens.ndim == 1 and "ModelWrapper" in run.__code__.co_names:
            continue
        with pytest.raises(ValueError, match=message):
            run()


def test_empty_selections_and_bad_sizes_are_refused(toys):
    model = toys["ln"]
    clean = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(0))
    corrupted = (clean + 1) % 50
    _, cache = model.run_with_cache(clean)
    metric = _metric(model)
    for kwargs, message in (
        (dict(layers="3:1"), "selects no layer"),
        (dict(layers="n:"), "selects no layer"),
        (dict(positions="4:2"), "selects no position"),
        (dict(hook="z", heads="2:2", positions=None), "selects no head"),
    ):
        with pytest.raises(ValueError, match=message):
            patching.activation_patch(
                model, corrupted, cache, metric, **{"hook": "resid_pre", **kwargs}, progress=False
            )
    for value in ("8", 1.5, True, float("nan"), float("inf"), 0, -3):
        with pytest.raises(ValueError, match="max_batch must be"):
            patching.get_act_patch_resid_pre(model, corrupted, cache, metric, max_batch=value, progress=False)
    with pytest.raises(ValueError, match="memory_budget must be"):
        patching.get_act_patch_resid_pre(model, corrupted, cache, metric, memory_budget=0.5, progress=False)


def test_path_enumeration_is_bounded(toys):
    llm = TransformerLensTransparentLlm(toys["ln"])
    llm.run([[3, 17, 5, 42, 8]])
    graph = build_graph(llm, 0, threshold=0.0, progress=False)
    assert len(strongest_paths(graph, k=1000)) <= 1000
    for k in (10**9, 0, 2.0, True):
        with pytest.raises(ValueError, match="k must be an integer in 1..1000"):
            strongest_paths(graph, k=k)


@pytest.mark.parametrize("command", [["lens"], ["info"], ["routes"]])
def test_cli_refuses_a_long_prompt_and_unusable_outputs(hf_model, command, tmp_path, capsys):
    folder = hf_model.folder("gpt2")
    base = [*command, "--model", folder, "--no-progress"]
    cases = [
        ([LONG, "--out", str(tmp_path / "o.png")], "more than the model's context of 64"),
        (["Mary and John", "--out", str(tmp_path)], "must be a .png path"),
        (["Mary and John", "--out", str(tmp_path / "no" / "o.png")], "in an existing directory"),
        (["Mary and John", "--top-k", "5000"], "--top-k must be in 1..1000"),
    ]
    (tmp_path / "d.png").mkdir()
    cases.append((["Mary and John", "--out", str(tmp_path / "d.png")], "exists and is not a file"))
    for args, message in cases:
        assert main([*base, *args]) == 2, args
        captured = capsys.readouterr()
        assert captured.out == "" and message in captured.err and len(captured.err.strip().splitlines()) == 1
