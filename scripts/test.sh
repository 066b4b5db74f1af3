#!/usr/bin/env bash
# Installs what the tests need (nats-server) and runs every test: unit tests,
# property tests and the end-to-end suite against a real nats-server and real
# agent processes. Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_rust
ensure_nats_server

log "checking formatting"
cargo fmt --all --check

log "building binaries (the end-to-end tests run them)"
cargo build --workspace --bins --locked

log "running all tests"
cargo test --workspace --locked "$@"
