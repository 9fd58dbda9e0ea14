"""The minterp-tl command line: `info` on SmolLM2, and one-line errors with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from minterp_tl.cli import main


def test_info_prints_model_info_and_paris_first(smollm2, capsys):
    assert main(["info", "The capital of France is", "--no-progress"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "smollm2-135m" in lines[0]
    assert any(line.split() == ["layers", "30"] for line in lines)
    assert any(line.split() == ["d_vocab", "49152"] for line in lines)
    ranked = [line.split(None, 1)[1] for line in lines if line.strip()[:1].isdigit() and line.split()[0] in "12345"]
    assert len(ranked) == 5 and ranked[0].startswith("' Paris'")


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
