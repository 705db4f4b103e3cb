# Sourced by the other scripts: create or refresh the virtual environment.
# Idempotent: reinstalls only when pyproject.toml changed since the last install.
# PYTHON picks the interpreter (default python3), VENV the folder (default .venv).
# Progress goes to stderr, so the scripts' own output stays clean.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$ROOT/.venv}"
EXTRAS="${EXTRAS:-test}"
say() { echo "cloudio setup: $*" >&2; }
if [ ! -x "$VENV/bin/python" ]; then
    say "creating the virtual environment $VENV ..."
    "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.cloudio-installed"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)-$EXTRAS"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    say "installing cloudio[$EXTRAS] and its dependencies into $VENV (rasterio, gcsfs, zarr, xarray, dask, ...);"
    say "about 1-2 minutes on a fresh machine, a few seconds when already installed ..."
    start=$SECONDS
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[$EXTRAS]"
    echo "$WANT" > "$STAMP"
    say "installed in $((SECONDS - start)) s"
fi
export PATH="$VENV/bin:$PATH"
