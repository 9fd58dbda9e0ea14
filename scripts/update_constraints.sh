#!/usr/bin/env bash
# Move the tested dependency set to today's releases, deliberately:
#   1. build a fresh venv (.venv-upgrade) from pyproject.toml's ranges, without constraints.txt;
#   2. run every check (lint, format, types, the whole test suite) in it;
#   3. only if it passes, write its exact versions to constraints.txt.
# Then review `git diff constraints.txt`, update README.md's tested-versions table and commit both.
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV=.venv-upgrade MINTERP_UNCONSTRAINED=1 HF_HUB_OFFLINE=1
rm -rf "$VENV"
bash scripts/setup.sh
"$VENV/bin/ruff" check . && "$VENV/bin/ruff" format --check . && "$VENV/bin/mypy" && "$VENV/bin/python" -m pytest -q
{
  echo "# The exact versions the test suite last passed with (Python $("$VENV/bin/python" -c 'import platform; print(platform.python_version())'), CPU)."
  echo "# scripts/setup.sh installs with -c constraints.txt; regenerate with scripts/update_constraints.sh."
  "$VENV/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check | sed -E 's/^(torch==[^+]*)\+.*$/\1/'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt updated from $VENV; review the diff, update README.md's tested versions, commit."
