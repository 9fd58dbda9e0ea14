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
