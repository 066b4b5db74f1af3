#!/usr/bin/env bash
# Installs what the tests need (nats-server; openssh-server and ansible-core
# for the deploy tests) and runs every test: unit tests,
# property tests and the end-to-end suite against a real nats-server and real
# agent processes, the .deb packages installed and purged (as root), a
# seconds-long smoke run of the benchmark harness, the fuzz targets over their
# seeds, and a quick chaos run (about 4 minutes).
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_rust
ensure_nats_server
ensure_deploy_test_tools   # sshd (Debian) and ansible-core (PyPI) for the deploy tests

log "checking formatting"
cargo fmt --all --check

log "building binaries (the end-to-end tests run them)"
cargo build --workspace --bins --locked

log "packages: package the debug build, then install, configure, remove and purge it (as root; tests/packaging.sh)"
tests/packaging.sh

log "benchmark harness smoke run (tiny datasets; proves bench/run.sh works, numbers mean nothing)"
smoke="$(mktemp -d)"
bench/run.sh --quick --debug --work "$smoke/work" --results "$smoke/results" >"$smoke/bench.log" 2>&1 \
    || { tail -60 "$smoke/bench.log"; die "bench/run.sh --quick failed (log above)"; }
tail -5 "$smoke/bench.log"
rm -rf "$smoke"

log "running all tests"
cargo test --workspace --locked "$@"

log "fuzz targets, smoke: every target's body over its committed seeds and regressions (stable; fuzz/run.sh SECONDS fuzzes for real)"
CARGO_TARGET_DIR="$PWD/target" cargo test --manifest-path fuzz/Cargo.toml --lib --locked

log "chaos, quick: kills, nats restarts, a full disk, clock skew, bit rot against a real local fleet (chaos/run --trials N for the full run)"
CHAOS_NO_BUILD=1 chaos/run --quick
