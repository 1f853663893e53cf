#!/usr/bin/env bash
# Create or refresh .venv: every package editable, dev tools, torch pinned by constraints.txt.
# Re-running is cheap: nothing is reinstalled unless a pyproject or requirements file changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.tessera-stamp
want=$(cat constraints.txt requirements-dev.txt pyproject.toml packages/*/pyproject.toml | sha256sum | cut -c1-64)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x $VENV/bin/tessera ]; then
  exit 0
fi
echo "dev-env: installing the workspace into $VENV (first run takes a few minutes)" >&2
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
$VENV/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
editables=()
for p in packages/*/; do editables+=(-e "$p"); done
$VENV/bin/python -m pip install -q -c constraints.txt -r requirements-dev.txt "${editables[@]}" -e ".[jax]" \
  2>&1 | grep -v '^WARNING: Location' || true
$VENV/bin/python -c "import tessera.specs, tessera.kernels, torch" # fail loudly if the install did not take
echo "$want" > "$STAMP"
