# Sourced by deploy/run-local and tests/run: system packages and the project venv.
# Idempotent: installs only what is missing.

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

ensure_packages() {
    local missing=()
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "agentd: installing system packages: ${missing[*]}" >&2
        as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# ensure_venv LOCK: the dependencies exactly as deploy/lock pinned them (hashes checked; the Dockerfile
# installs deploy/requirements.lock the same way), then agentd itself, editable, resolving nothing.
# Skipped when the lock, pyproject.toml and the Python are those of the last install (a stamp in the
# venv), so a start costs no pip run: an editable install picks up code changes by itself.
ensure_venv() {
    local lock="$1" stamp=.venv/.agentd-install-stamp want
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
    want="$(venv_fingerprint "$lock")"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    rm -f "$stamp"
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install -q --disable-pip-version-check --require-hashes -r "$lock"
    # setuptools prints a banner about editable installs on every success: shown only on failure.
    local out
    out="$(.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e . 2>&1)" || {
        echo "$out" >&2
        return 1
    }
    echo "$want" >"$stamp"
}

# What an install depends on: the lock's name and content, pyproject.toml, and the venv's Python.
venv_fingerprint() {
    {
        echo "$1"
        sha256sum "$1" pyproject.toml
        .venv/bin/python -c 'import sys; print(sys.version)'
    } | sha256sum | cut -d' ' -f1
}

# bubblewrap + socat: the Claude Code sandbox for agent tools. python3-venv: Debian's venv.
RUNTIME_PACKAGES=(python3-venv bubblewrap socat ca-certificates)
