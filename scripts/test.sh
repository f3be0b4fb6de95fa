#!/usr/bin/env bash
# Run the test suite: bash scripts/test.sh [pytest args...]
# Works on a fresh Debian machine with only python3: as root it apt-installs the database
# servers the tests start (mariadb-server, postgresql) and venv support, then makes .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

missing=()
command -v mariadbd >/dev/null || [ -x /usr/sbin/mariadbd ] || missing+=(mariadb-server)
compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null || missing+=(postgresql)
need_venv_support
install_missing scripts/test.sh
make_venv test
exec .venv/bin/python -m pytest "$@"
