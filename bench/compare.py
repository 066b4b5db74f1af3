#!/usr/bin/env python3
"""Benchmark Flotilla side by side with restic, borg and rsync.

Method
------
* **Datasets** are deterministic (fixed seeds) and generated once under
  ``WORK/datasets/<name>-<params-hash>/data``; a ``.complete`` marker next to
  ``data`` says generation finished, so later runs reuse them. ``small`` is many
  small files (half text, half random bytes), ``large`` a few big files (half
  random, half text), ``usr`` a copy of real files from ``/usr/lib`` and
  ``/usr/share`` (whatever this host has, walked in sorted order), ``million``
  (only when asked for) a million files of 0–8 KiB, slices of a seeded text and
  a seeded random pool. After generation (outside the cache key, idempotently)
  ~1% of the regular files (at most 1,000) and two directories get a seeded
  ``user.flotilla-bench`` extended attribute, unless the filesystem refuses.
* **Operations**, for every (tool, dataset, repetition), each against a fresh
  repository on the same disk (``WORK/run/repo-TOOL``):
  ``initial`` (first backup), ``unchanged`` (second backup, nothing changed),
  ``changed`` (1% of the files, at least one, get new bytes totalling 1% of the
  dataset's bytes, one region per file at a seeded offset, the same files and
  bytes every time; then a backup; afterwards the original bytes, atime and
  mtime are put back), ``restore`` (a full restore of the initial snapshot into
  an empty directory) and ``restore-changed`` (the same for the changed
  snapshot). rsync's mirror holds only the latest state: both its restores copy
  it back and are checked against the changed state. Each restore is verified
  before it counts (untimed): every restored entry's path, type, size and
  symlink target must equal the dataset's, and 50 deterministic files, every
  changed file and every file of ``large`` are compared byte for byte (a
  mismatch aborts the run); mode bits, mtime (ns), uid, gid and xattrs of every
  file and directory (symlinks: uid and gid) are compared too, with the changed
  bytes and mtimes overlaid for a changed state: for Flotilla a difference
  aborts the run, for the peers it is counted per kind in the row.
* **What is timed**: only the external command of the operation, with
  ``time.monotonic()`` around it (from fork to its exit being reaped). For
  restores, every tool's time also includes ``sync -f TARGET`` (syncfs of the
  target's filesystem) right after the command: Flotilla's restore syncs before
  it reports done, so every restore is timed until its data is durable. Setup
  (repository init, starting nats-server and agents, enrolment), dataset
  changes, waiting, verification and the ``sync`` after each op are not timed.
  For Flotilla the command is ``flotilla backup|restore ... --wait``: dispatch
  over NATS, the agents' work over QUIC and the report back. ``flotilla-cold``
  stops both agents before each op (untimed) and its time runs from starting
  them again, through waiting until both are online, to the command's end.
  restic's empty repository is made once per run (``restic init`` calibrates
  its key derivation for ~3 s) and copied for each sequence; each copy gets its
  own fresh cache.
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
  ``status`` after it (``flotilla-cold``: the fresh agents' VmHWM). After the
  warm ``initial`` backup both agents' ``VmRSS`` is polled once a second for up
  to 60 s (``--quick``: 5 s) to see whether they settle under 40 MiB.

Outputs in RESULTS: ``raw.json`` (metadata and every measurement), ``summary.csv``
and ``summary.json`` (medians, ranges, ratios), ``chart.svg`` (times),
``repo.svg`` (repository sizes) and ``report.md`` (the Markdown also printed on stdout).
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import array
import atexit
import base64
import csv
import dataclasses
import datetime
import errno
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

ALL_TOOLS = ("flotilla", "flotilla-cold", "restic", "borg", "rsync")
FLOTILLA_TOOLS = ("flotilla", "flotilla-cold")
ALL_DATASETS = ("small", "large", "usr")  # the default list
EXTRA_DATASETS = ("million",)  # only when asked for: it takes minutes to create
OPS = ("initial", "unchanged", "changed", "restore", "restore-changed")
# Which backup each restore op restores (rsync's mirror only ever holds the latest).
RESTORE_FROM = {"restore": "initial", "restore-changed": "changed"}
PEERS = ("restic", "borg", "rsync")

SEED = 20261122
GENERATOR_VERSION = 2
RACY_WAIT = 1.1  # seconds; Flotilla's racily-clean window is 1 s
CHANGE_FRACTION = 0.01  # of the files, and of the dataset's bytes
VERIFY_SAMPLE = 50
TAIL_LINES = 20

# Extended attributes the datasets carry (set after generation, outside the
# cache key): about 1% of the regular files, at most this many, and two dirs.
XATTR_NAME = "user.flotilla-bench"
XATTR_MAX_FILES = 1000
XATTR_DIRS = 2
METADATA_KINDS = ("mode", "mtime", "uid", "gid", "xattrs")

# Issue 12's memory targets.
AGENT_PEAK_LIMIT = 200 * MiB
AGENT_PEAK_LIMIT_MILLION = 1 * GiB
SETTLE_RSS = 40 * MiB
SETTLE_WINDOW = 60.0  # seconds; --quick: SETTLE_WINDOW_QUICK
SETTLE_WINDOW_QUICK = 5.0

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
    seconds: float  # includes sync_seconds when the command was followed by a sync
    peak_rss_bytes: int
    stdout: Path
    stderr: Path
    aborted: Optional[str]  # why it was killed (timeout, a daemon died), if it was
    sync_seconds: Optional[float] = None  # the `sync -f TARGET` after the command, if asked

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
#
# With a sync path (argv[2], empty for none) the timed window goes on until
# `sync -f PATH` (syncfs(2) of the filesystem holding PATH) has returned:
# restores count until their data is durable, as Flotilla's own restore does
# (it ends with a syncfs). The sync's own rusage is not the command's.
LAUNCHER = r"""
import os, sys, time
report, sync_path, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
def run(argv):
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(argv[0], argv)
        except OSError as e:
            os.write(2, ("cannot run %s: %s\n" % (argv[0], e)).encode())
        os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    return status, usage
start = time.monotonic()
status, usage = run(cmd)
done = time.monotonic()
sync_status = 0
if sync_path and os.waitstatus_to_exitcode(status) == 0:
    sync_status, _ = run(["sync", "-f", sync_path])
seconds = time.monotonic() - start
fd = os.open(report, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
line = "%r %d %d %r %d\n" % (seconds, usage.ru_maxrss, status, seconds - (done - start), sync_status)
os.write(fd, line.encode())
os.close(fd)
code = os.waitstatus_to_exitcode(status)
if code == 0 and sync_status != 0:
    os.write(2, ("sync -f %s failed (status %d)\n" % (sync_path, sync_status)).encode())
    code = 125
os._exit(code if code >= 0 else 128 - code)
"""


def read_launcher_report(path: Path) -> Optional[tuple[float, int, float]]:
    """(seconds, ru_maxrss in bytes, sync seconds) as the launcher measured them."""
    try:
        seconds, maxrss, _status, sync_seconds, _sync_status = path.read_text().split()
        return float(seconds), int(maxrss) * KiB, float(sync_seconds)
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
    sync_fs: Optional[Path] = None,
) -> Measured:
    """Run a command to completion through the launcher: its time and ru_maxrss.

    A watchdog thread kills the command after `timeout` seconds, or as soon as
    `health` returns a reason (e.g. an agent the command waits for has died).
    With `sync_fs`, the time includes `sync -f sync_fs` right after the command.
    """
    out_path, err_path = logs.pair(name)
    report = out_path.with_suffix(".rusage")
    sync_arg = str(sync_fs) if sync_fs is not None else ""
    perf = None
    if os.environ.get("BENCH_PERF_DIR") and os.environ.get("BENCH_PERF_MATCH", "") in name:
        perf = subprocess.Popen(
            ["perf", "record", "-a", "-g", "-e", "cpu-clock", "-o",
             os.path.join(os.environ["BENCH_PERF_DIR"], name + ".data")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", LAUNCHER, str(report), sync_arg, *cmd],
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
    if perf is not None:
        perf.send_signal(signal.SIGINT)
        perf.wait()
    inner = read_launcher_report(report)
    sync_seconds = None
    if inner is not None:
        seconds, peak, sync_seconds = inner
    else:  # the launcher was killed (timeout): fall back to its own numbers
        peak = usage.ru_maxrss * KiB
    return Measured(
        returncode=proc.returncode,
        seconds=seconds,
        peak_rss_bytes=peak,
        stdout=out_path,
        stderr=err_path,
        aborted=aborted[0] if aborted else None,
        sync_seconds=sync_seconds if sync_fs is not None else None,
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
    sync_fs: Optional[Path] = None,
) -> Measured:
    """run_measured, but a kill or non-zero exit is a BenchError with the log tails."""
    m = run_measured(cmd, env=env, logs=logs, name=name, timeout=timeout, cwd=cwd, health=health, sync_fs=sync_fs)
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


def walk_tree(root: Path) -> Iterator[tuple[str, os.DirEntry]]:
    """Every entry under root with its relative path, depth first, never following symlinks."""
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(os.path.join(root, rel_dir)) as it:
            for entry in it:
                rel = os.path.join(rel_dir, entry.name) if rel_dir else entry.name
                if entry.is_dir(follow_symlinks=False):
                    stack.append(rel)
                yield rel, entry


def scan_tree(root: Path) -> Listing:
    """Every entry under root (not following symlinks), keyed by relative path."""
    listing: Listing = {}
    for rel, entry in walk_tree(root):
        if entry.is_symlink():
            listing[rel] = ("l", os.readlink(entry.path))
        elif entry.is_dir(follow_symlinks=False):
            listing[rel] = ("d", 0)
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


# ext4 without a journal (this VM's root filesystem) does not reuse an inode
# freed less than 60 s ago (360 s while its inode table block is dirty): each
# file created then scans past every recently freed inode. Deleting a
# restored tree of 100,000 files made the next tool's restore two to three
# times slower, by however long ago that was: noise that depended on the
# order of the tools (and a restore dirties the inode table blocks it
# allocates in, which stretches the window to 360 s around it). So nothing
# is deleted while tools are timed: trees are moved aside into a trash,
# emptied between repetitions, synced, and followed by a wait past the
# longest window. Every tool's restore then starts from the same state.
RECENT_DELETE_SECONDS = 361.0


class Trash:
    """Trees to delete where no timed operation pays for it."""

    def __init__(self, work: Path, quick: bool) -> None:
        self.dir = work / "trash"
        self.quick = quick
        # What an earlier run left in it is deleted by the first empty().
        self.dir.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def put(self, path: Path) -> None:
        """Move a tree aside (a rename: nothing is freed yet)."""
        if path.exists() or path.is_symlink():
            self.count += 1
            os.rename(path, self.dir / f"{os.getpid()}-{self.count}")

    def empty(self, wait: bool = True) -> None:
        """Delete what was put aside, sync, and wait until its inodes are reusable."""
        if not any(self.dir.iterdir()):
            return
        started = time.monotonic()
        remove_tree(self.dir)
        self.dir.mkdir()
        os.sync()
        if wait and not self.quick:
            time.sleep(RECENT_DELETE_SECONDS)
        say(f"emptied the trash in {time.monotonic() - started:.0f} s (untimed)")


TRASH: Optional[Trash] = None


def discard(path: Path) -> None:
    """remove_tree for trees a run leaves behind: into the trash when there is one."""
    if TRASH is not None:
        TRASH.put(path)
    else:
        remove_tree(path)


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
    elif name == "million":
        params = {
            "files": 2000 if quick else 1_000_000,
            "max": 8 * KiB,
            "per_dir": 100 if quick else 1000,
            "text_pool": 1 * MiB if quick else 16 * MiB,
            "random_pool": 1 * MiB if quick else 64 * MiB,
        }
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


def generate_million(root: Path, params: dict[str, Any]) -> None:
    """A million files of 0–8 KiB, 1,000 per directory, two levels of directories.

    Python cannot draw 4 GiB byte by byte in reasonable time, so every file is
    a slice of one of two seeded pools (text for even-numbered files, random
    bytes for odd ones) at a seeded offset; sizes and offsets come from one bulk
    draw. Each file (a single chunk for every tool) differs from every other.
    """
    files, per_dir, largest = params["files"], params["per_dir"], params["max"]
    rng = random.Random(f"{SEED}:million")
    text = memoryview(text_bytes(rng, make_line_pool(SEED), params["text_pool"]))
    noise = memoryview(rng.randbytes(params["random_pool"]))
    draws = array.array("I")
    draws.frombytes(rng.randbytes(8 * files))
    if sys.byteorder == "big":  # the same numbers on every machine
        draws.byteswap()
    dirs = math.ceil(files / per_dir)
    fan = max(1, math.ceil(math.sqrt(dirs)))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for d in range(dirs):
        directory = root / f"d{d // fan:03d}" / f"d{d % fan:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i in range(d * per_dir, min(files, (d + 1) * per_dir)):
                size = draws[2 * i] % (largest + 1)
                pool, ext = (text, "txt") if i % 2 == 0 else (noise, "bin")
                offset = draws[2 * i + 1] % (len(pool) - size + 1)
                fd = os.open(f"f{i:07d}.{ext}", flags, 0o644, dir_fd=dfd)
                try:
                    data = pool[offset : offset + size]
                    while data:
                        data = data[os.write(fd, data) :]
                finally:
                    os.close(fd)
        finally:
            os.close(dfd)
        done = min(files, (d + 1) * per_dir)
        if done % 100_000 == 0 or done == files:
            say(f"  million: {done}/{files} files")


GENERATORS = {"small": generate_small, "large": generate_large, "usr": generate_usr, "million": generate_million}


@dataclass
class Change:
    """One file's changed region, with what it takes to undo it."""

    rel: str
    offset: int
    old: bytes
    new: bytes
    atime_ns: int
    mtime_ns: int
    new_mtime_ns: int = 0  # the mtime the change left (what the `changed` snapshot holds)


# rel -> (offset, new bytes, mtime after the change): what the `changed`
# snapshot holds where it differs from the dataset as it is between sequences.
Overlay = dict[str, tuple[int, bytes, int]]


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


def xattr_value(rel: str) -> bytes:
    """The seeded value of the bench attribute for one path."""
    return f"{SEED}:{hashlib.sha256(f'{SEED}:xattr:{rel}'.encode()).hexdigest()[:24]}".encode()


def xattr_sample(ds: "Dataset") -> list[str]:
    """The fixed seeded entries that carry XATTR_NAME: ~1% of the regular files
    (at least one, at most XATTR_MAX_FILES) and XATTR_DIRS directories."""
    rng = random.Random(f"{SEED}:xattr:{ds.name}")
    files = ds.regular_files()
    dirs = sorted(rel for rel, (kind, _) in ds.listing.items() if kind == "d")
    count = min(XATTR_MAX_FILES, max(1, len(files) // 100)) if files else 0
    return sorted(rng.sample(files, count)) + sorted(rng.sample(dirs, min(XATTR_DIRS, len(dirs))))


def mark_xattrs(ds: "Dataset") -> tuple[int, int]:
    """Give the xattr sample its attribute where it is missing (idempotent).

    Returns (entries that carry it, entries set now). Neither the generated
    bytes nor the cache key change; a filesystem that refuses user xattrs
    leaves the dataset without them (and says so).
    """
    have = changed = 0
    for rel in xattr_sample(ds):
        path = os.path.join(ds.root, rel)
        value = xattr_value(rel)
        try:
            if os.getxattr(path, XATTR_NAME, follow_symlinks=False) == value:
                have += 1
                continue
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
        try:
            set_xattr(path, value)
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES):
                say(f"dataset {ds.name}: note: cannot set user xattrs here ({e.strerror}); the dataset has none")
                return have, changed
            raise
        have += 1
        changed += 1
    return have, changed


def set_xattr(path: str, value: bytes) -> None:
    """setxattr; a read-only file we own gets u+w for the moment it takes
    (mode and mtime stay as they were, only the ctime moves)."""
    try:
        os.setxattr(path, XATTR_NAME, value, follow_symlinks=False)
    except PermissionError:
        st = os.lstat(path)
        if st.st_uid != os.geteuid() or st.st_mode & stat.S_IWUSR:
            raise
        os.chmod(path, stat.S_IMODE(st.st_mode) | stat.S_IWUSR)
        try:
            os.setxattr(path, XATTR_NAME, value, follow_symlinks=False)
        finally:
            os.chmod(path, stat.S_IMODE(st.st_mode))


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
    have, changed = mark_xattrs(ds)
    ds.stats["xattr_entries"] = have
    if changed:
        say(f"dataset {ds.name}: set {XATTR_NAME} on {changed} entries")
        ds.mark_modified()  # their ctime moved
    return ds


# --------------------------------------------------------------------------
# Changing files (and undoing it)
# --------------------------------------------------------------------------


def plan_changes(ds: Dataset) -> list[tuple[str, int, bytes]]:
    """The same files, offsets and new bytes every time: seeded by the dataset name.

    1% of the non-empty regular files (at least one) get new bytes totalling 1%
    of the dataset's regular-file bytes: each chosen file one contiguous region
    at a seeded offset, of its share of what is left to write (remaining bytes /
    remaining files, smallest files first), capped at its size. So a file
    smaller than its share is rewritten whole and the larger ones make up for
    it; the total falls short of 1% only if the chosen files are all smaller.
    On `large` that is one file with ~20 MiB rewritten, on `small` 1,000 files.
    """
    rng = random.Random(f"{SEED}:change:{ds.name}")
    candidates = [rel for rel in ds.regular_files() if ds.listing[rel][1] > 0]
    if not candidates:
        return []
    count = max(1, int(len(candidates) * CHANGE_FRACTION))
    chosen = sorted(rng.sample(candidates, count))
    left = max(1, round(ds.stats["bytes"] * CHANGE_FRACTION))
    lengths: dict[str, int] = {}
    by_size = sorted(chosen, key=lambda rel: (ds.listing[rel][1], rel))
    for i, rel in enumerate(by_size):
        share = math.ceil(left / (len(by_size) - i))
        lengths[rel] = min(share, ds.listing[rel][1])
        left -= lengths[rel]
    plan = []
    for rel in chosen:
        size, length = ds.listing[rel][1], lengths[rel]
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
    """Overwrite 1% of the bytes in 1% of the files; return what is needed to undo it."""
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
    for c in changes:
        c.new_mtime_ns = os.stat(ds.root / c.rel).st_mtime_ns
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


@dataclass
class Mismatches:
    """Metadata differences a restore check found, counted per kind, with samples."""

    counts: dict[str, int] = field(default_factory=lambda: {k: 0 for k in METADATA_KINDS})
    samples: list[str] = field(default_factory=list)

    def add(self, kind: str, rel: str, expected: Any, restored: Any) -> None:
        self.counts[kind] += 1
        if len(self.samples) < 10:
            self.samples.append(f"{kind}: {rel}: expected {short_repr(expected)}, restored {short_repr(restored)}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return ", ".join(f"{k} {n}" for k, n in self.counts.items() if n) or "none"


def short_repr(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def kind_of(st: os.stat_result) -> str:
    """The Listing kind of a stat result."""
    if stat.S_ISLNK(st.st_mode):
        return "l"
    if stat.S_ISDIR(st.st_mode):
        return "d"
    if stat.S_ISREG(st.st_mode):
        return "f"
    return "o"


def xattrs_of(path: str) -> tuple[tuple[str, bytes], ...]:
    """Every extended attribute of path (not following symlinks), sorted by name."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return ()
        raise
    out = []
    for name in sorted(names):
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError as e:
            if e.errno != errno.ENODATA:  # removed in between
                raise
    return tuple(out)


def compare_metadata(
    rel: str,
    kind: str,
    want: os.stat_result,
    got: os.stat_result,
    want_path: str,
    got_path: str,
    mtime_ns: Optional[int],
    found: Mismatches,
) -> None:
    """Owner and group of every entry; mode bits, mtime (ns) and xattrs of files
    and directories. A symlink's target is compared with the listing; its times
    and mode are not (not every tool sets them, and Linux ignores its mode)."""
    if want.st_uid != got.st_uid:
        found.add("uid", rel, want.st_uid, got.st_uid)
    if want.st_gid != got.st_gid:
        found.add("gid", rel, want.st_gid, got.st_gid)
    if kind == "l":
        return
    if stat.S_IMODE(want.st_mode) != stat.S_IMODE(got.st_mode):
        found.add("mode", rel, oct(stat.S_IMODE(want.st_mode)), oct(stat.S_IMODE(got.st_mode)))
    expected_mtime = want.st_mtime_ns if mtime_ns is None else mtime_ns
    if expected_mtime != got.st_mtime_ns:
        found.add("mtime", rel, expected_mtime, got.st_mtime_ns)
    want_x, got_x = xattrs_of(want_path), xattrs_of(got_path)
    if want_x != got_x:
        found.add("xattrs", rel, dict(want_x), dict(got_x))


def verify_restore(
    ds: Dataset,
    restored: Path,
    changed: Overlay,
    expect_changed: bool,
    where: Where,
    strict_metadata: bool,
) -> dict[str, Any]:
    """Compare a restored tree with the dataset (untimed); raise on what must match.

    Structure (every path, its type, size and symlink target) and content
    (a sample of files byte for byte) must match for every tool, or the run
    aborts. Metadata (mode bits, mtime in ns, uid, gid and xattrs of files and
    directories; uid and gid of symlinks) is compared for every entry: with
    `strict_metadata` (Flotilla) a difference aborts the run too, otherwise
    (the peers) the differences are counted per kind and returned.

    The changed files are always compared: a restore of the initial snapshot
    must give their original bytes and mtime, one of the changed snapshot (and
    rsync's mirror) their changed bytes and the mtime the change left.
    """
    overlay = changed if expect_changed else {}
    if not restored.is_dir():
        raise where.fail(f"restore verification: {restored} does not exist (nothing restored where expected)")
    problems: list[str] = []
    bad = 0
    found = Mismatches()
    seen: set[str] = set()
    for rel, entry in walk_tree(restored):
        got = entry.stat(follow_symlinks=False)
        kind = kind_of(got)
        want = ds.listing.get(rel)
        if want is None:
            bad += 1
            if len(problems) < 10:
                problems.append(f"unexpected: {rel}")
            continue
        seen.add(rel)
        shape = (kind, os.readlink(entry.path) if kind == "l" else got.st_size if kind == "f" else 0)
        if shape != want:
            bad += 1
            if len(problems) < 10:
                problems.append(f"differs: {rel}: expected {want}, restored {shape}")
            continue
        source = os.path.join(ds.root, rel)
        patch = overlay.get(rel)
        mtime = patch[2] if patch is not None else None
        compare_metadata(rel, kind, os.lstat(source), got, source, entry.path, mtime, found)
    if len(seen) != len(ds.listing):
        missing = sorted(ds.listing.keys() - seen)
        bad += len(missing)
        problems += [f"missing: {rel}" for rel in missing[:5]]
    if bad:
        raise where.fail(
            f"restore verification: the tree under {restored} differs from {ds.root} ({bad} entries):\n  "
            + "\n  ".join(problems)
        )
    files = ds.regular_files()
    rng = random.Random(f"{SEED}:verify:{ds.name}")
    sample = set(rng.sample(files, min(VERIFY_SAMPLE, len(files))))
    sample |= set(changed)
    if ds.name == "large":
        sample |= set(files)
    for rel in sorted(sample):
        patch = overlay.get(rel)
        if not same_bytes(ds.root / rel, None if patch is None else patch[:2], restored / rel):
            raise where.fail(f"restore verification: {restored / rel} differs byte-wise from the expected content")
    if strict_metadata and found.total:
        raise where.fail(
            f"restore verification: metadata under {restored} differs from {ds.root} "
            f"({found.summary()}):\n  " + "\n  ".join(found.samples[:10])
        )
    return {
        "verified_entries": len(seen),
        "verified_files_bytewise": len(sample),
        "metadata_mismatches": dict(found.counts),
        "metadata_mismatch_samples": found.samples[:5],
    }


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
    settle_window: float  # seconds the agents' RSS is watched after `initial`

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
    strict_metadata = False  # a metadata difference after a restore aborts the run (Flotilla)

    def version(self) -> str:
        raise NotImplementedError

    def start(self, ds: Dataset, layout: Layout) -> None:
        """Create a fresh repository (and start daemons); not timed."""
        raise NotImplementedError

    def backup(self, ds: Dataset, op: str) -> OpResult:
        raise NotImplementedError

    def after_initial(self, ds: Dataset, row: dict[str, Any]) -> None:
        """Untimed measurements right after the initial backup (Flotilla: settling RSS)."""

    def restore(self, ds: Dataset, target: Path, op: str) -> tuple[OpResult, Path]:
        """Restore the snapshot of backup RESTORE_FROM[op] into target, timed until
        its filesystem is synced; returns where the dataset landed."""
        raise NotImplementedError

    def restored_state(self, op: str) -> str:
        """Which state of the dataset restore op gives back: "initial" or "changed"."""
        return RESTORE_FROM[op]

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

    def restore(self, ds: Dataset, target: Path, op: str) -> tuple[OpResult, Path]:
        assert self.layout is not None
        snap = self.snapshots[RESTORE_FROM[op]]
        cmd = ["restic", "-r", str(self.repo_dir()), "restore", snap, "--target", str(target)]
        m = run_checked(
            cmd,
            where=Where(self.name, ds.name, op),
            env=self.env,
            logs=self.layout.logs,
            name=f"restic-{op}",
            timeout=self.layout.timeout,
            sync_fs=target,
        )
        extra = {"snapshot": snap, "sync_seconds": m.sync_seconds}
        return OpResult(m.seconds, m.peak_rss_bytes, extra), landed_under(target, ds.root)


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

    def restore(self, ds: Dataset, target: Path, op: str) -> tuple[OpResult, Path]:
        assert self.layout is not None
        archive = self.ARCHIVES[RESTORE_FROM[op]]
        m = run_checked(
            ["borg", "extract", f"{self.repo_dir()}::{archive}"],
            where=Where(self.name, ds.name, op),
            env=self.env,
            logs=self.layout.logs,
            name=f"borg-extract-{op}",
            timeout=self.layout.timeout,
            cwd=target,
            sync_fs=target,
        )
        extra = {"archive": archive, "sync_seconds": m.sync_seconds}
        return OpResult(m.seconds, m.peak_rss_bytes, extra), landed_under(target, ds.root)


class Rsync(Tool):
    """rsync -aX (xattrs too) into a plain directory: a mirror of the latest state."""

    name = "rsync"
    FLAGS = "-aX"

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
            ["rsync", self.FLAGS, f"{ds.root}/", f"{self.repo_dir()}/"],
            where=Where(self.name, ds.name, op),
            env=dict(os.environ),
            logs=self.layout.logs,
            name=f"rsync-{op}",
            timeout=self.layout.timeout,
        )
        return OpResult(m.seconds, m.peak_rss_bytes)

    def restore(self, ds: Dataset, target: Path, op: str) -> tuple[OpResult, Path]:
        """The mirror copied back: the same for both restore ops."""
        assert self.layout is not None
        m = run_checked(
            ["rsync", self.FLAGS, f"{self.repo_dir()}/", f"{target}/"],
            where=Where(self.name, ds.name, op),
            env=dict(os.environ),
            logs=self.layout.logs,
            name=f"rsync-{op}",
            timeout=self.layout.timeout,
            sync_fs=target,
        )
        return OpResult(m.seconds, m.peak_rss_bytes, {"sync_seconds": m.sync_seconds}), target

    def restored_state(self, op: str) -> str:
        return "changed"


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


def read_status_bytes(pid: int, key: str) -> Optional[int]:
    """A kB field of /proc/PID/status (VmHWM, VmRSS) in bytes, or None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * KiB
    except (OSError, ValueError, IndexError):
        pass
    return None


def read_peak_rss(pid: int) -> Optional[int]:
    return read_status_bytes(pid, "VmHWM")


def read_rss(pid: int) -> Optional[int]:
    return read_status_bytes(pid, "VmRSS")


class Flotilla(Tool):
    """A whole fleet per sequence: nats-server, a source agent and a storage agent.

    The agents are started once per sequence and stay up (warm), as they do on
    a real host; `flotilla-cold` (ColdFlotilla) restarts them for every op.
    """

    name = "flotilla"
    strict_metadata = True
    SOURCE = "src"
    STORAGE = "store"
    AGENTS = ("src", "store")
    ROLES = {"src": "source agent", "store": "storage agent", "nats": "nats-server"}
    ONLINE_LINE = b"agent online"  # the agent's log line once every loop runs and it announced itself

    def __init__(self, cli: Path, agent: Path, nats_server: Path) -> None:
        self.cli = cli
        self.agent = agent
        self.nats_server = nats_server
        self.layout: Optional[Layout] = None
        self.env: dict[str, str] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.agent_cmds: dict[str, list[str]] = {}
        self.snapshots: dict[str, str] = {}
        self.peak_reset_ok = True

    def version(self) -> str:
        return f"{first_line_of([str(self.cli), '--version'])}; {first_line_of([str(self.agent), '--version'])}"

    def repo_dir(self) -> Path:
        assert self.layout is not None
        return self.layout.repo(self.name)

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
        self.agent_cmds = {
            "src": common
            + ["--bundle", str(bundles / "src.toml"), "--state-dir", str(layout.run / "state" / "src")]
            + ["--backup-root", str(ds.root), "--restore-root", str(layout.restore_root)],
            # A fixed QUIC port: a restarted storage agent listens where the last one did.
            "store": common
            + ["--bundle", str(bundles / "store.toml"), "--state-dir", str(layout.run / "state" / "store")]
            + ["--storage", str(self.repo_dir()), "--listen", f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}"],
        }
        self.spawn_agents()
        self.wait_online(where, timeout=30)

    def spawn_agents(self) -> None:
        """Start both agents. They log at their default level (info), whatever
        RUST_LOG says here, so that the cold variant can see their online line."""
        env = {k: v for k, v in self.env.items() if k != "RUST_LOG"}
        for role in self.AGENTS:
            self.procs[role] = spawn_daemon(self.agent_cmds[role], env=env, log=self.log(f"agent-{role}"))

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

    def online_hosts(self) -> tuple[Optional[set[str]], str]:
        """The hosts `flotilla hosts --json` shows online (None if it failed), and its output."""
        try:
            r = subprocess.run(
                [str(self.cli), "hosts", "--json"], env=self.env, capture_output=True, text=True, timeout=10
            )
            hosts = json.loads(r.stdout) if r.returncode == 0 else None
            if hosts is None:
                return None, (r.stdout + r.stderr).strip()
            return {h.get("host") for h in hosts if h.get("status") == "online"}, r.stdout.strip()
        except (subprocess.TimeoutExpired, ValueError, AttributeError) as e:
            return None, str(e)

    def check_agents_alive(self, where: Where, when: str) -> None:
        for role in self.AGENTS:
            proc = self.procs.get(role)
            if proc is not None and proc.poll() is not None:
                raise where.fail(
                    f"the {self.ROLES[role]} exited with code {proc.returncode} {when}", *self.daemon_logs()
                )

    def wait_online(self, where: Where, timeout: float, poll: float = 0.2) -> None:
        """Poll `flotilla hosts --json` until both agents are online."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            self.check_agents_alive(where, "while starting")
            online, last = self.online_hosts()
            if online is not None and {self.SOURCE, self.STORAGE} <= online:
                return
            time.sleep(poll)
        raise where.fail(
            f"agents not both online within {timeout:.0f} s; last `flotilla hosts --json`: {last[-500:]}",
            *self.daemon_logs(),
        )

    def run_cli(self, args: list[str], ds: Dataset, op: str, sync_fs: Optional[Path]) -> Measured:
        """The timed CLI command of an op (restores: followed by `sync -f TARGET`)."""
        assert self.layout is not None
        return run_checked(
            [str(self.cli), *args],
            where=Where(self.name, ds.name, op),
            env=self.env,
            logs=self.layout.logs,
            name=f"{self.name}-{op}",
            timeout=self.layout.timeout,
            extra_logs=self.daemon_logs(),
            health=self.dead_daemon,
            sync_fs=sync_fs,
        )

    def peaks(self, m: Measured) -> dict[str, Any]:
        return {
            "cli_peak_rss_bytes": m.peak_rss_bytes,
            "source_agent_peak_rss_bytes": read_peak_rss(self.procs["src"].pid),
            "storage_agent_peak_rss_bytes": read_peak_rss(self.procs["store"].pid),
        }

    def measure(
        self, args: list[str], ds: Dataset, op: str, sync_fs: Optional[Path] = None
    ) -> tuple[Measured, dict[str, Any]]:
        """Run a CLI command while tracking both agents' peak RSS."""
        for role in self.AGENTS:
            if not reset_peak_rss(self.procs[role].pid):
                self.peak_reset_ok = False
        m = self.run_cli(args, ds, op, sync_fs)
        return m, self.peaks(m)

    def dead_daemon(self) -> Optional[str]:
        """Why the fleet cannot finish a task (a daemon exited), or None."""
        for role, proc in list(self.procs.items()):
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

    def restore(self, ds: Dataset, target: Path, op: str) -> tuple[OpResult, Path]:
        snap = self.snapshots[RESTORE_FROM[op]]
        args = ["restore", snap, "--to", f"{self.SOURCE}:{target}", "--wait", "--json"]
        m, extra = self.measure(args, ds, op, sync_fs=target)
        extra["snapshot"] = snap
        extra["sync_seconds"] = m.sync_seconds
        summary = last_json_line(m, "type", "summary")
        if summary is not None:
            extra["outcome"] = summary.get("outcome")
            extra["duration_ms"] = summary.get("duration_ms")
            restored = summary.get("restore") or {}
            for k in ("files", "dirs", "symlinks", "bytes", "errors"):
                extra[f"restored_{k}"] = restored.get(k)
        return OpResult(m.seconds, m.peak_rss_bytes, extra), landed_under(target, ds.root)

    def after_initial(self, ds: Dataset, row: dict[str, Any]) -> None:
        """Watch both agents' VmRSS once a second after the initial backup.

        Issue 12: an agent that has just backed up 100,000 files settles back
        under 40 MiB within a minute. Records, per agent, the first second it
        was under SETTLE_RSS (None: not within the window) and its RSS at the
        last poll; polling stops early once both are under.
        """
        assert self.layout is not None
        window = self.layout.settle_window
        pids = {"source_agent": self.procs["src"].pid, "storage_agent": self.procs["store"].pid}
        first: dict[str, Optional[float]] = {k: None for k in pids}
        last: dict[str, Optional[int]] = {k: None for k in pids}
        samples: list[list[Any]] = []
        start = time.monotonic()
        while True:
            t = time.monotonic() - start
            for k, pid in pids.items():
                last[k] = read_rss(pid)
                if first[k] is None and last[k] is not None and last[k] < SETTLE_RSS:
                    first[k] = t
            samples.append([round(t, 1), *(last[k] for k in pids)])
            if all(v is not None for v in first.values()) or t >= window:
                break
            time.sleep(max(0.0, min(window, float(len(samples))) - (time.monotonic() - start)))
        for k in pids:
            row[f"{k}_settled_rss_bytes"] = last[k]
            row[f"{k}_settle_seconds"] = None if first[k] is None else round(first[k], 1)
        row["settle_window_seconds"] = window
        row["settle_samples"] = samples  # [seconds, source agent VmRSS, storage agent VmRSS]
        say(
            f"{self.name:>13} {ds.name:>7} settled RSS after {samples[-1][0]:.0f} s: "
            + ", ".join(f"{k.replace('_', ' ')} {(last[k] or 0) / MiB:.1f} MiB" for k in pids)
        )

    def stop(self) -> None:
        """Agents first (they announce going offline), then nats-server."""
        for role in ("src", "store", "nats"):
            proc = self.procs.pop(role, None)
            if proc is not None:
                stop_process(proc)


class ColdFlotilla(Flotilla):
    """Flotilla with both agents started for every operation, as restic and borg
    start cold for every command.

    Before each timed op both agents are stopped (untimed; nats-server keeps
    running, state directories and the repository stay) and the harness waits
    until `flotilla hosts` shows them offline. The time then runs from spawning
    both agents until the CLI command returned (restores: and the target was
    synced). In between the harness waits until both agents are ready, because
    the CLI refuses a storage host that is not online (`storage_addr` in
    coordinator/src/fleetops.rs) and a restore asks the storage agent for its
    snapshots first: each agent's log must show its online line (written once
    all its loops, the repository queries among them, are running) and
    `flotilla hosts --json` must show both online. That wait, including its
    last `flotilla hosts` call, is inside the timed window (agents_ready_seconds).
    Peak RSS is the new processes' VmHWM after the op.
    """

    name = "flotilla-cold"

    def after_initial(self, ds: Dataset, row: dict[str, Any]) -> None:
        """Nothing: settling is measured on the warm agents (these restart anyway)."""

    def stop_agents(self, where: Where) -> None:
        """Stop both agents at once (they announce going offline), untimed."""
        procs = [self.procs.pop(role) for role in self.AGENTS]
        for proc in procs:
            signal_group(proc, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            stop_process(proc)  # kills one that did not stop; reaps and unregisters
        # A record still saying online would let the wait below pass at once.
        deadline = time.monotonic() + 30
        last = ""
        while time.monotonic() < deadline:
            online, last = self.online_hosts()
            if online is not None and not online & {self.SOURCE, self.STORAGE}:
                return
            time.sleep(0.1)
        raise where.fail(f"stopped agents not shown offline within 30 s; `flotilla hosts --json`: {last[-500:]}")

    def wait_ready(self, where: Where, marks: dict[str, int], timeout: float) -> None:
        """Until both agents logged their online line (after `marks`) and both show online."""
        deadline = time.monotonic() + timeout
        logged: set[str] = set()
        last = ""
        while time.monotonic() < deadline:
            self.check_agents_alive(where, "while starting")
            for role in self.AGENTS:
                if role not in logged and self.logged_since(role, marks[role], self.ONLINE_LINE):
                    logged.add(role)
            if len(logged) == len(self.AGENTS):
                online, last = self.online_hosts()
                if online is not None and {self.SOURCE, self.STORAGE} <= online:
                    return
            time.sleep(0.01)
        raise where.fail(
            f"restarted agents not both ready within {timeout:.0f} s (logged online: {sorted(logged)}); "
            f"last `flotilla hosts --json`: {last[-500:]}",
            *self.daemon_logs(),
        )

    def logged_since(self, role: str, offset: int, needle: bytes) -> bool:
        try:
            with open(self.log(f"agent-{role}"), "rb") as f:
                f.seek(offset)
                return needle in f.read()
        except OSError:
            return False

    def measure(
        self, args: list[str], ds: Dataset, op: str, sync_fs: Optional[Path] = None
    ) -> tuple[Measured, dict[str, Any]]:
        """Stop both agents (untimed), then time: start them, wait until ready, run the command."""
        where = Where(self.name, ds.name, op)
        self.stop_agents(where)
        marks = {role: self.log(f"agent-{role}").stat().st_size for role in self.AGENTS}
        started = time.monotonic()
        self.spawn_agents()
        self.wait_ready(where, marks, timeout=60)
        ready = time.monotonic() - started
        m = self.run_cli(args, ds, op, sync_fs)
        m = dataclasses.replace(m, seconds=ready + m.seconds)
        extra = self.peaks(m)
        extra["agents_ready_seconds"] = round(ready, 6)
        return m, extra


# --------------------------------------------------------------------------
# The benchmark loop
# --------------------------------------------------------------------------


def fresh_layout(work: Path, timeout: float, settle_window: float) -> Layout:
    run = work / "run"
    discard(run)
    logs = run / "logs"
    restore_root = run / "restore"
    logs.mkdir(parents=True)
    restore_root.mkdir()
    return Layout(
        run=Path(os.path.realpath(run)),
        logs=LogDir(logs),
        restore_root=Path(os.path.realpath(restore_root)),
        timeout=timeout,
        settle_window=settle_window,
    )


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
    return (
        f"{row['tool']:>13} {row['dataset']:>7} rep {row['rep']} {row['op']:>15}: "
        f"{row['seconds']:8.3f} s, peak {mem / MiB:7.1f} MiB"
    )


def timed_backup(tool: Tool, ds: Dataset, rep: int, op: str) -> dict[str, Any]:
    row = make_row(tool, ds, rep, op, tool.backup(ds, op))
    os.sync()
    say(describe(row))
    return row


def changed_backup(tool: Tool, ds: Dataset, rep: int) -> tuple[dict[str, Any], Overlay]:
    """Change 1% of the bytes in 1% of the files, back up (timed), put the originals back."""
    changes = apply_changes(ds)
    try:
        # No wait here: a changed file is read again by every tool anyway.
        row = timed_backup(tool, ds, rep, "changed")
    finally:
        revert_changes(ds, changes)
    row["files_modified"] = len(changes)
    row["bytes_modified"] = sum(len(c.new) for c in changes)
    return row, {c.rel: (c.offset, c.new, c.new_mtime_ns) for c in changes}


RESTORED_LABEL = {"initial": "initial snapshot", "changed": "changed snapshot"}


def timed_restore(tool: Tool, ds: Dataset, rep: int, layout: Layout, changed: Overlay, op: str) -> dict[str, Any]:
    """Restore into an empty directory (timed, until synced), verify (not timed), delete it."""
    target = layout.restore_root / f"{tool.name}-{op}"
    target.mkdir()
    result, landed = tool.restore(ds, target, op)
    row = make_row(tool, ds, rep, op, result)
    os.sync()
    where = Where(tool.name, ds.name, op)
    state = tool.restored_state(op)
    row.update(verify_restore(ds, landed, changed, state == "changed", where, tool.strict_metadata))
    mirror = isinstance(tool, Rsync)
    row["restored"] = "latest (mirror)" if mirror else RESTORED_LABEL[state]
    say(describe(row) + metadata_note(row))
    discard(target)
    return row


def metadata_note(row: dict[str, Any]) -> str:
    counts = row.get("metadata_mismatches") or {}
    found = ", ".join(f"{k} {n}" for k, n in counts.items() if n)
    return f"; metadata differs: {found}" if found else ""


def run_sequence(
    tool: Tool, ds: Dataset, rep: int, work: Path, timeout: float, settle_window: float
) -> list[dict[str, Any]]:
    """initial, unchanged, changed, restore, restore-changed against a fresh repository."""
    layout = fresh_layout(work, timeout, settle_window)
    rows: list[dict[str, Any]] = []
    read_all(ds.root, ds.listing)  # warm page cache, untimed
    try:
        tool.start(ds, layout)
        ds.wait_settled()
        initial = timed_backup(tool, ds, rep, "initial")
        initial["repo_bytes"], initial["repo_disk_bytes"] = tree_bytes(tool.repo_dir())
        tool.after_initial(ds, initial)
        rows.append(initial)
        rows.append(timed_backup(tool, ds, rep, "unchanged"))
        changed_row, changed = changed_backup(tool, ds, rep)
        rows.append(changed_row)
        for op in RESTORE_FROM:
            rows.append(timed_restore(tool, ds, rep, layout, changed, op))
    finally:
        tool.stop()
    discard(layout.run)
    return rows


def rotated(items: list[str], by: int) -> list[str]:
    k = by % len(items) if items else 0
    return items[k:] + items[:k]


def run_all(
    tools: dict[str, Tool], datasets: list[Dataset], reps: int, work: Path, timeout: float, settle_window: float
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    names = list(tools)
    for rep in range(reps):
        if TRASH is not None and rep > 0:
            TRASH.empty()
        for ds in datasets:
            for name in rotated(names, rep):
                say(f"== rep {rep + 1}/{reps}, dataset {ds.name}, tool {name}")
                rows.extend(run_sequence(tools[name], ds, rep, work, timeout, settle_window))
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


def change_sizes(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per dataset, how many files and bytes the `changed` op rewrote (the same every time)."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["op"] == "changed" and r.get("files_modified") is not None:
            sizes = {"changed_files": r["files_modified"], "changed_bytes": r.get("bytes_modified")}
            out.setdefault(r["dataset"], sizes)
    return out


def metadata(
    args: argparse.Namespace,
    tools: dict[str, Tool],
    datasets: list[Dataset],
    work: Path,
    reps: int,
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    flotilla = [t for name, t in tools.items() if name in FLOTILLA_TOOLS]
    resets_ok = all(getattr(t, "peak_reset_ok", True) for t in flotilla)
    changes = change_sizes(rows)
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
            "euid": os.geteuid(),
        },
        "tool_versions": {name: tool.version() for name, tool in tools.items()},
        "nats_server_version": first_line_of([str(args.nats_server), "--version"]) if flotilla else None,
        "tool_settings": {
            "flotilla": "one source agent and one storage agent on loopback (QUIC), nats-server with JetStream; "
            "defaults (compression and encryption always on); agents started once per sequence (warm)",
            "flotilla-cold": "as flotilla, but both agents are stopped before every op and the time runs from "
            "starting them again (until both are online) to the end of the command",
            "restic": "repository version 2, compression auto (the default); the empty repository is made "
            "once per run with `restic init` and copied for each sequence (init's key calibration takes ~3 s)",
            "borg": "repokey-blake2, compression lz4 (the default); create --json (implies --stats)",
            "rsync": f"rsync {Rsync.FLAGS} to a plain directory: no dedup, no encryption, no compression",
        },
        "datasets": {
            ds.name: {
                "path": str(ds.root),
                "params": ds.spec.params,
                "key": ds.spec.key(),
                **ds.stats,
                **changes.get(ds.name, {}),
            }
            for ds in datasets
        },
        "reps": reps,
        "quick": args.quick,
        "interleaving": "for rep: for dataset: tools in an order rotated by rep, each with a fresh repository",
        "timing": "time.monotonic() around the operation's external command only; restores also include "
        "`sync -f TARGET` (syncfs of the restore target's filesystem) right after the command; flotilla-cold "
        "also includes starting both agents and waiting until they are online",
        "cache": "warm page cache for everyone: the dataset is read once before each tool's sequence; "
        "caches are never dropped; sync after every operation (untimed)",
        "racily_clean_wait": f"{RACY_WAIT} s between the last dataset change and the next backup",
        "changed_op": f"{CHANGE_FRACTION:.0%} of the non-empty regular files (at least 1) get new bytes totalling "
        f"{CHANGE_FRACTION:.0%} of the dataset's regular-file bytes (one contiguous region per file, its share "
        "capped at its size, at a seeded offset); reverted (bytes, atime, mtime) afterwards",
        "restore": "`restore` restores the initial snapshot, `restore-changed` the changed one (flotilla, "
        "restic, borg); rsync copies its mirror back both times, which holds the latest (changed) state",
        "restore_verification": "every restored entry: path, type, size, symlink target (any difference aborts "
        f"the run); {VERIFY_SAMPLE} seeded files, every changed file and every file of `large` byte for byte "
        "(aborts); mode bits, mtime in ns (files and directories), uid, gid and xattrs (files and directories) "
        "against the dataset, with the changed bytes and mtimes for a changed state: a difference aborts the run "
        "for flotilla, for the peers it is counted (metadata_mismatches)",
        "xattrs": f"{XATTR_NAME} on ~1% of the regular files (at most {XATTR_MAX_FILES}) and {XATTR_DIRS} "
        "directories, seeded values (set after generation; xattr_entries per dataset, 0 if the filesystem refused)",
        "memory": "peak_rss_bytes: ru_maxrss from os.wait4 of the one-shot command, forked by a bare launcher "
        "interpreter so that it does not inherit this script's RSS (values at or below rss_floor_bytes mean "
        "'at most that'; flotilla: the CLI, also in cli_peak_rss_bytes); flotilla agents: VmHWM after writing 5 "
        "to /proc/PID/clear_refs before each op (flotilla-cold: VmHWM of the freshly started agents)"
        + ("" if resets_ok else " (WARNING: clear_refs failed; agent peaks are since agent start)"),
        "settle": f"after flotilla's initial backup, both agents' VmRSS polled every second for up to "
        f"{args.settle_window:.0f} s (stops once both are under {SETTLE_RSS // MiB} MiB): "
        "*_settle_seconds (first time under, None if never) and *_settled_rss_bytes (at the last poll)",
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
    """One entry per (dataset, op, tool): medians, ranges and ratios to the peers.

    Every entry has the same keys (summary.csv takes its columns from the first).
    """
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["op"], r["tool"]), []).append(r)
    out = []
    for ds in datasets:
        initial = {t: median_of(groups.get((ds, "initial", t), []), "seconds") for t in tools}
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
                    "median_sync_s": median_of(g, "sync_seconds"),
                    "median_agents_ready_s": median_of(g, "agents_ready_seconds"),
                    "median_peak_rss_bytes": median_of(g, "peak_rss_bytes"),
                    "median_cli_peak_rss_bytes": median_of(g, "cli_peak_rss_bytes"),
                    "median_source_agent_peak_rss_bytes": median_of(g, "source_agent_peak_rss_bytes"),
                    "max_source_agent_peak_rss_bytes": max_of(g, "source_agent_peak_rss_bytes"),
                    "median_storage_agent_peak_rss_bytes": median_of(g, "storage_agent_peak_rss_bytes"),
                    "max_storage_agent_peak_rss_bytes": max_of(g, "storage_agent_peak_rss_bytes"),
                    "median_repo_bytes": repo[tool],
                }
                for peer in PEERS:
                    own = peer == tool
                    entry[f"ratio_to_{peer}"] = None if own else ratio(medians[tool], medians.get(peer))
                cold = tool == "flotilla-cold"
                entry["ratio_to_flotilla"] = ratio(medians[tool], medians.get("flotilla")) if cold else None
                entry["ratio_to_own_initial"] = ratio(medians[tool], initial.get(tool)) if op in RESTORE_FROM else None
                for peer in PEERS:
                    own = peer == tool
                    entry[f"repo_ratio_to_{peer}"] = None if own else ratio(repo[tool], repo.get(peer))
                for agent in ("source_agent", "storage_agent"):
                    settled = [r for r in g if f"{agent}_settled_rss_bytes" in r]
                    entry[f"median_{agent}_settled_rss_bytes"] = median_of(settled, f"{agent}_settled_rss_bytes")
                    entry[f"median_{agent}_settle_s"] = median_of(settled, f"{agent}_settle_seconds")
                    entry[f"{agent}_settled_reps"] = (
                        sum(1 for r in settled if r.get(f"{agent}_settle_seconds") is not None) if settled else None
                    )
                checked = [r["metadata_mismatches"] for r in g if r.get("metadata_mismatches") is not None]
                worst = {k: max(c.get(k, 0) for c in checked) for k in METADATA_KINDS} if checked else {}
                entry["metadata_mismatches"] = sum(worst.values()) if checked else None
                kinds = ", ".join(f"{k} {n}" for k, n in worst.items() if n)
                entry["metadata_mismatch_kinds"] = (kinds or "none") if checked else None
                out.append(entry)
    return out


def max_of(rows: list[dict[str, Any]], key: str) -> Optional[float]:
    values = [r[key] for r in rows if r.get(key) is not None]
    return max(values) if values else None


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
        if t in FLOTILLA_TOOLS:
            cols += [
                (f"{t} source agent", t, "median_source_agent_peak_rss_bytes"),
                (f"{t} storage agent", t, "median_storage_agent_peak_rss_bytes"),
                (f"{t} CLI", t, "median_cli_peak_rss_bytes"),
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


def settle_table(summary: list[dict[str, Any]], datasets: list[str]) -> list[str]:
    under = f"under {SETTLE_RSS // MiB} MiB after (s)"
    lines = [
        f"| dataset | source agent RSS (MiB) | {under} | storage agent RSS (MiB) | {under} |",
        "|---|---|---|---|---|",
    ]
    for ds in datasets:
        e = lookup(summary, ds, "initial", "flotilla")
        if e is None or e["source_agent_settled_reps"] is None:
            continue
        cells = []
        for agent in ("source_agent", "storage_agent"):
            cells.append(fmt_mib(e[f"median_{agent}_settled_rss_bytes"]))
            reached = f"{e[f'{agent}_settled_reps']}/{e['n']} reps"
            after = e[f"median_{agent}_settle_s"]
            cells.append(f"{after:.0f} ({reached})" if after is not None else f"never ({reached})")
        lines.append(f"| {ds} | " + " | ".join(cells) + " |")
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
    ours = [t for t in FLOTILLA_TOOLS if t in tools]
    if not ours or not peers:
        return ["(needs flotilla or flotilla-cold and at least one peer)", ""]
    cold = "flotilla-cold" in ours and "flotilla" in ours
    header = [f"vs {p}" for p in peers] + (["cold ÷ warm"] if cold else [])
    lines: list[str] = []
    for ds in datasets:
        lines += [f"**{ds}** (Flotilla median / peer median; below 1 means Flotilla is faster or smaller)", ""]
        lines += ["| | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
        for op in OPS:
            for t in ours:
                e = lookup(summary, ds, op, t)
                cells = [fmt_ratio(None if e is None else e[f"ratio_to_{p}"]) for p in peers]
                if cold:
                    cells.append(fmt_ratio(None if e is None else e["ratio_to_flotilla"]))
                label = f"{op} time" + (", cold (informational)" if t == "flotilla-cold" else "")
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        e = lookup(summary, ds, "initial", ours[0])
        cells = [fmt_ratio(None if e is None else e[f"repo_ratio_to_{p}"]) for p in peers]
        lines.append("| repository size | " + " | ".join(cells + ([""] if cold else [])) + " |")
        lines.append("")
    return lines


def metadata_table(
    summary: list[dict[str, Any]], rows: list[dict[str, Any]], tools: list[str], datasets: list[str]
) -> list[str]:
    """Restore metadata differences per (dataset, restore op, tool): worst repetition, one sample."""
    lines = ["| dataset | op | tool | differences (worst rep) | sample |", "|---|---|---|---|---|"]
    for ds in datasets:
        for op in RESTORE_FROM:
            for t in tools:
                e = lookup(summary, ds, op, t)
                if e is None or e["metadata_mismatch_kinds"] is None:
                    continue
                sample = next(
                    (
                        r["metadata_mismatch_samples"][0]
                        for r in rows
                        if (r["dataset"], r["op"], r["tool"]) == (ds, op, t) and r.get("metadata_mismatch_samples")
                    ),
                    "",
                )
                sample = sample.replace("|", "\\|")
                lines.append(f"| {ds} | {op} | {t} | {e['metadata_mismatch_kinds']} | {sample} |")
    return lines


def verdict(value: Optional[float], limit: float, unit: str, strict: bool = False) -> tuple[str, str]:
    """(value text, PASS/MISS with the margin) for value ≤ limit (strict: value < limit)."""
    if value is None:
        return "–", "n/a"
    shown = f"{value:.2f}×" if unit == "×" else f"{value:.1f} {unit}"
    margin = value / limit - 1
    if value < limit or (value == limit and not strict):
        return shown, f"PASS ({-margin:.0%} under the limit)"
    return shown, f"MISS ({margin:.0%} over the limit)"


def peak_limit(ds: str) -> int:
    return AGENT_PEAK_LIMIT_MILLION if ds == "million" else AGENT_PEAK_LIMIT


def targets_table(summary: list[dict[str, Any]], datasets: list[str], settle_window: float) -> list[str]:
    """Issue 12's targets for the warm agents (the agents' memory: warm and cold)."""
    lines = ["| target | dataset | Flotilla | verdict |", "|---|---|---|---|"]
    time_targets = (("initial", 0.70), ("unchanged", 0.50), ("restore", 0.70), ("restore-changed", 0.70))
    for ds in datasets:
        for op, limit in time_targets:
            e = lookup(summary, ds, op, "flotilla")
            shown, v = verdict(None if e is None else e["ratio_to_restic"], limit, "×")
            lines.append(f"| {op} ≤ {limit:.2f}× restic | {ds} | {shown} | {v} |")
        e = lookup(summary, ds, "restore", "flotilla")
        shown, v = verdict(None if e is None else e["ratio_to_own_initial"], 1.0, "×")
        lines.append(f"| restore ≤ 1.00× Flotilla's own initial backup | {ds} | {shown} | {v} |")
        e = lookup(summary, ds, "initial", "flotilla")
        shown, v = verdict(None if e is None else e["repo_ratio_to_restic"], 1.05, "×")
        lines.append(f"| repository size ≤ 1.05× restic | {ds} | {shown} | {v} |")
        limit = peak_limit(ds)
        for agent, label in (("source_agent", "source agent"), ("storage_agent", "storage agent")):
            worst: Optional[tuple[float, str, str, Optional[float]]] = None
            for t in FLOTILLA_TOOLS:
                for op in OPS:
                    e = lookup(summary, ds, op, t)
                    value = None if e is None else e[f"median_{agent}_peak_rss_bytes"]
                    if value is not None and (worst is None or value > worst[0]):
                        worst = (value, op, t, e[f"max_{agent}_peak_rss_bytes"])
            if worst is None:
                shown, v, where = "–", "n/a", ""
            else:
                shown, v = verdict(worst[0] / MiB, limit / MiB, "MiB")
                seen = f", max {worst[3] / MiB:.1f}" if worst[3] is not None else ""
                where = f" ({worst[2]} {worst[1]}{seen})"
            lines.append(f"| {label} peak RSS in any op ≤ {limit // MiB} MiB | {ds} | {shown}{where} | {v} |")
        e = lookup(summary, ds, "initial", "flotilla")
        for agent, label in (("source_agent", "source agent"), ("storage_agent", "storage agent")):
            if e is None or e[f"{agent}_settled_reps"] is None:
                continue
            value = e[f"median_{agent}_settled_rss_bytes"]
            shown, v = verdict(None if value is None else value / MiB, SETTLE_RSS / MiB, "MiB", strict=True)
            after = e[f"median_{agent}_settle_s"]
            reached = "never under" if after is None else f"under after {after:.0f} s"
            lines.append(
                f"| {label} RSS < {SETTLE_RSS // MiB} MiB within {settle_window:.0f} s after the initial backup | {ds} "
                f"| {shown} ({reached}; {e[f'{agent}_settled_reps']}/{e['n']} reps) | {v} |"
            )
    return lines


def render_report(
    meta: dict[str, Any],
    summary: list[dict[str, Any]],
    tools: list[str],
    datasets: list[str],
    rows: list[dict[str, Any]],
) -> str:
    host = meta["host"]
    ds_lines = []
    for name, d in meta["datasets"].items():
        line = (
            f"- `{name}`: {d['files']} files, {d['symlinks']} symlinks, {d['bytes'] / MiB:.1f} MiB; "
            f"{XATTR_NAME} on {d.get('xattr_entries', 0)} entries"
        )
        if d.get("changed_files") is not None:
            line += f"; `changed` rewrites {d['changed_bytes'] / MiB:.2f} MiB in {d['changed_files']} files"
        ds_lines.append(line)
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
        f"Warm page cache; interleaved ({meta['interleaving']}). Restore: {meta['restore']}; verified "
        "(structure and sampled content for everyone, metadata: see below). Restores are timed until "
        "`sync -f` of the target returned, for every tool. `flotilla-cold` restarts both agents for every op; "
        "its times include their start.",
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
        "## Flotilla's agents after the initial backup (VmRSS, median)",
        "",
        *settle_table(summary, datasets),
        "",
        "## Repository size after the initial backup in MiB (apparent size)",
        "",
        *repo_table(summary, tools, datasets),
        "",
        "## Restore metadata check",
        "",
        "Mode bits, mtime (ns), uid, gid and xattrs of every restored file and directory (symlinks: owner and "
        "target) against the dataset. A difference fails the run for Flotilla; for the peers it is counted here.",
        "",
        *metadata_table(summary, rows, tools, datasets),
        "",
        "## Flotilla's ratios",
        "",
        *ratio_tables(summary, tools, datasets),
        "## Targets (issue 12)",
        "",
        *targets_table(summary, datasets, meta.get("settle_window_seconds") or SETTLE_WINDOW),
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Chart (hand-written SVG)
# --------------------------------------------------------------------------

COLORS = {"flotilla": "#1f77b4", "flotilla-cold": "#9ecae1", "restic": "#ff7f0e", "borg": "#2ca02c", "rsync": "#7f7f7f"}
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


# The smoke run (CI) keeps its time down: many small files and real files
# with symlinks cover every path the harness has; `large` adds none.
QUICK_DATASETS = ("small", "usr")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flotilla", type=Path, help="the flotilla CLI binary")
    p.add_argument("--agent", type=Path, help="the flotilla-agent binary")
    p.add_argument("--nats-server", type=Path, help="the nats-server binary")
    p.add_argument("--work", type=Path, required=True, help="datasets (kept) and run directory")
    p.add_argument("--results", type=Path, required=True, help="where to write the results")
    p.add_argument("--quick", action="store_true", help="tiny datasets, 1 repetition unless --reps: a smoke run")
    p.add_argument("--reps", type=int, default=None, help="repetitions [3; quick: 1]")
    p.add_argument(
        "--datasets",
        default=None,
        help=f"comma-separated: {','.join(ALL_DATASETS + EXTRA_DATASETS)} [{','.join(ALL_DATASETS)}; "
        f"quick: {','.join(QUICK_DATASETS)}]; million (1,000,000 files) takes minutes to create",
    )
    p.add_argument("--tools", default=",".join(ALL_TOOLS), help=f"comma-separated: {','.join(ALL_TOOLS)}")
    args = p.parse_args(argv)
    args.tool_list = split_choice(p, args.tools, ALL_TOOLS, "--tools")
    if args.datasets is None:
        args.datasets = ",".join(QUICK_DATASETS if args.quick else ALL_DATASETS)
    args.dataset_list = split_choice(p, args.datasets, ALL_DATASETS + EXTRA_DATASETS, "--datasets")
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    if args.reps < 1:
        p.error("--reps must be at least 1")
    args.settle_window = SETTLE_WINDOW_QUICK if args.quick else SETTLE_WINDOW
    if any(t in FLOTILLA_TOOLS for t in args.tool_list):
        for flag in ("flotilla", "agent", "nats_server"):
            value = getattr(args, flag)
            if value is None:
                p.error(f"--{flag.replace('_', '-')} is required when benchmarking flotilla")
            if not (value.is_file() and os.access(value, os.X_OK)):
                p.error(f"--{flag.replace('_', '-')} {value}: not an executable file")
    for tool in args.tool_list:
        if tool not in FLOTILLA_TOOLS and shutil.which(tool) is None:
            p.error(f"{tool} is not installed (not on PATH)")
    if not sync_has_file_system():
        p.error("restores are timed until `sync -f TARGET` returns: needs a `sync` with -f (coreutils ≥ 8.24)")
    return args


def sync_has_file_system() -> bool:
    """Whether this host's `sync` has -f/--file-system (syncfs of a path's filesystem)."""
    try:
        r = subprocess.run(["sync", "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    text = r.stdout + r.stderr
    return "--file-system" in text or "filesystems underlying" in text  # coreutils, busybox


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
        elif name == "flotilla-cold":
            tools[name] = ColdFlotilla(args.flotilla.resolve(), args.agent.resolve(), args.nats_server.resolve())
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
    peers = ", ".join(t for t in tools if t not in FLOTILLA_TOOLS)
    title = f"Flotilla vs {peers} — {meta['date']}" + (" (quick)" if meta["quick"] else "")
    (results / "chart.svg").write_text(render_time_chart(summary, tools, datasets, title))
    (results / "repo.svg").write_text(render_repo_chart(summary, tools, datasets, title))
    report = render_report(meta, summary, tools, datasets, rows)
    (results / "report.md").write_text(report)
    return report


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    atexit.register(terminate_all)
    signal.signal(signal.SIGTERM, exit_on_signal)
    signal.signal(signal.SIGHUP, exit_on_signal)
    args.work.mkdir(parents=True, exist_ok=True)
    work = Path(os.path.realpath(args.work))
    # A command that runs longer is killed; a million files take restic and borg a while.
    timeout = 300.0 if args.quick else (7200.0 if "million" in args.dataset_list else 1800.0)
    started = time.monotonic()
    try:
        datasets = [prepare_dataset(work, dataset_spec(name, args.quick)) for name in args.dataset_list]
        tools = make_tools(args, work)
        probe = work / "probe"
        remove_tree(probe)
        probe.mkdir()
        floor = rss_floor(LogDir(probe))
        global TRASH
        TRASH = Trash(work, args.quick)
        rows = run_all(tools, datasets, args.reps, work, timeout, args.settle_window)
        TRASH.empty(wait=False)  # nothing is timed after this
        meta = metadata(args, tools, datasets, work, args.reps, rows)
        meta["rss_floor_bytes"] = floor
        meta["settle_window_seconds"] = args.settle_window
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
