#!/usr/bin/env python3
"""Writes the seed inputs in fuzz/seeds/<target>/: a few valid encodings of
each message, so the fuzzers start from the shapes the decoders accept.

Standard library only (a tiny MessagePack writer below). The encodings follow
protocol/src (named fields, enums as rmp-serde writes them: unit variants as
strings, `tag = "type"` enums as one map, events with `kind`/`detail` at the
top level). Seeds need not be perfect: a seed the decoder refuses still
starts the fuzzer somewhere; the crate's test `every_target_is_wired_and_seeded`
checks that every target has some.

Nothing here is signed or sealed (no ed25519 or AES in the standard
library): `task_body` signs inside the harness, `snapshot_record` and
`sealed_blob` seal inside it, and the pack targets fix up BLAKE3 sums
themselves (flags 0x01 and 0x02), so zero hashes here are fine.

Usage: python3 fuzz/seeds.py   (rewrites fuzz/seeds/ in place)
"""

import os
import shutil
import struct

NOW = 1_700_000_000_000
SNAPSHOT_ID = "00112233445566778899aabbccddeeff"


class F32(float):
    """A float written as MessagePack float 32 (the heartbeat's load)."""


def mp(o):
    """MessagePack of `o` (None, bool, int, F32, str, bytes, list, dict)."""
    if o is None:
        return b"\xc0"
    if o is True:
        return b"\xc3"
    if o is False:
        return b"\xc2"
    if isinstance(o, F32):
        return b"\xca" + struct.pack(">f", o)
    if isinstance(o, int):
        if o >= 0:
            if o <= 0x7F:
                return bytes([o])
            for tag, fmt, top in ((0xCC, ">B", 0xFF), (0xCD, ">H", 0xFFFF), (0xCE, ">I", 0xFFFFFFFF)):
                if o <= top:
                    return bytes([tag]) + struct.pack(fmt, o)
            return b"\xcf" + struct.pack(">Q", o)
        if o >= -32:
            return struct.pack(">b", o)
        for tag, fmt, low in ((0xD0, ">b", -0x80), (0xD1, ">h", -0x8000), (0xD2, ">i", -0x80000000)):
            if o >= low:
                return bytes([tag]) + struct.pack(fmt, o)
        return b"\xd3" + struct.pack(">q", o)
    if isinstance(o, str):
        b = o.encode()
        if len(b) <= 31:
            return bytes([0xA0 | len(b)]) + b
        if len(b) <= 0xFF:
            return b"\xd9" + bytes([len(b)]) + b
        return b"\xda" + struct.pack(">H", len(b)) + b
    if isinstance(o, (bytes, bytearray)):
        if len(o) <= 0xFF:
            return b"\xc4" + bytes([len(o)]) + bytes(o)
        return b"\xc5" + struct.pack(">H", len(o)) + bytes(o)
    if isinstance(o, (list, tuple)):
        head = bytes([0x90 | len(o)]) if len(o) <= 15 else b"\xdc" + struct.pack(">H", len(o))
        return head + b"".join(mp(x) for x in o)
    if isinstance(o, dict):
        head = bytes([0x80 | len(o)]) if len(o) <= 15 else b"\xde" + struct.pack(">H", len(o))
        return head + b"".join(mp(k) + mp(v) for k, v in o.items())
    raise TypeError(type(o))


def bid(n):
    """A 32-byte blob id."""
    return bytes([n]) * 32


# --- tasks -------------------------------------------------------------------

def task(kind, host="nas", issued=NOW, expires=NOW + 60_000, fleet="f1", v=1):
    return {
        "v": v,
        "id": "0b7e4a9e-5d3c-4c1e-9a57-2f8d1e6b3c10",
        "fleet": fleet,
        "host": host,
        "issued_at": issued,
        "expires_at": expires,
        "kind": kind,
    }


KINDS = {
    "estimate": {"type": "estimate", "paths": ["/srv"]},
    "backup": {"type": "backup", "paths": ["/srv"], "excludes": ["*.tmp"],
               "storage": "vault", "storage_addr": "192.0.2.10:7443"},
    "restore": {"type": "restore", "snapshot": "ab" * 16, "storage": "vault",
                "storage_addr": "[2001:db8::1]:7443", "target": "/restore", "includes": []},
    "check": {"type": "check", "read_data": True},
    "forget": {"type": "forget", "snapshots": ["ab" * 16]},
    "cancel": {"type": "cancel", "task_id": "t-1"},
    "prune": {"type": "prune", "dry_run": False, "grace_secs": 3600},
}


def envelope(body, signature=bytes(64)):
    return {"v": 1, "body": mp(body), "signature": signature}


# --- repository data -----------------------------------------------------------

SUMMARY = {k: 1 for k in ("files_new", "files_changed", "files_unchanged", "dirs",
                          "bytes_read", "bytes_total", "blobs_new", "bytes_added",
                          "errors", "duration_ms")}


def record(meta=bytes(61)):
    return {"v": 1, "id": SNAPSHOT_ID, "host": "nas", "time": NOW, "tree": bid(1),
            "partial": False, "blobs": [bid(1), bid(2)], "meta": meta}


META = {"v": 1, "paths": ["/srv"], "excludes": [], "task_id": "t-1", "summary": SUMMARY,
        "unreadable": [], "tree": bid(1), "host": "nas", "time": NOW}


def node(name, kind, **extra):
    n = {"name": name, "kind": kind, "mode": 0o644, "uid": 1000, "gid": 1000,
         "user": "alice", "group": None, "mtime_ns": 1, "atime_ns": -1, "ctime_ns": 2,
         "size": 0, "inode": 7, "dev": 8, "nlink": 1, "rdev": 0, "link_target": None,
         "content": [], "sparse": False, "subtree": None, "xattrs": []}
    n.update(extra)
    return n


TREE = {"v": 1, "nodes": [
    node(b"a.txt", "file", size=5, content=[{"id": bid(3), "len": 5}],
         xattrs=[{"name": b"user.x", "value": b"\x00\xff"}]),
    node(b"dir", "dir", mode=0o755, subtree=bid(4)),
    node(b"link", "symlink", link_target=b"a.txt"),
    node(b"\xffnot-utf8", "char_device", rdev=0x0501),
]}

# A zstd frame by hand: magic, descriptor (single segment, 1-byte content
# size), content size 5, one raw last block of 5 bytes.
ZSTD_HELLO = bytes.fromhex("28b52ffd2005290000") + b"hello"

PACK_HEADER = b"FLOTPACK\x00\x01"


def pack(blobs):
    """A pack with zero hashes and a zero trailer (the targets fix them up)."""
    out = bytearray(PACK_HEADER)
    for kind, id_, sealed in blobs:
        out += b"BLOB" + bytes([kind]) + id_ + struct.pack(">I", len(sealed)) + bytes(32) + sealed
    return bytes(out + bytes(44))


PACK = pack([(0, bid(1), b"hello"), (1, bid(2), b"world!")])


def parts(flags, pack_bytes=b"", idx=b"", dmg=b"", snap=b""):
    """A `repo_files` input: flags, three u16-prefixed parts, the snapshot."""
    out = bytes([flags])
    for p in (pack_bytes, idx, dmg):
        out += struct.pack(">H", len(p)) + p
    return out + snap


IDX = {"v": 1, "pack": "ab" * 32, "size": 10 + 73 + 5 + 44, "entries": [
    {"id": bid(1), "kind": "data", "offset": 83, "length": 5, "hash": bytes(32)}]}

# --- events and the rest ----------------------------------------------------------


def event(kind, detail):
    return {"v": 1, "id": "e-1", "time": NOW, "host": "nas", "severity": "info",
            "message": "hello", "kind": kind, "detail": detail}


CHECK_REPORT = {"type": "check", "packs": 1, "blobs": 2, "snapshots": 1, "bytes": 100,
                "problems": [{"kind": "blob_damaged", "pack": "ab" * 32, "blob": bid(2),
                              "message": "m"}],
                "damaged_blobs": [bid(2)], "affected_snapshots": [SNAPSHOT_ID]}

HEARTBEAT = {"v": 1, "host": "nas", "fleet": "f1", "state": "online", "version": "0.1.0",
             "started_at": NOW - 1000, "time": NOW, "interval_ms": 5000,
             "load": [F32(0.5), F32(0.25), F32(0.125)], "rss_bytes": 1 << 24,
             "mem_total_bytes": 1 << 33, "mem_available_bytes": 1 << 32,
             "roles": ["source", "storage"], "quic_addr": "192.0.2.10:7443",
             "roots": [{"kind": "backup", "path": "/srv", "free_bytes": 1 << 30,
                        "total_bytes": 1 << 31, "error": None}],
             "running": [{"task_id": "t-1", "kind": "backup", "started_at": NOW}]}

BUNDLE = """version = 1
fleet = "f1"
host = "nas"
nats_url = "nats://127.0.0.1:4222"
coordinator_key = "{key}"
ca_cert = "-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----\\n"
cert = "-----BEGIN CERTIFICATE-----\\nMIIC\\n-----END CERTIFICATE-----\\n"
key = "-----BEGIN PRIVATE KEY-----\\nMIIE\\n-----END PRIVATE KEY-----\\n"
repo_key = "{repo}"
""".format(key="ab" * 32, repo="01" * 32)


def seeds():
    env = envelope(task(KINDS["estimate"]))
    s = {
        "task_envelope": {
            "estimate": mp(env),
            "unsigned": mp(envelope(task(KINDS["backup"]), b"")),
        },
        "task_body": {name: mp(task(k)) for name, k in KINDS.items()},
        "heartbeat": {"storage": mp(HEARTBEAT)},
        "event": {
            "online": mp(event("agent.online", {"version": "0.1.0", "roles": ["storage"],
                                                "quic_addr": "192.0.2.10:7443"})),
            "offline": mp(event("agent.offline", {"reason": "shutdown"})),
            "rejected": mp(event("security.task_rejected", {
                "task_id": None, "reason": "bad_signature", "detail": "x",
                "subject": "flotilla.task.nas"})),
            "progress": mp(event("task.progress", {
                "task_id": "t-1", "task_kind": "backup", "files": 1, "dirs": 1, "bytes": 10,
                "current": "/srv/a", "files_total": None, "bytes_total": None,
                "elapsed_ms": 5})),
            "finished": mp(event("task.finished", {
                "task_id": "t-1", "task_kind": "check", "outcome": "succeeded", "error": None,
                "retryable": False, "result": CHECK_REPORT, "duration_ms": 3})),
            "job_failed": mp(event("job.failed", {
                "task_id": "t-1", "job_kind": "backup", "plan": "nightly", "attempts": 3,
                "error": "e", "snapshot": None})),
            "check_failed": mp(event("check.failed", {
                "task_id": "t-1", "problems": 1, "damaged_blobs": ["ab" * 32],
                "affected_snapshots": []})),
        },
        "fleet_status": {"one": mp({"v": 1, "time": NOW, "queued": 0, "entries": [{
            "plan": "nightly", "host": "nas", "storage": "vault", "last_success": NOW - 1000,
            "last_snapshot": "ab" * 16, "next_run": NOW + 1000, "overdue": False,
            "running_task": None}]})},
        "frame_request": {
            "hello": mp({"type": "hello", "v": 1, "task": mp(env)}),
            "have": mp({"type": "have", "ids": [bid(1), bid(2)]}),
            "put": mp({"type": "put", "id": bid(1), "kind": "data", "data": b"sealed"}),
            "commit": mp({"type": "commit", "snapshot": record()}),
            "get": mp({"type": "get", "ids": [bid(3)]}),
            "get_snapshot": mp({"type": "get_snapshot", "id": "0011"}),
        },
        "frame_response": {
            "welcome": mp({"type": "welcome", "repo_id": "ab" * 16}),
            "missing": mp({"type": "missing", "ids": [bid(1)]}),
            "stored": mp({"type": "stored", "blobs": 1, "bytes": 10}),
            "committed": mp({"type": "committed", "id": SNAPSHOT_ID}),
            "blob": mp({"type": "blob", "id": bid(1), "kind": "tree", "data": b"sealed"}),
            "snapshot": mp({"type": "snapshot", "snapshot": record()}),
            "error": mp({"type": "error", "code": "not_found", "message": "m",
                         "retryable": False}),
        },
        "repo_reply": {
            "snapshots": mp({"type": "snapshots", "snapshots": [record()]}),
            "stats": mp({"type": "stats", "stats": {"packs": 1, "blobs": 2,
                                                    "stored_bytes": 3, "snapshots": 1}}),
            "tree": mp({"type": "tree", "data": b"\x01" + bytes(12) + b"sealed tree"}),
            "error": mp({"type": "error", "message": "m"}),
        },
        "snapshot_record": {"record": mp(record()), "meta": mp(META)},
        "tree": {"tree": mp(TREE), "empty": mp({"v": 1, "nodes": []})},
        "sealed_blob": {"raw": b"\x00hello", "zstd": b"\x01" + ZSTD_HELLO,
                        "unknown_codec": b"\x07x", "tree": b"\x00" + mp(TREE)},
        "bundle": {"bundle.toml": BUNDLE.encode()},
        "repo_files": {
            "indexed_from_pack": parts(0x47, PACK, snap=mp(record())),
            "stale_index": parts(0x03, PACK, mp(IDX), snap=mp(record())),
            "no_index": parts(0x53, PACK, snap=mp(record())),
            "damage_recorded": parts(0xC7, PACK, snap=mp(record())),
        },
        "pack_format": {
            "fixed": b"\x03" + PACK,
            "damaged": b"\x00" + PACK,
            "empty": b"\x03" + pack([]),
        },
        "index_file": {
            "one_entry": mp(IDX),
            "empty": mp({"v": 1, "pack": "cd" * 32, "size": 54, "entries": []}),
        },
    }
    return s


def main():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")
    shutil.rmtree(root, ignore_errors=True)
    for target, files in seeds().items():
        d = os.path.join(root, target)
        os.makedirs(d)
        for name, data in files.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
    print(f"wrote seeds for {len(seeds())} targets into {root}")


if __name__ == "__main__":
    main()
