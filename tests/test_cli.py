"""The minterp-tl command line: `info` on SmolLM2, and one-line errors with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from minterp_tl.cli import main


def test_info_prints_model_info_and_paris_first(smollm2, capsys):
    import torch

    with torch.no_grad():
        expected = smollm2("The capital of France is")[0, -1].softmax(-1).max().item()
    assert main(["info", "The capital of France is", "--no-progress"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "smollm2-135m" in lines[0]
    assert any(line.split() == ["layers", "30"] for line in lines)
    assert any(line.split() == ["d_vocab", "49152"] for line in lines)
    ranked = [line.split() for line in lines if line.split()[:1] in (["1"], ["2"], ["3"], ["4"], ["5"])]
    assert len(ranked) == 5 and ranked[0][1:3] == ["'", "Paris'"]  # the token repr "' Paris'"
    assert abs(float(ranked[0][-1]) - expected) < 1e-4  # the printed probability is the model's own
    probs = [float(row[-1]) for row in ranked]
    assert probs == sorted(probs, reverse=True)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "minterp_tl.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "   "], "the prompt is empty"),
        (["info", "--model", "/no/such/model-dir", "hi"], "could not load model '/no/such/model-dir'"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message):
    result = _run(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("minterp-tl: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr


def test_routes_prints_paths_and_writes_png_and_json(smollm2, capsys, tmp_path):
    from minterp_tl.routes import build_graph, load_json, strongest_paths
    from minterp_tl.transparent import TransformerLensTransparentLlm

    png, js = tmp_path / "r.png", tmp_path / "r.json"
    assert main(["routes", "The capital of France is", "--out", str(png), "--json", str(js), "--top-k", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "predicts ' Paris'" in out
    assert png.read_bytes()[:4] == b"\x89PNG" and js.is_file()
    # the printed paths are the strongest paths of an independently built graph
    llm = TransformerLensTransparentLlm(smollm2)
    llm.run(["The capital of France is"])
    graph = build_graph(llm, 0, progress=False)
    expected = [r.describe(graph.graph["tokens"]) for r in strongest_paths(graph, token=-1, k=3)]
    printed = [line.strip() for line in out.splitlines() if line.startswith("  ") and "-> I29_5" in line]
    assert printed == expected
    assert set(load_json(js).edges) == set(graph.edges)


@pytest.mark.parametrize(
    "args, message",
    [
        (["routes", "  "], "the prompt is empty"),
        (["routes", "hi", "--threshold", "1.5"], "--threshold must be in [0, 1)"),
        (["routes", "hi", "--out", "routes.txt"], "--out must be a .png path"),
    ],
)
def test_routes_bad_input_exits_2_with_one_line(args, message, capsys):
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    errors = [line for line in captured.err.splitlines() if line.startswith("minterp-tl: error:")]
    assert len(errors) == 1 and message in errors[0], captured.err
