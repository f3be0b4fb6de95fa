#!/usr/bin/env bash
# The README's main job: bash scripts/demo.sh [runrelay demo args...]
# Makes .venv if needed, installs runrelay with Sacred, and runs `runrelay demo`
# (Sacred runs journaled, replayed into SQLite; no server, no network).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[sacred]'
exec .venv/bin/runrelay demo "$@"
