#!/usr/bin/env bash
# Installs what the tests need (nats-server) and runs every test: unit tests,
# property tests and the end-to-end suite against a real nats-server and real
# agent processes, and a seconds-long smoke run of the benchmark harness.
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_rust
ensure_nats_server

log "checking formatting"
cargo fmt --all --check

log "building binaries (the end-to-end tests run them)"
cargo build --workspace --bins --locked

log "benchmark harness smoke run (tiny datasets; proves bench/run.sh works, numbers mean nothing)"
smoke="$(mktemp -d)"
bench/run.sh --quick --debug --work "$smoke/work" --results "$smoke/results" >"$smoke/bench.log" 2>&1 \
    || { tail -60 "$smoke/bench.log"; die "bench/run.sh --quick failed (log above)"; }
tail -5 "$smoke/bench.log"
rm -rf "$smoke"

log "running all tests"
cargo test --workspace --locked "$@"
