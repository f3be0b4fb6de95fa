#!/usr/bin/env bash
# Run the test suite: bash scripts/test.sh [pytest args...]
# Works on a fresh Debian machine with only python3: as root it apt-installs the database
# servers the tests start (mariadb-server, postgresql) and venv support, then makes .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v mariadbd >/dev/null || [ -x /usr/sbin/mariadbd ] || missing+=(mariadb-server)
compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null || missing+=(postgresql)
# Debian's python3 cannot make a venv without python3-venv (no ensurepip).
[ -x .venv/bin/python ] || python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)

if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ]; then
    echo "scripts/test.sh: apt-get install ${missing[*]} (needed by the tests)"
    apt_log=$(mktemp)
    if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"; } \
            >"$apt_log" 2>&1 </dev/null; then
        cat "$apt_log" >&2
        rm -f "$apt_log"
        exit 1
    fi
    rm -f "$apt_log"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
exec .venv/bin/python -m pytest "$@"
