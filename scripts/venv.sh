# Sourced by scripts/demo.sh and scripts/test.sh, from the repository root.
# Debian's python3 cannot make a venv without python3-venv (no ensurepip).

# need_venv_support: add python3-venv to $missing when .venv is still to be made and cannot be.
need_venv_support() {
    [ -x .venv/bin/python ] || python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
}

# install_missing SCRIPT: as root, apt-get install the Debian packages in $missing (the log is
# shown only if that fails); otherwise say what is missing and go on.
install_missing() {
    [ ${#missing[@]} -gt 0 ] || return 0
    if [ "$(id -u)" != 0 ]; then
        echo "$1: ${missing[*]} not installed (as root this script installs them; or apt-get install them)" >&2
        return 0
    fi
    echo "$1: apt-get install ${missing[*]}"
    local apt_log
    apt_log=$(mktemp)
    if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"; } \
            >"$apt_log" 2>&1 </dev/null; then
        cat "$apt_log" >&2
        rm -f "$apt_log"
        exit 1
    fi
    rm -f "$apt_log"
}

# make_venv EXTRAS: .venv (made if needed) with runrelay installed editable, with EXTRAS.
make_venv() {
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$1]"
}
