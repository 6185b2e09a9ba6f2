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
ensure_venv() {
    local lock="$1"
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install -q --disable-pip-version-check --require-hashes -r "$lock"
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
}

# bubblewrap + socat: the Claude Code sandbox for agent tools. python3-venv: Debian's venv.
RUNTIME_PACKAGES=(python3-venv bubblewrap socat ca-certificates)
