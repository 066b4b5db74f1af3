#!/usr/bin/env python3
"""Print every Flotilla host that went offline, replaying the FLOTILLA_EVENTS stream.

    pip install nats-py msgpack
    python3 offline_subscriber.py [NATS_URL] [--once] [--durable NAME] [--idle SECONDS]

NATS_URL defaults to $NATS_URL, then nats://127.0.0.1:4222.

Without --durable it reads through an ordered (ephemeral) consumer from the start of the
stream, so every run prints the last 30 days. With --durable NAME it uses a durable pull
consumer and acknowledges what it printed, so the next run starts where this one
stopped. --once prints what is stored and exits when nothing more arrives for --idle
seconds (default 3); without it, it keeps printing new events until interrupted.

The wire format is in docs/protocol.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
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


def describe(data: bytes) -> str | None:
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
    detail = ev.get("detail") if isinstance(ev.get("detail"), dict) else {}
    millis = ev.get("time")
    when = (
        datetime.datetime.fromtimestamp(millis / 1000, tz=datetime.timezone.utc)
        .isoformat(timespec="seconds")
        .replace("+00:00", "Z")
        if isinstance(millis, int)
        else "?"
    )
    return f"{when}  {ev.get('host', '?'):<20} {detail.get('reason', '?'):<18} {ev.get('message', '')}"


async def run(url: str, once: bool, durable: str | None, idle: float) -> int:
    async def on_error(e: Exception) -> None:
        print(f"nats: {e}", file=sys.stderr)

    try:
        # Following, keep trying for ever (a daemon outlives server restarts); with
        # --once, give up after a few attempts so a wrong URL fails fast.
        nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=2 if once else -1, error_cb=on_error)
    except (NoServersError, OSError, asyncio.TimeoutError) as e:
        print(f"cannot connect to {url}: {e}", file=sys.stderr)
        return 1
    try:
        js = nc.jetstream()
        try:
            if durable:
                sub = await js.pull_subscribe(
                    SUBJECT,
                    durable=durable,
                    stream=STREAM,
                    config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL),
                )

                async def next_batch(timeout: float) -> list:
                    return await sub.fetch(batch=100, timeout=timeout)
            else:
                sub = await js.subscribe(SUBJECT, stream=STREAM, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)

                async def next_batch(timeout: float) -> list:
                    return [await sub.next_msg(timeout=timeout)]
        except NotFoundError:
            print(f"stream {STREAM} not found on {url}: no Flotilla agent has connected to this server yet", file=sys.stderr)
            return 1

        while True:
            try:
                batch = await next_batch(idle if once else 30)
            except NatsTimeoutError:
                if once:
                    return 0  # nothing more arrived within --idle seconds
                continue
            caught_up = False
            for msg in batch:
                line = describe(msg.data)
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
    p.add_argument("url", nargs="?", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"), help="NATS server URL (default: $NATS_URL, then nats://127.0.0.1:4222)")
    p.add_argument("--once", action="store_true", help="print what is stored, then exit")
    p.add_argument("--durable", metavar="NAME", help="durable consumer name: resume where the last run stopped")
    p.add_argument("--idle", type=float, default=3.0, metavar="SECONDS", help="with --once, exit after this long without a message (default 3)")
    args = p.parse_args()
    try:
        return asyncio.run(run(args.url, args.once, args.durable, args.idle))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
