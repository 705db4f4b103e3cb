# Sourced by the other scripts: create or refresh the virtual environment.
# Idempotent: reinstalls only when pyproject.toml changed since the last install.
# PYTHON picks the interpreter (default python3), VENV the folder (default .venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$ROOT/.venv}"
EXTRAS="${EXTRAS:-test}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.cloudio-installed"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)-$EXTRAS"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[$EXTRAS]"
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
