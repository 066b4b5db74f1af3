#!/usr/bin/env python3
"""Benchmark Flotilla side by side with restic, borg and rsync.

Method
------
* **Datasets** are deterministic (fixed seeds) and generated once under
  ``WORK/datasets/<name>-<params-hash>/data``; a ``.complete`` marker next to
  ``data`` says generation finished, so later runs reuse them. ``small`` is many
  small files (half text, half random bytes), ``large`` a few big files (half
  random, half text), ``usr`` a copy of real files from ``/usr/lib`` and
  ``/usr/share`` (whatever this host has, walked in sorted order).
* **Operations**, for every (tool, dataset, repetition), each against a fresh
  repository on the same disk (``WORK/run/repo-TOOL``):
  ``initial`` (first backup), ``unchanged`` (second backup, nothing changed),
  ``changed`` (1% of the files, at least one, get 4 KiB overwritten at a seeded
  offset, the same files and bytes every time; then a backup; afterwards the original bytes, atime and mtime are put
  back), and ``restore`` (a full restore into an empty directory: the initial
  snapshot for restic, borg and Flotilla; rsync's mirror holds only the latest,
  changed, state). Each restore is verified before it counts: the whole restored
  tree's listing (paths, types, sizes, symlink targets) must equal the dataset's,
  and 50 deterministic files, every changed file and every file of ``large`` are
  compared byte for byte. A mismatch aborts the run.
* **What is timed**: only the external command of the operation, with
  ``time.monotonic()`` around it (from fork to its exit being reaped). Setup
  (repository init, starting nats-server and agents, enrolment), dataset
  changes, waiting, verification and ``sync`` are not timed. For Flotilla the
  command is ``flotilla backup|restore ... --wait``: dispatch over NATS, the
  agents' work over QUIC and the report back. restic's empty repository is made
  once per run (``restic init`` calibrates its key derivation for ~3 s) and
  copied for each sequence; each copy gets its own fresh cache.
* **Fairness**: tools are interleaved. For each repetition, for each dataset,
  every tool runs its whole sequence in an order rotated by the repetition
  number; repositories, caches and (for Flotilla) the whole fleet are created
  fresh per sequence and deleted afterwards. The page cache is warm for
  everyone: the dataset is read once, untimed, before each tool's sequence, and
  caches are never dropped. ``sync`` runs after every operation (untimed) so
  that one tool's dirty pages are not written back during another's timing.
  Flotilla's file cache distrusts files changed less than 1 s before a backup
  ("racily clean"); so that ``unchanged`` measures the no-read path for every
  tool alike, the run waits until the dataset is 1.1 s old before ``initial``.
  There is no wait after changing files: every tool reads a changed file anyway.
* **Memory**: one-shot commands (restic, borg, rsync, the ``flotilla`` CLI) are
  reaped with ``os.wait4``, whose ``ru_maxrss`` is the peak RSS of the process
  (Linux folds in the peaks of its waited-for children, e.g. rsync's helpers).
  A forked child's ``ru_maxrss`` also counts the RSS it inherited from its
  parent before ``exec``, so the commands are not forked from this script but
  from a bare launcher interpreter (``python -I -S``, a few MiB), which times the
  command and reports its ``wait4`` rusage; the launcher's own floor (the peak
  reported for ``true``) is recorded as ``rss_floor_bytes``. Flotilla's
  long-running agents are measured through ``/proc/PID``: ``5`` is written to
  ``clear_refs`` before each operation (resets VmHWM) and ``VmHWM`` is read from
  ``status`` after it.

Outputs in RESULTS: ``raw.json`` (metadata and every measurement), ``summary.csv``
and ``summary.json`` (medians, ranges, ratios), ``chart.svg`` (times),
``repo.svg`` (repository sizes) and ``report.md`` (the Markdown also printed on stdout).
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import csv
import datetime
import hashlib
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import stat
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from xml.etree import ElementTree
from xml.sax.saxutils import escape

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

ALL_TOOLS = ("flotilla", "restic", "borg", "rsync")
ALL_DATASETS = ("small", "large", "usr")
OPS = ("initial", "unchanged", "changed", "restore")
PEERS = ("restic", "borg", "rsync")

SEED = 20261122
GENERATOR_VERSION = 2
RACY_WAIT = 1.1  # seconds; Flotilla's racily-clean window is 1 s
CHANGE_FRACTION = 0.01
CHANGE_BYTES = 4 * KiB
VERIFY_SAMPLE = 50
TAIL_LINES = 20

# The only global mutable state: processes started by this script, by pid, so
# that every exit path (exception, SIGTERM, Ctrl-C, atexit) can stop them.
_PROCS: dict[int, subprocess.Popen] = {}
_PROCS_LOCK = threading.Lock()


# --------------------------------------------------------------------------
# Errors, logging, process registry
# --------------------------------------------------------------------------


class BenchError(Exception):
    """A failure that aborts the run, naming tool, dataset, op and the logs to show."""

    def __init__(
        self,
        tool: str,
        dataset: str,
        op: str,
        message: str,
        logs: tuple[Path, ...] = (),
    ) -> None:
        super().__init__(message)
        self.tool = tool
        self.dataset = dataset
        self.op = op
        self.message = message
        self.logs = logs

    def render(self) -> str:
        """The full error text with the last lines of each log."""
        parts = [f"compare.py: {self.tool} / {self.dataset} / {self.op}: {self.message}"]
        for log in self.logs:
            parts.append(f"--- last {TAIL_LINES} lines of {log} ---")
            parts.append(tail(log))
        return "\n".join(parts)


@dataclass(frozen=True)
class Where:
    """Which tool, dataset and operation a command belongs to (for errors)."""

    tool: str
    dataset: str
    op: str

    def fail(self, message: str, *logs: Path) -> BenchError:
        return BenchError(self.tool, self.dataset, self.op, message, tuple(logs))


def say(message: str) -> None:
    """Progress line on stderr."""
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last lines of a text file, or a note that it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * KiB))
            data = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"(cannot read: {e})"
    text = "\n".join(data.splitlines()[-lines:])
    return text if text else "(empty)"


def register(proc: subprocess.Popen) -> None:
    with _PROCS_LOCK:
        _PROCS[proc.pid] = proc


def unregister(proc: subprocess.Popen) -> None:
    with _PROCS_LOCK:
        _PROCS.pop(proc.pid, None)


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send a signal to a process's group (every child runs in its own session)."""
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_process(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL; always reaps."""
    if proc.returncode is None:
        signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            signal_group(proc, signal.SIGKILL)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
    unregister(proc)


def terminate_all() -> None:
    """Stop every process this script started and has not reaped yet."""
    with _PROCS_LOCK:
        procs = list(_PROCS.values())
    for proc in procs:
        signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except (subprocess.TimeoutExpired, ChildProcessError):
            signal_group(proc, signal.SIGKILL)
            try:
                proc.wait(timeout=5)
            except (subprocess.TimeoutExpired, ChildProcessError):
                pass
        unregister(proc)


def exit_on_signal(signum: int, _frame: Any) -> None:
    """Turn SIGTERM/SIGHUP into SystemExit so that finally blocks and atexit run."""
    raise SystemExit(128 + signum)


# --------------------------------------------------------------------------
# Running commands
# --------------------------------------------------------------------------


@dataclass
class Measured:
    """One finished command: exit code, wall seconds, peak RSS, its output files."""

    returncode: int
    seconds: float
    peak_rss_bytes: int
    stdout: Path
    stderr: Path
    aborted: Optional[str]  # why it was killed (timeout, a daemon died), if it was

    def stdout_text(self) -> str:
        return self.stdout.read_text("utf-8", "replace")


@dataclass
class LogDir:
    """Numbered stdout/stderr files for the commands of one sequence."""

    path: Path
    counter: int = 0

    def pair(self, name: str) -> tuple[Path, Path]:
        self.counter += 1
        stem = self.path / f"{self.counter:03d}-{name}"
        return Path(f"{stem}.out"), Path(f"{stem}.err")


# A tiny launcher between this script and each measured command. A forked
# child inherits its parent's RSS until it execs, and Linux keeps that in the
# child's ru_maxrss; forked from this (large) Python process, rsync would report
# tens of MiB it never used. The launcher is a bare interpreter (-I -S, ~5 MiB)
# that forks the command, times it and reports the os.wait4 rusage of that
# command alone.
LAUNCHER = r"""
import os, sys, time
report, cmd = sys.argv[1], sys.argv[2:]
start = time.monotonic()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        os.write(2, ("cannot run %s: %s\n" % (cmd[0], e)).encode())
    os._exit(127)
_, status, usage = os.wait4(pid, 0)
seconds = time.monotonic() - start
fd = os.open(report, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.write(fd, ("%r %d %d\n" % (seconds, usage.ru_maxrss, status)).encode())
os.close(fd)
code = os.waitstatus_to_exitcode(status)
os._exit(code if code >= 0 else 128 - code)
"""


def read_launcher_report(path: Path) -> Optional[tuple[float, int]]:
    """(seconds, ru_maxrss in bytes) as the launcher measured them, if it got that far."""
    try:
        seconds, maxrss, _status = path.read_text().split()
        return float(seconds), int(maxrss) * KiB
    except (OSError, ValueError):
        return None


def run_measured(
    cmd: list[str],
    *,
    env: dict[str, str],
    logs: LogDir,
    name: str,
    timeout: float,
    cwd: Optional[Path] = None,
    health: Optional[Callable[[], Optional[str]]] = None,
) -> Measured:
    """Run a command to completion through the launcher: its time and ru_maxrss.

    A watchdog thread kills the command after `timeout` seconds, or as soon as
    `health` returns a reason (e.g. an agent the command waits for has died).
    """
    out_path, err_path = logs.pair(name)
    report = out_path.with_suffix(".rusage")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", LAUNCHER, str(report), *cmd],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        register(proc)
        done = threading.Event()
        aborted: list[str] = []
        watchdog = threading.Thread(
            target=watch_command, args=(proc, start + timeout, health, done, aborted), daemon=True
        )
        watchdog.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            done.set()
            watchdog.join()
        seconds = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        unregister(proc)
    inner = read_launcher_report(report)
    if inner is not None:
        seconds, peak = inner
    else:  # the launcher was killed (timeout): fall back to its own numbers
        peak = usage.ru_maxrss * KiB
    return Measured(
        returncode=proc.returncode,
        seconds=seconds,
        peak_rss_bytes=peak,
        stdout=out_path,
        stderr=err_path,
        aborted=aborted[0] if aborted else None,
    )


def watch_command(
    proc: subprocess.Popen,
    deadline: float,
    health: Optional[Callable[[], Optional[str]]],
    done: threading.Event,
    aborted: list[str],
) -> None:
    """Kill proc's group at the deadline or when health() names a problem."""
    while not done.wait(0.25):
        reason = None
        if time.monotonic() > deadline:
            reason = "timed out"
        elif health is not None:
            reason = health()
        if reason:
            aborted.append(reason)
            if not done.is_set():
                signal_group(proc, signal.SIGKILL)
            return


def rss_floor(logs: LogDir) -> int:
    """The smallest peak RSS the launcher can report (`true`'s, inherited at fork)."""
    return run_measured(["true"], env=dict(os.environ), logs=logs, name="rss-floor", timeout=30).peak_rss_bytes


def run_checked(
    cmd: list[str],
    *,
    where: Where,
    env: dict[str, str],
    logs: LogDir,
    name: str,
    timeout: float,
    cwd: Optional[Path] = None,
    extra_logs: tuple[Path, ...] = (),
    health: Optional[Callable[[], Optional[str]]] = None,
) -> Measured:
    """run_measured, but a kill or non-zero exit is a BenchError with the log tails."""
    m = run_measured(cmd, env=env, logs=logs, name=name, timeout=timeout, cwd=cwd, health=health)
    if m.aborted == "timed out":
        raise where.fail(f"`{' '.join(cmd)}` timed out after {timeout:.0f} s", m.stderr, m.stdout, *extra_logs)
    if m.aborted:
        raise where.fail(f"`{' '.join(cmd)}` was stopped: {m.aborted}", *extra_logs, m.stderr, m.stdout)
    if m.returncode != 0:
        raise where.fail(
            f"`{' '.join(cmd)}` exited with code {m.returncode}",
            m.stderr,
            m.stdout,
            *extra_logs,
        )
    return m


def spawn_daemon(cmd: list[str], *, env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start a long-running process with stdout and stderr into `log`."""
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    register(proc)
    return proc


def first_line_of(cmd: list[str]) -> str:
    """First output line of a quick informational command, or why it failed."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    text = (r.stdout or r.stderr).strip()
    return text.splitlines()[0] if text else f"unknown (exit {r.returncode})"


def free_port(kind: socket.SocketKind) -> int:
    """A currently free loopback port (TCP or UDP)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------
# File trees
# --------------------------------------------------------------------------

# relative path -> ("f", size) | ("l", link target) | ("d", 0) | ("o", 0)
Listing = dict[str, tuple[str, Any]]


def scan_tree(root: Path) -> Listing:
    """Every entry under root (not following symlinks), keyed by relative path."""
    listing: Listing = {}
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(os.path.join(root, rel_dir)) as it:
            for entry in it:
                rel = os.path.join(rel_dir, entry.name) if rel_dir else entry.name
                if entry.is_symlink():
                    listing[rel] = ("l", os.readlink(entry.path))
                elif entry.is_dir(follow_symlinks=False):
                    listing[rel] = ("d", 0)
                    stack.append(rel)
                elif entry.is_file(follow_symlinks=False):
                    listing[rel] = ("f", entry.stat(follow_symlinks=False).st_size)
                else:
                    listing[rel] = ("o", 0)
    return listing


def tree_bytes(root: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of the regular files under root."""
    apparent = allocated = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                apparent += st.st_size
                allocated += st.st_blocks * 512
    return apparent, allocated


def read_all(root: Path, listing: Listing) -> int:
    """Read every regular file once (warms the page cache); returns bytes read."""
    buf = bytearray(MiB)
    view = memoryview(buf)
    total = 0
    for rel, (kind, _size) in listing.items():
        if kind != "f":
            continue
        try:
            with open(root / rel, "rb", buffering=0) as f:
                while n := f.readinto(view):
                    total += n
        except OSError:
            pass
    return total


def remove_tree(path: Path) -> None:
    """rm -rf that tolerates absence."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


# --------------------------------------------------------------------------
# Dataset generation
# --------------------------------------------------------------------------

VOCABULARY = (
    "the of and to in is was that for on with as by at from it his an were are "
    "which this be or has had not but have they one you all their there been "
    "more would can about when who what so up out if into time only new some "
    "could these two may first then do any like other my than our over such "
    "make no after most also made many before must through back years where "
    "much your way well down should because each just those people how too "
    "little state good very world still own see men work long get here between "
    "both life being under never day same another know while last might us "
    "great old year off come since against go came right used take three "
    "backup storage repository snapshot host fleet agent network disk file "
    "directory archive restore chunk index pack key server daemon task event "
    "schedule policy retention prune check verify encrypt compress hash report "
    "system kernel memory process thread socket packet route table queue log "
    "river mountain forest garden window kitchen letter morning evening summer "
    "winter harbor island bridge market village station library museum theater"
).split()


def make_line_pool(seed: int, count: int = 2000) -> list[str]:
    """The vocabulary text is drawn from (kept as a function of the seed so a
    later generator can vary it)."""
    del seed, count
    return list(VOCABULARY)


def text_bytes(rng: random.Random, pool: list[str], size: int) -> bytes:
    """`size` bytes of text: words drawn one by one from the vocabulary, about
    twelve to a line. Drawing words, not whole lines, keeps the text from
    repeating itself: zstd gets about 3:1 out of it, as out of real prose,
    not the 14:1 of a small pool of repeated lines."""
    parts: list[bytes] = []
    have = 0
    while have < size:
        words = rng.choices(pool, k=min(1 << 20, max(64, (size - have) // 5)))
        for i in range(12, len(words), 12):
            words[i] = words[i] + "\n"
        chunk = (" ".join(words) + "\n").encode("ascii")
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts)[:size]


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset's name and generation parameters (hashed into its directory name)."""

    name: str
    params: dict[str, Any]

    def key(self) -> str:
        blob = json.dumps(
            {"name": self.name, "params": self.params, "seed": SEED, "v": GENERATOR_VERSION},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def dataset_spec(name: str, quick: bool) -> DatasetSpec:
    """The parameters of each dataset, full size or quick."""
    if name == "small":
        params = {"files": 400 if quick else 100_000, "min": 1 * KiB, "max": 16 * KiB, "per_dir": 100}
    elif name == "large":
        params = {"files": 4 if quick else 8, "size": 4 * MiB if quick else 256 * MiB}
    elif name == "usr":
        params = {"limit": 24 * MiB if quick else 1 * GiB, "sources": ["/usr/lib", "/usr/share"]}
    else:
        raise ValueError(f"unknown dataset {name}")
    return DatasetSpec(name, params)


def generate_small(root: Path, params: dict[str, Any]) -> None:
    """Many small files, ~100 per directory, two levels of directories."""
    rng = random.Random(f"{SEED}:small")
    pool = make_line_pool(SEED)
    files, per_dir = params["files"], params["per_dir"]
    dirs = math.ceil(files / per_dir)
    fan = max(1, math.ceil(math.sqrt(dirs)))
    current = None
    for i in range(files):
        d = i // per_dir
        if d != current:
            current = d
            directory = root / f"d{d // fan:03d}" / f"d{d % fan:03d}"
            directory.mkdir(parents=True, exist_ok=True)
        size = rng.randint(params["min"], params["max"])
        if i % 2 == 0:
            data, ext = text_bytes(rng, pool, size), "txt"
        else:
            data, ext = rng.randbytes(size), "bin"
        with open(directory / f"f{i:06d}.{ext}", "wb") as f:
            f.write(data)
        if (i + 1) % 10_000 == 0 or i + 1 == files:
            say(f"  small: {i + 1}/{files} files")


def write_random_file(path: Path, rng: random.Random, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, 8 * MiB)
            f.write(rng.randbytes(n))
            left -= n


def write_text_file(path: Path, rng: random.Random, pool: list[str], size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, 8 * MiB)
            f.write(text_bytes(rng, pool, n))
            left -= n


def generate_large(root: Path, params: dict[str, Any]) -> None:
    """A few big files: even-numbered random, odd-numbered text."""
    pool = make_line_pool(SEED)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(params["files"]):
        rng = random.Random(f"{SEED}:large:{i}")
        if i % 2 == 0:
            write_random_file(root / f"file-{i:02d}.bin", rng, params["size"])
        else:
            write_text_file(root / f"file-{i:02d}.txt", rng, pool, params["size"])
        say(f"  large: {i + 1}/{params['files']} files of {params['size'] // MiB} MiB")


def sorted_walk(top: Path) -> Iterator[tuple[Path, os.DirEntry]]:
    """Pre-order walk in sorted order, not following symlinks; unreadable dirs skipped."""
    try:
        with os.scandir(top) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        yield Path(entry.path), entry
        if entry.is_dir(follow_symlinks=False):
            yield from sorted_walk(Path(entry.path))


def generate_usr(root: Path, params: dict[str, Any]) -> None:
    """Copy real files (and symlinks, as links) from /usr until `limit` bytes are copied."""
    limit = params["limit"]
    copied = 0
    next_report = 100 * MiB
    for source in params["sources"]:
        src_top = Path(source)
        for src, entry in sorted_walk(src_top):
            if copied >= limit:
                return
            dst = root / src.relative_to("/usr")
            try:
                if entry.is_symlink():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(os.readlink(src), dst)
                elif entry.is_dir(follow_symlinks=False):
                    dst.mkdir(parents=True, exist_ok=True)
                elif entry.is_file(follow_symlinks=False):
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dst, follow_symlinks=False)
                    copied += dst.stat().st_size
            except OSError:
                if dst.is_file() and not dst.is_symlink():
                    dst.unlink()
                continue
            if copied >= next_report:
                say(f"  usr: {copied // MiB} MiB of {limit // MiB} MiB copied")
                next_report += 100 * MiB
    say(f"  usr: {copied // MiB} MiB copied (/usr has less than the limit)")


GENERATORS = {"small": generate_small, "large": generate_large, "usr": generate_usr}


@dataclass
class Change:
    """One file's 4 KiB change, with what it takes to undo it."""

    rel: str
    offset: int
    old: bytes
    new: bytes
    atime_ns: int
    mtime_ns: int


@dataclass
class Dataset:
    """A generated dataset, its listing and its pristine-since time."""

    spec: DatasetSpec
    base: Path  # WORK/datasets/<name>-<hash>
    root: Path  # base/data, canonical: what gets backed up
    listing: Listing
    stats: dict[str, Any]
    settled_after: float  # wall time after which the dataset is not "racily clean"

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def journal(self) -> Path:
        return self.base / ".changes.json"

    def regular_files(self) -> list[str]:
        return sorted(rel for rel, (kind, _) in self.listing.items() if kind == "f")

    def mark_modified(self) -> None:
        self.settled_after = time.time() + RACY_WAIT

    def wait_settled(self) -> None:
        """Sleep until the last change to the dataset is RACY_WAIT seconds old."""
        delay = self.settled_after - time.time()
        if delay > 0:
            time.sleep(delay)


def listing_stats(listing: Listing) -> dict[str, int]:
    kinds = [kind for kind, _ in listing.values()]
    return {
        "files": kinds.count("f"),
        "dirs": kinds.count("d"),
        "symlinks": kinds.count("l"),
        "bytes": sum(v for k, v in listing.values() if k == "f"),
    }


def prepare_dataset(work: Path, spec: DatasetSpec) -> Dataset:
    """Generate a dataset unless a complete copy exists; undo an interrupted change."""
    base = work / "datasets" / f"{spec.name}-{spec.key()}"
    marker = base / ".complete"
    root = base / "data"
    if not marker.exists():
        say(f"generating dataset {spec.name} in {base}")
        remove_tree(base)
        root.mkdir(parents=True)
        started = time.monotonic()
        GENERATORS[spec.name](root, spec.params)
        stats = listing_stats(scan_tree(root))
        stats["generation_seconds"] = round(time.monotonic() - started, 1)
        marker.write_text(json.dumps({"params": spec.params, "seed": SEED, **stats}, indent=1))
        say(f"dataset {spec.name}: {stats['files']} files, {stats['bytes'] / MiB:.1f} MiB")
    canonical = Path(os.path.realpath(root))
    ds = Dataset(spec, base, canonical, {}, {}, 0.0)
    recover_interrupted_change(ds)
    ds.listing = scan_tree(canonical)
    ds.stats = listing_stats(ds.listing)
    newest = max(os.stat(marker).st_mtime, os.stat(canonical).st_ctime)
    ds.settled_after = newest + RACY_WAIT
    return ds


# --------------------------------------------------------------------------
# Changing files (and undoing it)
# --------------------------------------------------------------------------


def plan_changes(ds: Dataset) -> list[tuple[str, int, bytes]]:
    """The same files, offsets and new bytes every time: seeded by the dataset name."""
    rng = random.Random(f"{SEED}:change:{ds.name}")
    candidates = [rel for rel in ds.regular_files() if ds.listing[rel][1] > 0]
    count = max(1, int(len(candidates) * CHANGE_FRACTION))
    plan = []
    for rel in sorted(rng.sample(candidates, count)):
        size = ds.listing[rel][1]
        length = min(CHANGE_BYTES, size)
        offset = rng.randrange(0, size - length + 1)
        plan.append((rel, offset, rng.randbytes(length)))
    return plan


def write_journal(ds: Dataset, changes: list[Change]) -> None:
    """Record the original bytes on disk so that a killed run can be undone."""
    entries = [
        {
            "rel": c.rel,
            "offset": c.offset,
            "old": base64.b64encode(c.old).decode(),
            "atime_ns": c.atime_ns,
            "mtime_ns": c.mtime_ns,
        }
        for c in changes
    ]
    tmp = ds.journal.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries))
    os.replace(tmp, ds.journal)


def apply_changes(ds: Dataset) -> list[Change]:
    """Overwrite 4 KiB in 1% of the files; return what is needed to undo it."""
    changes = []
    for rel, offset, new in plan_changes(ds):
        path = ds.root / rel
        st = os.stat(path)
        with open(path, "rb") as f:
            f.seek(offset)
            old = f.read(len(new))
        if new == old:  # practically impossible, but the change must be real
            new = bytes((b + 1) % 256 for b in old)
        changes.append(Change(rel, offset, old, new, st.st_atime_ns, st.st_mtime_ns))
    write_journal(ds, changes)
    for c in changes:
        with open(ds.root / c.rel, "r+b") as f:
            f.seek(c.offset)
            f.write(c.new)
    ds.mark_modified()
    return changes


def revert_changes(ds: Dataset, changes: list[Change]) -> None:
    """Put the original bytes, atime and mtime back."""
    for c in changes:
        path = ds.root / c.rel
        with open(path, "r+b") as f:
            f.seek(c.offset)
            f.write(c.old)
        os.utime(path, ns=(c.atime_ns, c.mtime_ns))
    ds.journal.unlink(missing_ok=True)
    ds.mark_modified()


def recover_interrupted_change(ds: Dataset) -> None:
    """A previous run died between change and revert: revert from its journal."""
    if not ds.journal.exists():
        return
    say(f"dataset {ds.name}: undoing a change left by an interrupted run")
    entries = json.loads(ds.journal.read_text())
    changes = [
        Change(e["rel"], e["offset"], base64.b64decode(e["old"]), b"", e["atime_ns"], e["mtime_ns"])
        for e in entries
    ]
    revert_changes(ds, changes)


# --------------------------------------------------------------------------
# Restore verification
# --------------------------------------------------------------------------


def expected_chunks(path: Path, patch: Optional[tuple[int, bytes]]) -> Iterator[bytes]:
    """The file's bytes in 1 MiB chunks, with an optional (offset, bytes) overlay."""
    pos = 0
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            if patch is not None:
                off, data = patch
                lo, hi = max(off, pos), min(off + len(data), pos + len(chunk))
                if lo < hi:
                    b = bytearray(chunk)
                    b[lo - pos : hi - pos] = data[lo - off : hi - off]
                    chunk = bytes(b)
            yield chunk
            pos += len(chunk)


def same_bytes(expected: Path, patch: Optional[tuple[int, bytes]], actual: Path) -> bool:
    with open(actual, "rb") as f:
        for chunk in expected_chunks(expected, patch):
            if f.read(len(chunk)) != chunk:
                return False
        return f.read(1) == b""


def listing_differences(expected: Listing, actual: Listing) -> list[str]:
    """Human-readable differences between two listings (at most 10)."""
    problems = []
    for rel in sorted(expected.keys() - actual.keys())[:5]:
        problems.append(f"missing: {rel}")
    for rel in sorted(actual.keys() - expected.keys())[:5]:
        problems.append(f"unexpected: {rel}")
    for rel in sorted(expected.keys() & actual.keys()):
        if expected[rel] != actual[rel] and len(problems) < 10:
            problems.append(f"differs: {rel}: expected {expected[rel]}, restored {actual[rel]}")
    return problems


def verify_restore(
    ds: Dataset,
    restored: Path,
    changed: dict[str, tuple[int, bytes]],
    expect_changed: bool,
    where: Where,
) -> dict[str, Any]:
    """Compare a restored tree with the dataset; raise on any difference.

    The changed files are always compared: a restore of the initial snapshot must
    give their original bytes, rsync's mirror their changed bytes.
    """
    overlay = changed if expect_changed else {}
    if not restored.is_dir():
        raise where.fail(f"restore verification: {restored} does not exist (nothing restored where expected)")
    actual = scan_tree(restored)
    problems = listing_differences(ds.listing, actual)
    if problems:
        raise where.fail(
            f"restore verification: the tree under {restored} differs from {ds.root}:\n  "
            + "\n  ".join(problems)
        )
    files = ds.regular_files()
    rng = random.Random(f"{SEED}:verify:{ds.name}")
    sample = set(rng.sample(files, min(VERIFY_SAMPLE, len(files))))
    sample |= set(changed)
    if ds.name == "large":
        sample |= set(files)
    for rel in sorted(sample):
        if not same_bytes(ds.root / rel, overlay.get(rel), restored / rel):
            raise where.fail(f"restore verification: {restored / rel} differs byte-wise from the expected content")
    return {"verified_entries": len(actual), "verified_files_bytewise": len(sample)}


# --------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------


@dataclass
class Layout:
    """WORK/run: everything one (tool, dataset, rep) sequence creates."""

    run: Path
    logs: LogDir
    restore_root: Path
    timeout: float

    def repo(self, tool: str) -> Path:
        return self.run / f"repo-{tool}"


@dataclass
class OpResult:
    """Timing and memory of one operation plus tool-specific extras."""

    seconds: float
    peak_rss_bytes: Optional[int]
    extra: dict[str, Any] = field(default_factory=dict)


class Tool:
    """One backup tool: set up a repository, back up, restore, tear down."""

    name = "tool"
    restores_initial = True  # restores the initial snapshot (rsync: its latest mirror)

    def version(self) -> str:
        raise NotImplementedError

    def start(self, ds: Dataset, layout: Layout) -> None:
        """Create a fresh repository (and start daemons); not timed."""
        raise NotImplementedError

    def backup(self, ds: Dataset, op: str) -> OpResult:
        raise NotImplementedError

    def restore(self, ds: Dataset, target: Path) -> tuple[OpResult, Path]:
        """Restore the initial snapshot into target; returns where the dataset landed."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop daemons; never raises."""

    def repo_dir(self) -> Path:
        raise NotImplementedError


class Restic(Tool):
    """restic with a repository of format 2 (compression "auto").

    `restic init` spends ~3 s calibrating its key derivation, so an empty
    repository is initialised once per run (WORK/restic-template) and each
    sequence gets a fresh copy of it (with a fresh cache directory).
    """

    name = "restic"

    def __init__(self, work: Path) -> None:
        self.template = work / "restic-template"
        self.layout: Optional[Layout] = None
        self.env: dict[str, str] = {}
        self.snapshots: dict[str, str] = {}

    def version(self) -> str:
        return first_line_of(["restic", "version"])

    def repo_dir(self) -> Path:
        assert self.layout is not None
        return self.layout.repo("restic")

    def start(self, ds: Dataset, layout: Layout) -> None:
        self.layout = layout
        self.snapshots = {}
        self.env = {
            **os.environ,
            "RESTIC_PASSWORD": "bench",
            "RESTIC_CACHE_DIR": str(layout.run / "restic-cache"),
        }
        if not (self.template / "config").exists():
            remove_tree(self.template)
            run_checked(
                ["restic", "init", "--repository-version", "2", "-r", str(self.template), "-q"],
                where=Where(self.name, ds.name, "setup"),
                env=self.env,
                logs=layout.logs,
                name="restic-init",
                timeout=120,
            )
        shutil.copytree(self.template, self.repo_dir(), symlinks=True)

    def backup(self, ds: Dataset, op: str) -> OpResult:
        assert self.layout is not None
        cmd = ["restic", "-r", str(self.repo_dir()), "backup", str(ds.root), "--json", "-q"]
        m = run_checked(
            cmd,
            where=Where(self.name, ds.name, op),
            env=self.env,
            logs=self.layout.logs,
            name=f"restic-{op}",
            timeout=self.layout.timeout,
        )
        summary = last_json_line(m, "message_type", "summary")
        if summary is None:
            raise Where(self.name, ds.name, op).fail("no summary in restic's JSON output", m.stdout, m.stderr)
        self.snapshots[op] = summary["snapshot_id"]
        extra = {
            "snapshot": summary["snapshot_id"],
            "files_new": summary.get("files_new"),
            "files_changed": summary.get("files_changed"),
            "files_unchanged": summary.get("files_unmodified"),
            "bytes_total": summary.get("total_bytes_processed"),
            "bytes_added": summary.get("data_added"),
        }
        return OpResult(m.seconds, m.peak_rss_bytes, extra)

    def restore(self, ds: Dataset, target: Path) -> tuple[OpResult, Path]:
        assert self.layout is not None
        snap = self.snapshots["initial"]
        cmd = ["restic", "-r", str(self.repo_dir()), "restore", snap, "--target", str(target)]
        m = run_checked(
            cmd,
            where=Where(self.name, ds.name, "restore"),
            env=self.env,
            logs=self.layout.logs,
            name="restic-restore",
            timeout=self.layout.timeout,
        )
        return OpResult(m.seconds, m.peak_rss_bytes, {"snapshot": snap}), landed_under(target, ds.root)


class Borg(Tool):
    name = "borg"
    ARCHIVES = {"initial": "a1", "unchanged": "a2", "changed": "a3"}

    def __init__(self) -> None:
        self.layout: Optional[Layout] = None
        self.env: dict[str, str] = {}

    def version(self) -> str:
        return first_line_of(["borg", "--version"])

    def repo_dir(self) -> Path:
        assert self.layout is not None
        return self.layout.repo("borg")

    def start(self, ds: Dataset, layout: Layout) -> None:
        self.layout = layout
        self.env = {
            **os.environ,
            "BORG_PASSPHRASE": "bench",
            "BORG_BASE_DIR": str(layout.run / "borg-base"),
            "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
        }
        run_checked(
            ["borg", "init", "-e", "repokey-blake2", str(self.repo_dir())],
            where=Where(self.name, ds.name, "setup"),
            env=self.env,
            logs=layout.logs,
            name="borg-init",
            timeout=120,
        )

    def backup(self, ds: Dataset, op: str) -> OpResult:
        assert self.layout is not None
        archive = f"{self.repo_dir()}::{self.ARCHIVES[op]}"
        m = run_checked(
            ["borg", "create", "--json", archive, str(ds.root)],
            where=Where(self.name, ds.name, op),
            env=self.env,
            logs=self.layout.logs,
            name=f"borg-{op}",
            timeout=self.layout.timeout,
        )
        extra: dict[str, Any] = {"archive": self.ARCHIVES[op]}
        try:
            stats = json.loads(m.stdout_text())["archive"]["stats"]
            extra.update(
                files=stats.get("nfiles"),
                bytes_total=stats.get("original_size"),
                bytes_added=stats.get("deduplicated_size"),
            )
        except (ValueError, KeyError, TypeError):
            pass
        return OpResult(m.seconds, m.peak_rss_bytes, extra)

    def restore(self, ds: Dataset, target: Path) -> tuple[OpResult, Path]:
        assert self.layout is not None
        m = run_checked(
            ["borg", "extract", f"{self.repo_dir()}::a1"],
            where=Where(self.name, ds.name, "restore"),
            env=self.env,
            logs=self.layout.logs,
            name="borg-extract",
            timeout=self.layout.timeout,
            cwd=target,
        )
        return OpResult(m.seconds, m.peak_rss_bytes, {"archive": "a1"}), landed_under(target, ds.root)


class Rsync(Tool):
    name = "rsync"
    restores_initial = False

    def __init__(self) -> None:
        self.layout: Optional[Layout] = None

    def version(self) -> str:
        return first_line_of(["rsync", "--version"])

    def repo_dir(self) -> Path:
        assert self.layout is not None
        return self.layout.repo("rsync")

    def start(self, ds: Dataset, layout: Layout) -> None:
        self.layout = layout
        self.repo_dir().mkdir(parents=True)

    def backup(self, ds: Dataset, op: str) -> OpResult:
        assert self.layout is not None
        m = run_checked(
            ["rsync", "-a", f"{ds.root}/", f"{self.repo_dir()}/"],
            where=Where(self.name, ds.name, op),
            env=dict(os.environ),
            logs=self.layout.logs,
            name=f"rsync-{op}",
            timeout=self.layout.timeout,
        )
        return OpResult(m.seconds, m.peak_rss_bytes)

    def restore(self, ds: Dataset, target: Path) -> tuple[OpResult, Path]:
        assert self.layout is not None
        m = run_checked(
            ["rsync", "-a", f"{self.repo_dir()}/", f"{target}/"],
            where=Where(self.name, ds.name, "restore"),
            env=dict(os.environ),
            logs=self.layout.logs,
            name="rsync-restore",
            timeout=self.layout.timeout,
        )
        return OpResult(m.seconds, m.peak_rss_bytes), target


def landed_under(target: Path, source: Path) -> Path:
    """Where a tool that keeps absolute paths puts `source` when restoring into target."""
    return target / str(source).lstrip("/")


def last_json_line(m: Measured, key: str, value: str) -> Optional[dict[str, Any]]:
    """The last JSON object on stdout whose `key` equals `value`."""
    found = None
    for line in m.stdout_text().splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get(key) == value:
            found = obj
    return found


def reset_peak_rss(pid: int) -> bool:
    """Reset a process's VmHWM (needs permission on /proc/PID/clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def read_peak_rss(pid: int) -> Optional[int]:
    """VmHWM of a process in bytes, or None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * KiB
    except (OSError, ValueError, IndexError):
        pass
    return None


class Flotilla(Tool):
    """A whole fleet per sequence: nats-server, a source agent and a storage agent."""

    name = "flotilla"
    SOURCE = "src"
    STORAGE = "store"
    ROLES = {"src": "source agent", "store": "storage agent", "nats": "nats-server"}

    def __init__(self, cli: Path, agent: Path, nats_server: Path) -> None:
        self.cli = cli
        self.agent = agent
        self.nats_server = nats_server
        self.layout: Optional[Layout] = None
        self.env: dict[str, str] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.snapshots: dict[str, str] = {}
        self.peak_reset_ok = True

    def version(self) -> str:
        return f"{first_line_of([str(self.cli), '--version'])}; {first_line_of([str(self.agent), '--version'])}"

    def repo_dir(self) -> Path:
        assert self.layout is not None
        return self.layout.repo("flotilla")

    def log(self, name: str) -> Path:
        assert self.layout is not None
        return self.layout.logs.path / f"{name}.log"

    def daemon_logs(self) -> tuple[Path, ...]:
        return (self.log("agent-src"), self.log("agent-store"), self.log("nats-server"))

    def start(self, ds: Dataset, layout: Layout) -> None:
        self.layout = layout
        self.snapshots = {}
        where = Where(self.name, ds.name, "setup")
        port = free_port(socket.SOCK_STREAM)
        url = f"tls://127.0.0.1:{port}"
        self.env = {**os.environ, "FLOTILLA_FLEET": str(layout.run / "fleet"), "FLOTILLA_NATS_URL": url}
        # As the README sets a fleet up: init, the server's configuration
        # (TLS, the fleet's NATS identities), the server, then doctor.
        self.cli_setup(["init"], where, "init")
        conf = layout.run / "nats.conf"
        self.cli_setup(
            ["nats-config", "--listen", f"127.0.0.1:{port}", "--store", str(layout.run / "nats"), "--out", str(conf)],
            where,
            "nats-config",
        )
        self.start_nats(port, conf, where)
        self.cli_setup(["doctor"], where, "doctor")
        bundles = layout.run / "bundles"
        bundles.mkdir()
        self.cli_setup(["enroll", self.SOURCE, "--out", str(bundles / "src.toml")], where, "enroll-src")
        self.cli_setup(
            ["enroll", self.STORAGE, "--out", str(bundles / "store.toml"), "--no-repo-key"], where, "enroll-store"
        )
        for d in (layout.run / "state" / "src", layout.run / "state" / "store", self.repo_dir()):
            d.mkdir(parents=True)
        common = [str(self.agent), "run", "--nats", url]
        self.procs["src"] = spawn_daemon(
            common
            + ["--bundle", str(bundles / "src.toml"), "--state-dir", str(layout.run / "state" / "src")]
            + ["--backup-root", str(ds.root), "--restore-root", str(layout.restore_root)],
            env=self.env,
            log=self.log("agent-src"),
        )
        quic = f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}"
        self.procs["store"] = spawn_daemon(
            common
            + ["--bundle", str(bundles / "store.toml"), "--state-dir", str(layout.run / "state" / "store")]
            + ["--storage", str(self.repo_dir()), "--listen", quic],
            env=self.env,
            log=self.log("agent-store"),
        )
        self.wait_online(where, timeout=30)

    def start_nats(self, port: int, conf: Path, where: Where) -> None:
        """nats-server with the fleet's configuration; wait until it accepts connections."""
        cmd = [str(self.nats_server), "-c", str(conf)]
        proc = spawn_daemon(cmd, env=dict(os.environ), log=self.log("nats-server"))
        self.procs["nats"] = proc
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise where.fail(f"nats-server exited with code {proc.returncode}", self.log("nats-server"))
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise where.fail("nats-server did not accept connections within 15 s", self.log("nats-server"))

    def cli_setup(self, args: list[str], where: Where, name: str) -> Measured:
        assert self.layout is not None
        return run_checked(
            [str(self.cli), *args],
            where=where,
            env=self.env,
            logs=self.layout.logs,
            name=f"flotilla-{name}",
            timeout=60,
            extra_logs=(self.log("nats-server"),),
        )

    def wait_online(self, where: Where, timeout: float) -> None:
        """Poll `flotilla hosts --json` until both agents are online."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for role, proc in self.procs.items():
                if proc.poll() is not None:
                    raise where.fail(
                        f"the {self.ROLES[role]} exited with code {proc.returncode} while starting", *self.daemon_logs()
                    )
            try:
                r = subprocess.run(
                    [str(self.cli), "hosts", "--json"], env=self.env, capture_output=True, text=True, timeout=10
                )
                last = (r.stdout + r.stderr).strip()
                hosts = json.loads(r.stdout) if r.returncode == 0 else []
                online = {h.get("host") for h in hosts if h.get("status") == "online"}
                if {self.SOURCE, self.STORAGE} <= online:
                    return
            except (subprocess.TimeoutExpired, ValueError, AttributeError):
                pass
            time.sleep(0.2)
        raise where.fail(
            f"agents not both online within {timeout:.0f} s; last `flotilla hosts --json`: {last[-500:]}",
            *self.daemon_logs(),
        )

    def measure(self, args: list[str], ds: Dataset, op: str) -> tuple[Measured, dict[str, Any]]:
        """Run a CLI command while tracking both agents' peak RSS."""
        assert self.layout is not None
        for role in ("src", "store"):
            if not reset_peak_rss(self.procs[role].pid):
                self.peak_reset_ok = False
        m = run_checked(
            [str(self.cli), *args],
            where=Where(self.name, ds.name, op),
            env=self.env,
            logs=self.layout.logs,
            name=f"flotilla-{op}",
            timeout=self.layout.timeout,
            extra_logs=self.daemon_logs(),
            health=self.dead_daemon,
        )
        extra = {
            "cli_peak_rss_bytes": m.peak_rss_bytes,
            "source_agent_peak_rss_bytes": read_peak_rss(self.procs["src"].pid),
            "storage_agent_peak_rss_bytes": read_peak_rss(self.procs["store"].pid),
        }
        return m, extra

    def dead_daemon(self) -> Optional[str]:
        """Why the fleet cannot finish a task (a daemon exited), or None."""
        for role, proc in self.procs.items():
            if proc.poll() is not None:
                return f"the {self.ROLES[role]} exited with code {proc.returncode}"
        return None

    def backup(self, ds: Dataset, op: str) -> OpResult:
        args = ["backup", self.SOURCE, "--to", self.STORAGE, "--path", str(ds.root), "--wait", "--json"]
        m, extra = self.measure(args, ds, op)
        summary = last_json_line(m, "type", "summary")
        if summary is None or not summary.get("snapshot"):
            raise Where(self.name, ds.name, op).fail("no snapshot in the backup's JSON summary", m.stdout, m.stderr)
        self.snapshots[op] = summary["snapshot"]
        for k in ("snapshot", "files_new", "files_changed", "files_unchanged", "bytes_read", "bytes_added", "bytes_total", "outcome", "duration_ms"):
            extra[k] = summary.get(k)
        return OpResult(m.seconds, m.peak_rss_bytes, extra)

    def restore(self, ds: Dataset, target: Path) -> tuple[OpResult, Path]:
        snap = self.snapshots["initial"]
        args = ["restore", snap, "--to", f"{self.SOURCE}:{target}", "--wait", "--json"]
        m, extra = self.measure(args, ds, "restore")
        extra["snapshot"] = snap
        summary = last_json_line(m, "type", "summary")
        if summary is not None:
            extra["outcome"] = summary.get("outcome")
            extra["duration_ms"] = summary.get("duration_ms")
            restored = summary.get("restore") or {}
            for k in ("files", "dirs", "symlinks", "bytes", "errors"):
                extra[f"restored_{k}"] = restored.get(k)
        return OpResult(m.seconds, m.peak_rss_bytes, extra), landed_under(target, ds.root)

    def stop(self) -> None:
        """Agents first (they announce going offline), then nats-server."""
        for role in ("src", "store", "nats"):
            proc = self.procs.pop(role, None)
            if proc is not None:
                stop_process(proc)


# --------------------------------------------------------------------------
# The benchmark loop
# --------------------------------------------------------------------------


def fresh_layout(work: Path, timeout: float) -> Layout:
    run = work / "run"
    remove_tree(run)
    logs = run / "logs"
    restore_root = run / "restore"
    logs.mkdir(parents=True)
    restore_root.mkdir()
    return Layout(run=Path(os.path.realpath(run)), logs=LogDir(logs), restore_root=Path(os.path.realpath(restore_root)), timeout=timeout)


def make_row(tool: Tool, ds: Dataset, rep: int, op: str, r: OpResult) -> dict[str, Any]:
    row: dict[str, Any] = {
        "tool": tool.name,
        "dataset": ds.name,
        "rep": rep,
        "op": op,
        "seconds": round(r.seconds, 6),
        "peak_rss_bytes": r.peak_rss_bytes,
    }
    row.update(r.extra)
    return row


def describe(row: dict[str, Any]) -> str:
    mem = row.get("source_agent_peak_rss_bytes") or row.get("peak_rss_bytes") or 0
    return f"{row['tool']:>8} {row['dataset']:>5} rep {row['rep']} {row['op']:>9}: {row['seconds']:8.3f} s, peak {mem / MiB:7.1f} MiB"


def timed_backup(tool: Tool, ds: Dataset, rep: int, op: str) -> dict[str, Any]:
    row = make_row(tool, ds, rep, op, tool.backup(ds, op))
    os.sync()
    say(describe(row))
    return row


def changed_backup(tool: Tool, ds: Dataset, rep: int) -> tuple[dict[str, Any], dict[str, tuple[int, bytes]]]:
    """Change 1% of the files, back up (timed), put the originals back."""
    changes = apply_changes(ds)
    try:
        # No wait here: a changed file is read again by every tool anyway.
        row = timed_backup(tool, ds, rep, "changed")
    finally:
        revert_changes(ds, changes)
    row["files_modified"] = len(changes)
    return row, {c.rel: (c.offset, c.new) for c in changes}


def timed_restore(
    tool: Tool, ds: Dataset, rep: int, layout: Layout, changed: dict[str, tuple[int, bytes]]
) -> dict[str, Any]:
    """Restore into an empty directory (timed), verify (not timed), delete it."""
    target = layout.restore_root / tool.name
    target.mkdir()
    result, landed = tool.restore(ds, target)
    row = make_row(tool, ds, rep, "restore", result)
    os.sync()
    where = Where(tool.name, ds.name, "restore")
    row.update(verify_restore(ds, landed, changed, not tool.restores_initial, where))
    row["restored"] = "initial snapshot" if tool.restores_initial else "latest (mirror)"
    say(describe(row))
    remove_tree(target)
    return row


def run_sequence(tool: Tool, ds: Dataset, rep: int, work: Path, timeout: float) -> list[dict[str, Any]]:
    """initial, unchanged, changed, restore against a fresh repository."""
    layout = fresh_layout(work, timeout)
    rows: list[dict[str, Any]] = []
    read_all(ds.root, ds.listing)  # warm page cache, untimed
    try:
        tool.start(ds, layout)
        ds.wait_settled()
        initial = timed_backup(tool, ds, rep, "initial")
        initial["repo_bytes"], initial["repo_disk_bytes"] = tree_bytes(tool.repo_dir())
        rows.append(initial)
        rows.append(timed_backup(tool, ds, rep, "unchanged"))
        changed_row, changed = changed_backup(tool, ds, rep)
        rows.append(changed_row)
        rows.append(timed_restore(tool, ds, rep, layout, changed))
    finally:
        tool.stop()
    remove_tree(layout.run)
    return rows


def rotated(items: list[str], by: int) -> list[str]:
    k = by % len(items) if items else 0
    return items[k:] + items[:k]


def run_all(
    tools: dict[str, Tool], datasets: list[Dataset], reps: int, work: Path, timeout: float
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    names = list(tools)
    for rep in range(reps):
        for ds in datasets:
            for name in rotated(names, rep):
                say(f"== rep {rep + 1}/{reps}, dataset {ds.name}, tool {name}")
                rows.extend(run_sequence(tools[name], ds, rep, work, timeout))
    return rows


# --------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------


def meminfo_total() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * KiB
    except OSError:
        pass
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def filesystem_of(path: Path) -> str:
    """Filesystem type of the mount holding path (from /proc/self/mounts)."""
    best, fstype = "", "unknown"
    target = os.path.realpath(path)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                mount = parts[1].replace("\\040", " ")
                if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                    best, fstype = mount, parts[2]
    except OSError:
        pass
    return fstype


def metadata(
    args: argparse.Namespace, tools: dict[str, Tool], datasets: list[Dataset], work: Path, reps: int
) -> dict[str, Any]:
    flotilla = tools.get("flotilla")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {
            "hostname": platform.node(),
            "nproc": os.cpu_count(),
            "cpu": cpu_model(),
            "mem_bytes": meminfo_total(),
            "kernel": platform.release(),
            "work_filesystem": filesystem_of(work),
            "python": platform.python_version(),
        },
        "tool_versions": {name: tool.version() for name, tool in tools.items()},
        "nats_server_version": first_line_of([str(args.nats_server), "--version"]) if flotilla else None,
        "tool_settings": {
            "flotilla": "one source agent and one storage agent on loopback (QUIC), nats-server with JetStream; "
            "defaults (compression and encryption always on)",
            "restic": "repository version 2, compression auto (the default); the empty repository is made "
            "once per run with `restic init` and copied for each sequence (init's key calibration takes ~3 s)",
            "borg": "repokey-blake2, compression lz4 (the default); create --json (implies --stats)",
            "rsync": "rsync -a to a plain directory: no dedup, no encryption, no compression",
        },
        "datasets": {
            ds.name: {"path": str(ds.root), "params": ds.spec.params, "key": ds.spec.key(), **ds.stats}
            for ds in datasets
        },
        "reps": reps,
        "quick": args.quick,
        "interleaving": "for rep: for dataset: tools in an order rotated by rep, each with a fresh repository",
        "timing": "time.monotonic() around the operation's external command only",
        "cache": "warm page cache for everyone: the dataset is read once before each tool's sequence; "
        "caches are never dropped; sync after every operation (untimed)",
        "racily_clean_wait": f"{RACY_WAIT} s between the last dataset change and the next backup",
        "changed_op": f"{CHANGE_FRACTION:.0%} of the non-empty regular files (at least 1), {CHANGE_BYTES} bytes "
        "overwritten at a seeded offset; reverted (bytes, atime, mtime) afterwards",
        "restore": "flotilla, restic and borg restore the initial snapshot; rsync restores its mirror, which holds "
        "the latest (changed) state",
        "restore_verification": "whole restored tree listing (paths, types, sizes, symlink targets) equals the "
        f"dataset's; {VERIFY_SAMPLE} seeded files, every changed file (rsync: with the changed bytes) and every file "
        "of `large` compared byte for byte; any mismatch aborts the run",
        "memory": "peak_rss_bytes: ru_maxrss from os.wait4 of the one-shot command, forked by a bare launcher "
        "interpreter so that it does not inherit this script's RSS (values at or below rss_floor_bytes mean "
        "'at most that'; flotilla: the CLI, also in cli_peak_rss_bytes); flotilla agents: VmHWM after writing 5 to /proc/PID/clear_refs before each op"
        + ("" if not flotilla or getattr(flotilla, "peak_reset_ok", True) else " (WARNING: clear_refs failed; agent peaks are since agent start)"),
        "repo_bytes": "apparent size (st_size) of the regular files under the repository directory right after "
        "`initial`; repo_disk_bytes is st_blocks*512 of the same files",
    }


# --------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------


def median_of(rows: list[dict[str, Any]], key: str) -> Optional[float]:
    """Median of a field over rows (byte counts rounded to whole bytes)."""
    values = [r[key] for r in rows if r.get(key) is not None]
    if not values:
        return None
    m = statistics.median(values)
    return int(round(m)) if key.endswith("bytes") else m


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def summarize(rows: list[dict[str, Any]], tools: list[str], datasets: list[str]) -> list[dict[str, Any]]:
    """One entry per (dataset, op, tool): medians, ranges and ratios to the peers."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["op"], r["tool"]), []).append(r)
    out = []
    for ds in datasets:
        for op in OPS:
            medians = {t: median_of(groups.get((ds, op, t), []), "seconds") for t in tools}
            repo = {t: median_of(groups.get((ds, op, t), []), "repo_bytes") for t in tools}
            for tool in tools:
                g = groups.get((ds, op, tool), [])
                if not g:
                    continue
                secs = [r["seconds"] for r in g]
                entry: dict[str, Any] = {
                    "dataset": ds,
                    "op": op,
                    "tool": tool,
                    "n": len(g),
                    "median_s": medians[tool],
                    "min_s": min(secs),
                    "max_s": max(secs),
                    "median_peak_rss_bytes": median_of(g, "peak_rss_bytes"),
                    "median_cli_peak_rss_bytes": median_of(g, "cli_peak_rss_bytes"),
                    "median_source_agent_peak_rss_bytes": median_of(g, "source_agent_peak_rss_bytes"),
                    "median_storage_agent_peak_rss_bytes": median_of(g, "storage_agent_peak_rss_bytes"),
                    "median_repo_bytes": repo[tool],
                }
                for peer in PEERS:
                    own = peer == tool
                    entry[f"ratio_to_{peer}"] = None if own else ratio(medians[tool], medians.get(peer))
                for peer in PEERS:
                    own = peer == tool
                    entry[f"repo_ratio_to_{peer}"] = None if own else ratio(repo[tool], repo.get(peer))
                out.append(entry)
    return out


def write_summary_csv(path: Path, summary: list[dict[str, Any]]) -> None:
    if not summary:
        path.write_text("")
        return
    fields = list(summary[0].keys())
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for entry in summary:
            w.writerow({k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)) for k, v in entry.items()})


# --------------------------------------------------------------------------
# Report (Markdown)
# --------------------------------------------------------------------------


def lookup(summary: list[dict[str, Any]], ds: str, op: str, tool: str) -> Optional[dict[str, Any]]:
    for e in summary:
        if e["dataset"] == ds and e["op"] == op and e["tool"] == tool:
            return e
    return None


def fmt_s(x: Optional[float]) -> str:
    if x is None:
        return "–"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def fmt_mib(x: Optional[float]) -> str:
    return "–" if x is None else f"{x / MiB:.1f}"


def fmt_ratio(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.2f}×"


def time_table(summary: list[dict[str, Any]], tools: list[str], datasets: list[str]) -> list[str]:
    lines = ["| dataset | op | " + " | ".join(tools) + " |", "|---|---|" + "---|" * len(tools)]
    for ds in datasets:
        for op in OPS:
            cells = []
            for t in tools:
                e = lookup(summary, ds, op, t)
                cells.append("–" if e is None else f"{fmt_s(e['median_s'])} ({fmt_s(e['min_s'])}–{fmt_s(e['max_s'])})")
            lines.append(f"| {ds} | {op} | " + " | ".join(cells) + " |")
    return lines


def fmt_peak(x: Optional[float], floor: Optional[int]) -> str:
    """MiB; a one-shot command's peak at or below the launcher's floor is only a bound."""
    if x is not None and floor and x <= floor * 1.05:
        return f"≤ {floor / MiB:.1f}"
    return fmt_mib(x)


def memory_table(
    summary: list[dict[str, Any]], tools: list[str], datasets: list[str], floor: Optional[int]
) -> list[str]:
    cols: list[tuple[str, str, str]] = []
    for t in tools:
        if t == "flotilla":
            cols += [
                ("flotilla source agent", t, "median_source_agent_peak_rss_bytes"),
                ("flotilla storage agent", t, "median_storage_agent_peak_rss_bytes"),
                ("flotilla CLI", t, "median_cli_peak_rss_bytes"),
            ]
        else:
            cols.append((t, t, "median_peak_rss_bytes"))
    lines = ["| dataset | op | " + " | ".join(c[0] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for ds in datasets:
        for op in OPS:
            cells = []
            for _label, t, key in cols:
                e = lookup(summary, ds, op, t)
                value = None if e is None else e[key]
                cells.append(fmt_mib(value) if "agent" in key else fmt_peak(value, floor))
            lines.append(f"| {ds} | {op} | " + " | ".join(cells) + " |")
    return lines


def repo_table(summary: list[dict[str, Any]], tools: list[str], datasets: list[str]) -> list[str]:
    lines = ["| dataset | " + " | ".join(tools) + " |", "|---|" + "---|" * len(tools)]
    for ds in datasets:
        cells = []
        for t in tools:
            e = lookup(summary, ds, "initial", t)
            cells.append(fmt_mib(None if e is None else e["median_repo_bytes"]))
        lines.append(f"| {ds} | " + " | ".join(cells) + " |")
    return lines


def ratio_tables(summary: list[dict[str, Any]], tools: list[str], datasets: list[str]) -> list[str]:
    peers = [p for p in PEERS if p in tools]
    if "flotilla" not in tools or not peers:
        return ["(needs flotilla and at least one peer)"]
    lines: list[str] = []
    for ds in datasets:
        lines += [f"**{ds}** (Flotilla median / peer median; below 1 means Flotilla is faster or smaller)", ""]
        lines += ["| | " + " | ".join(f"vs {p}" for p in peers) + " |", "|---|" + "---|" * len(peers)]
        for op in OPS:
            e = lookup(summary, ds, op, "flotilla")
            cells = [fmt_ratio(None if e is None else e[f"ratio_to_{p}"]) for p in peers]
            lines.append(f"| {op} time | " + " | ".join(cells) + " |")
        e = lookup(summary, ds, "initial", "flotilla")
        cells = [fmt_ratio(None if e is None else e[f"repo_ratio_to_{p}"]) for p in peers]
        lines.append("| repository size | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def verdict(value: Optional[float], limit: float, unit: str) -> tuple[str, str]:
    """(value text, PASS/MISS with the margin) for value ≤ limit."""
    if value is None:
        return "–", "n/a"
    shown = f"{value:.2f}×" if unit == "×" else f"{value:.1f} {unit}"
    margin = value / limit - 1
    if value <= limit:
        return shown, f"PASS ({-margin:.0%} under the limit)"
    return shown, f"MISS ({margin:.0%} over the limit)"


def targets_table(summary: list[dict[str, Any]], datasets: list[str]) -> list[str]:
    lines = ["| target | dataset | Flotilla | verdict |", "|---|---|---|---|"]
    time_targets = (("initial", 0.70), ("unchanged", 0.50), ("restore", 0.70))
    for ds in datasets:
        for op, limit in time_targets:
            e = lookup(summary, ds, op, "flotilla")
            shown, v = verdict(None if e is None else e["ratio_to_restic"], limit, "×")
            lines.append(f"| {op} ≤ {limit:.2f}× restic | {ds} | {shown} | {v} |")
        e = lookup(summary, ds, "initial", "flotilla")
        shown, v = verdict(None if e is None else e["repo_ratio_to_restic"], 1.05, "×")
        lines.append(f"| repository size ≤ 1.05× restic | {ds} | {shown} | {v} |")
    if "large" in datasets:
        e = lookup(summary, "large", "initial", "flotilla")
        peak = None if e is None or e["median_source_agent_peak_rss_bytes"] is None else e["median_source_agent_peak_rss_bytes"] / MiB
        shown, v = verdict(peak, 200.0, "MiB")
        lines.append(f"| source agent peak RSS during initial backup ≤ 200 MiB | large | {shown} | {v} |")
    return lines


def render_report(meta: dict[str, Any], summary: list[dict[str, Any]], tools: list[str], datasets: list[str]) -> str:
    host = meta["host"]
    ds_lines = [
        f"- `{name}`: {d['files']} files, {d['symlinks']} symlinks, {d['bytes'] / MiB:.1f} MiB"
        for name, d in meta["datasets"].items()
    ]
    lines = [
        "# Flotilla vs restic, borg, rsync",
        "",
        f"{meta['date']} on {host['nproc']} CPUs ({host['cpu']}), {(host['mem_bytes'] or 0) / GiB:.1f} GiB RAM, "
        f"kernel {host['kernel']}, {host['work_filesystem']}; {meta['reps']} repetition(s)"
        + (", **quick mode (tiny datasets: the numbers say little)**" if meta["quick"] else "")
        + ".",
        "",
        *ds_lines,
        "",
        "Versions: " + "; ".join(f"{k}: {v}" for k, v in meta["tool_versions"].items()),
        "",
        f"Warm page cache; interleaved ({meta['interleaving']}). Restore: {meta['restore']}; verified.",
        "",
        "## Time in seconds: median (min–max)",
        "",
        *time_table(summary, tools, datasets),
        "",
        "## Peak memory in MiB (median)",
        "",
        "One-shot commands: ru_maxrss; Flotilla's agents: VmHWM during the operation. "
        f"\"≤ x\": at or below what the measurement can resolve ({(meta.get('rss_floor_bytes') or 0) / MiB:.1f} MiB, "
        "the RSS a command inherits from the launcher that forks it).",
        "",
        *memory_table(summary, tools, datasets, meta.get("rss_floor_bytes")),
        "",
        "## Repository size after the initial backup in MiB (apparent size)",
        "",
        *repo_table(summary, tools, datasets),
        "",
        "## Flotilla's ratios",
        "",
        *ratio_tables(summary, tools, datasets),
        "## Targets",
        "",
        *targets_table(summary, datasets),
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Chart (hand-written SVG)
# --------------------------------------------------------------------------

COLORS = {"flotilla": "#1f77b4", "restic": "#ff7f0e", "borg": "#2ca02c", "rsync": "#7f7f7f"}
CHART_WIDTH = 900
LABEL_W = 90
BAR_W = 600
ROW_H = 16


def svg_text(x: float, y: float, text: str, size: int = 12, anchor: str = "start", weight: str = "normal") -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
        f'font-weight="{weight}">{escape(text)}</text>'
    )


def svg_bar_row(y: float, tool: str, value: float, lo: float, hi: float, scale: float, label: str) -> list[str]:
    """One horizontal bar with an optional min–max whisker and a value label."""
    x0 = LABEL_W
    w = max(1.0, value * scale)
    color = COLORS.get(tool, "#444444")
    parts = [
        svg_text(x0 - 6, y + ROW_H - 4, tool, 11, "end"),
        f'<rect x="{x0}" y="{y + 2:.1f}" width="{w:.1f}" height="{ROW_H - 4}" fill="{color}"/>',
    ]
    if hi > lo:
        cy = y + ROW_H / 2
        xl, xh = x0 + lo * scale, x0 + hi * scale
        parts += [
            f'<line x1="{xl:.1f}" y1="{cy:.1f}" x2="{xh:.1f}" y2="{cy:.1f}" stroke="#000" stroke-width="1"/>',
            f'<line x1="{xl:.1f}" y1="{cy - 4:.1f}" x2="{xl:.1f}" y2="{cy + 4:.1f}" stroke="#000" stroke-width="1"/>',
            f'<line x1="{xh:.1f}" y1="{cy - 4:.1f}" x2="{xh:.1f}" y2="{cy + 4:.1f}" stroke="#000" stroke-width="1"/>',
        ]
    parts.append(svg_text(x0 + max(w, hi * scale) + 6, y + ROW_H - 4, label, 11))
    return parts


def svg_legend(y: float, tools: list[str]) -> list[str]:
    parts = []
    x = LABEL_W
    for t in tools:
        parts.append(f'<rect x="{x}" y="{y - 10}" width="12" height="12" fill="{COLORS.get(t, "#444444")}"/>')
        parts.append(svg_text(x + 16, y, t, 12))
        x += 110
    return parts


def svg_document(parts: list[str], height: float) -> str:
    """Wrap elements in an <svg> with a white background; checks that it parses."""
    h = int(height + 20)
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{CHART_WIDTH}" height="{h}" '
        f'viewBox="0 0 {CHART_WIDTH} {h}" font-family="sans-serif">'
        f'<rect x="0" y="0" width="{CHART_WIDTH}" height="{h}" fill="#ffffff"/>'
    )
    svg = head + "\n" + "\n".join(parts) + "\n</svg>\n"
    ElementTree.fromstring(svg)
    return svg


def svg_header(title: str, subtitle: str, tools: list[str]) -> tuple[list[str], float]:
    """Title, legend and subtitle; returns the elements and the next y."""
    parts = [svg_text(10, 24, title, 16, weight="bold")]
    parts += svg_legend(48, tools)
    parts.append(svg_text(10, 74, subtitle, 12))
    return parts, 84.0


def render_time_chart(summary: list[dict[str, Any]], tools: list[str], datasets: list[str], title: str) -> str:
    """One group of bars per dataset × operation: median seconds, whiskers min–max."""
    parts, y = svg_header(
        title, "Median seconds per operation (whisker: min–max); each group is scaled to its own maximum", tools
    )
    for ds in datasets:
        for op in OPS:
            entries = [e for t in tools if (e := lookup(summary, ds, op, t)) is not None]
            if not entries:
                continue
            scale = BAR_W / (max(e["max_s"] for e in entries) or 1e-9)
            y += 18
            parts.append(svg_text(10, y, f"{ds} · {op}", 12, weight="bold"))
            y += 4
            for e in entries:
                label = f"{fmt_s(e['median_s'])} s"
                parts += svg_bar_row(y, e["tool"], e["median_s"], e["min_s"], e["max_s"], scale, label)
                y += ROW_H
    return svg_document(parts, y)


def render_repo_chart(summary: list[dict[str, Any]], tools: list[str], datasets: list[str], title: str) -> str:
    """One group of bars per dataset: repository size after the initial backup."""
    parts, y = svg_header(
        title, "Repository size after the initial backup, MiB (apparent size); each dataset scaled to its maximum", tools
    )
    for ds in datasets:
        entries = [
            e
            for t in tools
            if (e := lookup(summary, ds, "initial", t)) is not None and e["median_repo_bytes"] is not None
        ]
        if not entries:
            continue
        scale = BAR_W / (max(e["median_repo_bytes"] for e in entries) or 1)
        y += 18
        parts.append(svg_text(10, y, ds, 12, weight="bold"))
        y += 4
        for e in entries:
            v = e["median_repo_bytes"]
            parts += svg_bar_row(y, e["tool"], v, v, v, scale, f"{v / MiB:.1f} MiB")
            y += ROW_H
    return svg_document(parts, y)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flotilla", type=Path, help="the flotilla CLI binary")
    p.add_argument("--agent", type=Path, help="the flotilla-agent binary")
    p.add_argument("--nats-server", type=Path, help="the nats-server binary")
    p.add_argument("--work", type=Path, required=True, help="datasets (kept) and run directory")
    p.add_argument("--results", type=Path, required=True, help="where to write the results")
    p.add_argument("--quick", action="store_true", help="tiny datasets, 1 repetition unless --reps: a smoke run")
    p.add_argument("--reps", type=int, default=None, help="repetitions [3; quick: 1]")
    p.add_argument("--datasets", default=",".join(ALL_DATASETS), help="comma-separated: small,large,usr")
    p.add_argument("--tools", default=",".join(ALL_TOOLS), help="comma-separated: flotilla,restic,borg,rsync")
    args = p.parse_args(argv)
    args.tool_list = split_choice(p, args.tools, ALL_TOOLS, "--tools")
    args.dataset_list = split_choice(p, args.datasets, ALL_DATASETS, "--datasets")
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    if args.reps < 1:
        p.error("--reps must be at least 1")
    if "flotilla" in args.tool_list:
        for flag in ("flotilla", "agent", "nats_server"):
            value = getattr(args, flag)
            if value is None:
                p.error(f"--{flag.replace('_', '-')} is required when benchmarking flotilla")
            if not (value.is_file() and os.access(value, os.X_OK)):
                p.error(f"--{flag.replace('_', '-')} {value}: not an executable file")
    for tool in args.tool_list:
        if tool != "flotilla" and shutil.which(tool) is None:
            p.error(f"{tool} is not installed (not on PATH)")
    return args


def split_choice(p: argparse.ArgumentParser, text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        p.error(f"{flag}: unknown {bad or 'empty list'}; choose from {','.join(allowed)}")
    return list(dict.fromkeys(items))


def make_tools(args: argparse.Namespace, work: Path) -> dict[str, Tool]:
    tools: dict[str, Tool] = {}
    for name in args.tool_list:
        if name == "flotilla":
            tools[name] = Flotilla(args.flotilla.resolve(), args.agent.resolve(), args.nats_server.resolve())
        elif name == "restic":
            tools[name] = Restic(work)
        elif name == "borg":
            tools[name] = Borg()
        else:
            tools[name] = Rsync()
    return tools


def write_results(
    results: Path, meta: dict[str, Any], rows: list[dict[str, Any]], tools: list[str], datasets: list[str]
) -> str:
    results.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows, tools, datasets)
    (results / "raw.json").write_text(json.dumps({"metadata": meta, "rows": rows}, indent=1) + "\n")
    (results / "summary.json").write_text(json.dumps({"metadata": meta, "summary": summary}, indent=1) + "\n")
    write_summary_csv(results / "summary.csv", summary)
    title = f"Flotilla vs {', '.join(t for t in tools if t != 'flotilla')} — {meta['date']}" + (" (quick)" if meta["quick"] else "")
    (results / "chart.svg").write_text(render_time_chart(summary, tools, datasets, title))
    (results / "repo.svg").write_text(render_repo_chart(summary, tools, datasets, title))
    report = render_report(meta, summary, tools, datasets)
    (results / "report.md").write_text(report)
    return report


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    atexit.register(terminate_all)
    signal.signal(signal.SIGTERM, exit_on_signal)
    signal.signal(signal.SIGHUP, exit_on_signal)
    args.work.mkdir(parents=True, exist_ok=True)
    work = Path(os.path.realpath(args.work))
    timeout = 300.0 if args.quick else 1800.0
    started = time.monotonic()
    try:
        datasets = [prepare_dataset(work, dataset_spec(name, args.quick)) for name in args.dataset_list]
        tools = make_tools(args, work)
        probe = work / "probe"
        remove_tree(probe)
        probe.mkdir()
        floor = rss_floor(LogDir(probe))
        rows = run_all(tools, datasets, args.reps, work, timeout)
        meta = metadata(args, tools, datasets, work, args.reps)
        meta["rss_floor_bytes"] = floor
        meta["wall_seconds"] = round(time.monotonic() - started, 1)
        report = write_results(args.results, meta, rows, args.tool_list, args.dataset_list)
    except BenchError as e:
        print(e.render(), file=sys.stderr, flush=True)
        print(f"compare.py: aborted; logs and repositories left in {work / 'run'}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("compare.py: interrupted; stopped every process it started", file=sys.stderr)
        return 130
    except SystemExit as e:
        print("compare.py: stopped by a signal; stopped every process it started", file=sys.stderr)
        raise e
    finally:
        terminate_all()
    print(report)
    say(f"done in {time.monotonic() - started:.0f} s; results in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
