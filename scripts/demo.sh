#!/usr/bin/env bash
# The README's main job: bash scripts/demo.sh [runrelay demo args...]
# Makes .venv if needed (as root, apt-installs python3-venv first if it is missing), installs
# runrelay with Sacred, and runs `runrelay demo` (Sacred runs journaled, replayed into SQLite;
# no server, no network). Run it again and it replaces the demo directory it made.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

missing=()
need_venv_support
install_missing scripts/demo.sh
make_venv sacred
exec .venv/bin/runrelay demo "$@"
