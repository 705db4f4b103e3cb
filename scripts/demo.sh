#!/usr/bin/env bash
# The README's first command: set up, then run cloudio's main job on the embedded emulator.
source "$(dirname "$0")/_venv.sh"
exec "$VENV/bin/cloudio" demo "$@"
