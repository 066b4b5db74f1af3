#!/usr/bin/env bash
# The main job on a fresh machine: installs nats-server, builds Flotilla, starts
# a local fleet of three agents on loopback (two sources and a storage host),
# and shows it working: the fleet's health, estimates on two hosts, the event
# stream, and a clean shutdown. Everything lives under .flotilla-demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_rust
ensure_nats_server

log "building flotilla and flotilla-agent"
cargo build --workspace --bins --locked
BIN="$PWD/target/debug"

DEMO="$PWD/.flotilla-demo"
rm -rf "$DEMO"
mkdir -p "$DEMO"/{logs,bundles,state,data}
PORT="${FLOTILLA_DEMO_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"
export FLOTILLA_FLEET="$DEMO/fleet" FLOTILLA_NATS_URL="nats://127.0.0.1:$PORT"

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

log "starting nats-server (JetStream) on 127.0.0.1:$PORT"
"$NATS_SERVER_BIN" -a 127.0.0.1 -p "$PORT" -js -sd "$DEMO/jetstream" >"$DEMO/logs/nats-server.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
kill -0 "${PIDS[0]}" 2>/dev/null || die "nats-server did not start: $(tail -5 "$DEMO/logs/nats-server.log")"

log "creating the fleet and enrolling laptop, desktop and nas"
"$BIN/flotilla" init
for host in laptop desktop nas; do
    "$BIN/flotilla" enroll "$host" --out "$DEMO/bundles/$host.toml"
done

log "making sample data"
for host in laptop desktop; do
    mkdir -p "$DEMO/data/$host/docs" "$DEMO/data/$host/photos"
    for i in $(seq 1 20); do
        printf 'notes %s from %s\n' "$i" "$host" >"$DEMO/data/$host/docs/note-$i.txt"
    done
    head -c 3000000 /dev/urandom >"$DEMO/data/$host/photos/holiday.raw"
done
mkdir -p "$DEMO/data/nas/repository" "$DEMO/data/nas/restore"

log "starting three agents"
for host in laptop desktop; do
    "$BIN/flotilla-agent" run --bundle "$DEMO/bundles/$host.toml" --state-dir "$DEMO/state/$host" \
        --backup-root "$DEMO/data/$host" --heartbeat-interval 2s >"$DEMO/logs/$host.log" 2>&1 &
    PIDS+=($!)
done
"$BIN/flotilla-agent" run --bundle "$DEMO/bundles/nas.toml" --state-dir "$DEMO/state/nas" \
    --storage "$DEMO/data/nas/repository" --restore-root "$DEMO/data/nas/restore" \
    --listen 127.0.0.1:17443 --heartbeat-interval 2s >"$DEMO/logs/nas.log" 2>&1 &
NAS_PID=$!
PIDS+=($NAS_PID)

for _ in $(seq 50); do
    [ "$("$BIN/flotilla" hosts --json | grep -c '"status": "online"')" -eq 3 ] && break
    sleep 0.2
done

log "flotilla hosts"
"$BIN/flotilla" hosts

for host in laptop desktop; do
    log "flotilla estimate $host"
    "$BIN/flotilla" estimate "$host"
done

log "a task outside the host's backup roots is refused (exit code 4 expected)"
set +e
"$BIN/flotilla" estimate laptop --path /etc
code=$?
set -e
[ "$code" -eq 4 ] || die "expected exit code 4, got $code"

log "stopping nas with SIGTERM: it goes offline at once"
kill -TERM "$NAS_PID"
wait "$NAS_PID" || true
"$BIN/flotilla" hosts

log "flotilla events (the stream an alerting subscriber replays)"
"$BIN/flotilla" events

log "demo complete; logs and state are in $DEMO"
