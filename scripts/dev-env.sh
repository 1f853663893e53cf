#!/usr/bin/env bash
# Create or refresh .venv with every package installed editable, torch pinned by constraints.txt.
#   scripts/dev-env.sh          the development environment: packages, jaxref, test and lint tools
#   scripts/dev-env.sh runtime  only what the packages themselves need (what `make demo` uses)
# Re-running is cheap: nothing is reinstalled unless a pyproject or requirements file changed.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-dev}
PY=${PYTHON:-python3}
VENV=.venv
want=$(cat constraints.txt requirements-dev.txt pyproject.toml packages/*/pyproject.toml | sha256sum | cut -c1-64)
for m in dev "$mode"; do  # a dev environment satisfies the runtime one
  if [ -f "$VENV/.stamp-$m" ] && [ "$(cat "$VENV/.stamp-$m")" = "$want" ] && [ -x $VENV/bin/tessera ]; then
    exit 0
  fi
done
echo "dev-env: installing the workspace ($mode) into $VENV; the first run takes a few minutes" >&2
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
quiet() { grep -v '^WARNING: Location' || true; }
$VENV/bin/python -m pip install -q --upgrade pip 2>&1 | quiet
editables=()
for p in packages/*/; do
  [ "$mode" = runtime ] && [ "$p" = packages/jaxref/ ] && continue
  editables+=(-e "$p")
done
if [ "$mode" = dev ]; then
  $VENV/bin/python -m pip install -q -c constraints.txt -r requirements-dev.txt "${editables[@]}" -e ".[jax]" 2>&1 | quiet
else
  $VENV/bin/python -m pip install -q -c constraints.txt "${editables[@]}" -e . 2>&1 | quiet
fi
$VENV/bin/python -c "import tessera.specs, tessera.kernels, torch"  # fail loudly if the install did not take
echo "$want" > "$VENV/.stamp-$mode"
