#!/usr/bin/env python3
"""Print every Flotilla host that went offline, replaying the FLOTILLA_EVENTS stream.

    pip install 'nats-py[nkeys]>=2.7' msgpack
    python3 offline_subscriber.py [NATS_URL] [--creds FILE] [--ca FILE] [--name NAME]
                                  [--once] [--durable NAME] [--idle SECONDS]

NATS_URL defaults to $NATS_URL, then tls://127.0.0.1:4222. --creds (default $NATS_CREDS)
is the file `flotilla enroll NAME --alerting --out NAME.creds` wrote, --ca (default
$NATS_CA) the fleet's ca.crt, and --name the subscriber's NAME (default: the creds
file's name without .creds), which sets the inbox prefix _INBOX.alert.NAME, the only one
its credentials may use.

Without --durable it reads through an ephemeral pull consumer from the start of the
stream, so every run prints the last 30 days; the server deletes that consumer 5 minutes
after its last use. With --durable NAME it uses a durable pull consumer and
acknowledges what it printed, so the next run starts where this one stopped. --once
prints what is stored and exits when nothing more arrives for --idle seconds (default
3); without it, it keeps printing new events until interrupted.

The wire format is in docs/protocol.md, what the credentials allow in docs/security.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import ssl
import sys

import msgpack
import nats
from nats.errors import NoServersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

STREAM = "FLOTILLA_EVENTS"
SUBJECT = "flotilla.events.agent.offline.*"
EVENT_VERSION = 1  # newest Event schema this script understands
EVENT_BYTES = 256 * 1024  # protocol limit: anything larger is not a valid event


def describe(subject: str, data: bytes) -> str | None:
    """One line for an agent.offline event, or None for anything else."""
    if len(data) > EVENT_BYTES:
        return None
    try:
        ev = msgpack.unpackb(data, raw=False)
    except Exception:  # hostile or corrupt bytes: skip, never crash
        return None
    if not isinstance(ev, dict) or ev.get("kind") != "agent.offline":
        return None
    v = ev.get("v")
    if not isinstance(v, int) or not 1 <= v <= EVENT_VERSION:
        print(f"skipping event with schema version {v!r}", file=sys.stderr)
        return None
    # The server lets a host publish only on subjects ending with its own name, so the
    # subject says which host this is about; the host field is the publisher's word.
    host = subject.rsplit(".", 1)[-1]
    detail = ev.get("detail") if isinstance(ev.get("detail"), dict) else {}
    millis = ev.get("time")
    when = (
        datetime.datetime.fromtimestamp(millis / 1000, tz=datetime.timezone.utc)
        .isoformat(timespec="seconds")
        .replace("+00:00", "Z")
        if isinstance(millis, int)
        else "?"
    )
    return f"{when}  {host:<20} {detail.get('reason', '?'):<18} {ev.get('message', '')}"


async def run(url: str, creds: str, ca: str, name: str, once: bool, durable: str | None, idle: float) -> int:
    async def on_error(e: Exception) -> None:
        print(f"nats: {e}", file=sys.stderr)

    inbox = f"_INBOX.alert.{name}"
    try:
        # Following, keep trying for ever (a daemon outlives server restarts); with
        # --once, give up after a few attempts so a wrong URL fails fast.
        nc = await nats.connect(
            servers=url,
            user_credentials=creds,
            tls=ssl.create_default_context(cafile=ca),  # the fleet CA, and no other
            inbox_prefix=inbox,
            connect_timeout=5,
            max_reconnect_attempts=2 if once else -1,
            error_cb=on_error,
        )
    except (NoServersError, OSError, asyncio.TimeoutError) as e:
        print(f"cannot connect to {url}: {e}", file=sys.stderr)
        return 1
    try:
        js = nc.jetstream()
        # A pull consumer, ephemeral or durable, delivering into our own inbox (nats-py
        # before 2.13 does not take the connection's prefix here by itself).
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT if durable else AckPolicy.NONE,
            inactive_threshold=None if durable else 300.0,
        )
        try:
            sub = await js.pull_subscribe(
                SUBJECT, durable=durable, stream=STREAM, config=config, inbox_prefix=f"{inbox}.".encode()
            )
        except NotFoundError:
            print(f"stream {STREAM} not found on {url}: run `flotilla doctor` on the coordinator", file=sys.stderr)
            return 1

        while True:
            try:
                batch = await sub.fetch(batch=100, timeout=idle if once else 30)
            except NatsTimeoutError:
                if once:
                    return 0  # nothing more arrived within --idle seconds
                continue
            caught_up = False
            for msg in batch:
                line = describe(msg.subject, msg.data)
                if line:
                    print(line, flush=True)
                if durable:
                    await msg.ack()
                caught_up = msg.metadata.num_pending == 0
            if once and caught_up:
                return 0
    finally:
        await nc.close()


def main() -> int:
    p = argparse.ArgumentParser(description="Print Flotilla hosts that went offline (agent.offline events).")
    p.add_argument("url", nargs="?", default=os.environ.get("NATS_URL", "tls://127.0.0.1:4222"), help="NATS server URL (default: $NATS_URL, then tls://127.0.0.1:4222)")
    p.add_argument("--creds", default=os.environ.get("NATS_CREDS"), metavar="FILE", help="the subscriber's .creds file (default: $NATS_CREDS)")
    p.add_argument("--ca", default=os.environ.get("NATS_CA"), metavar="FILE", help="the fleet's ca.crt (default: $NATS_CA)")
    p.add_argument("--name", metavar="NAME", help="the subscriber's name (default: the .creds file's name without .creds)")
    p.add_argument("--once", action="store_true", help="print what is stored, then exit")
    p.add_argument("--durable", metavar="NAME", help="durable consumer name: resume where the last run stopped")
    p.add_argument("--idle", type=float, default=3.0, metavar="SECONDS", help="with --once, exit after this long without a message (default 3)")
    args = p.parse_args()
    if not args.creds or not args.ca:
        p.error("give --creds and --ca (or set $NATS_CREDS and $NATS_CA)")
    name = args.name or os.path.basename(args.creds)
    if not args.name and name.endswith(".creds"):
        name = name[: -len(".creds")]
    try:
        return asyncio.run(run(args.url, args.creds, args.ca, name, args.once, args.durable, args.idle))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
