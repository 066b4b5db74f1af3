#!/usr/bin/env bash
# The main job on a fresh machine: installs nats-server, builds Flotilla, starts
# a local fleet of three agents on loopback (two sources and a storage host),
# backs both sources up concurrently over QUIC into the storage host's
# deduplicated, encrypted repository, lists and browses the snapshots, restores
# one onto the other host and verifies it byte for byte, checks the repository,
# and shows the event stream. Everything lives under .flotilla-demo/.
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
export FLOTILLA_FLEET="$DEMO/fleet" FLOTILLA_NATS_URL="tls://127.0.0.1:$PORT"

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

log "creating the fleet: CA, signing key, repository key, NATS operator and account"
"$BIN/flotilla" init

log "writing the nats-server configuration (TLS from the fleet CA, the fleet's NATS identities)"
"$BIN/flotilla" nats-config --listen "127.0.0.1:$PORT" --store "$DEMO/nats" --out "$DEMO/nats.conf"

log "starting nats-server on 127.0.0.1:$PORT (TLS, JetStream, anonymous connections refused)"
"$NATS_SERVER_BIN" -c "$DEMO/nats.conf" >"$DEMO/logs/nats-server.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
kill -0 "${PIDS[0]}" 2>/dev/null || die "nats-server did not start: $(tail -5 "$DEMO/logs/nats-server.log")"

log "creating the fleet's streams and buckets"
"$BIN/flotilla" doctor

log "enrolling laptop, desktop and nas (each bundle holds the host's own NATS user)"
for host in laptop desktop nas; do
    "$BIN/flotilla" enroll "$host" --out "$DEMO/bundles/$host.toml"
done

log "making sample data (the two hosts share a 16 MiB photo)"
head -c 16000000 /dev/urandom >"$DEMO/shared-photo.raw"
for host in laptop desktop; do
    home="$DEMO/data/$host/home"
    mkdir -p "$home/docs" "$home/photos" "$home/.cache"
    for i in $(seq 1 50); do
        printf 'notes %s from %s\n' "$i" "$host" >"$home/docs/note-$i.txt"
    done
    cp "$DEMO/shared-photo.raw" "$home/photos/holiday.raw"
    head -c 4000000 /dev/urandom >"$home/photos/$host-only.raw"
    head -c 1000000 /dev/urandom >"$home/.cache/junk"
    ln -s docs/note-1.txt "$home/latest-note"
done
mkdir -p "$DEMO/data/nas/repository" "$DEMO/data/nas/restore"
# Files changed within the last second are not trusted to the file cache
# ("racily clean"); let the fresh sample data settle so the second backup
# below can show that unchanged files are not read again.
sleep 1.5

log "starting three agents: laptop and desktop (sources), nas (storage)"
for host in laptop desktop; do
    mkdir -p "$DEMO/data/$host/restored"
    "$BIN/flotilla-agent" run --bundle "$DEMO/bundles/$host.toml" --state-dir "$DEMO/state/$host" \
        --backup-root "$DEMO/data/$host/home" --restore-root "$DEMO/data/$host/restored" \
        --heartbeat-interval 2s >"$DEMO/logs/$host.log" 2>&1 &
    PIDS+=($!)
done
"$BIN/flotilla-agent" run --bundle "$DEMO/bundles/nas.toml" --state-dir "$DEMO/state/nas" \
    --storage "$DEMO/data/nas/repository" --restore-root "$DEMO/data/nas/restore" \
    --listen 127.0.0.1:0 --heartbeat-interval 2s >"$DEMO/logs/nas.log" 2>&1 &
NAS_PID=$!
PIDS+=($NAS_PID)

for _ in $(seq 100); do
    [ "$("$BIN/flotilla" hosts --json | grep -c '"status": "online"')" -eq 3 ] && break
    sleep 0.2
done

log "flotilla hosts"
"$BIN/flotilla" hosts

log "flotilla estimate laptop"
"$BIN/flotilla" estimate laptop

log "flotilla backup laptop,desktop --to nas --wait (both at once, deduplicated across hosts)"
"$BIN/flotilla" backup laptop,desktop --to nas --exclude '**/.cache' --wait

log "a second backup with nothing changed reads no file contents"
"$BIN/flotilla" backup laptop,desktop --to nas --exclude '**/.cache' --wait

log "flotilla snapshots"
"$BIN/flotilla" snapshots

SNAP="$("$BIN/flotilla" snapshots --host laptop --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')"
log "flotilla ls $SNAP"
"$BIN/flotilla" ls "$SNAP"

log "restoring laptop's snapshot onto desktop, then comparing byte for byte"
"$BIN/flotilla" restore "$SNAP" --to "desktop:$DEMO/data/desktop/restored/from-laptop" --wait
diff -r "$DEMO/data/laptop/home" "$DEMO/data/desktop/restored/from-laptop$DEMO/data/laptop/home" \
    --exclude .cache && log "restored tree is identical"

log "flotilla check nas --read-data"
"$BIN/flotilla" check nas --read-data

log "a restore outside the host's restore roots is refused (exit code 4 expected)"
set +e
"$BIN/flotilla" restore "$SNAP" --to desktop:/etc/flotilla-demo --wait
code=$?
set -e
[ "$code" -eq 4 ] || die "expected exit code 4, got $code"

log "stopping nas with SIGTERM: it goes offline at once"
kill -TERM "$NAS_PID"
wait "$NAS_PID" || true
"$BIN/flotilla" hosts

log "flotilla events --kind task (the stream an alerting subscriber replays)"
"$BIN/flotilla" events --kind task | grep -v task.progress | tail -12

log "demo complete; logs and state are in $DEMO"
