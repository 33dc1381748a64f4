"""One run per output directory: an exclusive lock, taken before the run touches anything.

Two ``python -m sft_jax.train`` commands on one ``run.output_dir`` (a resubmitted job while
the old one still runs, a SLURM array with a fixed path) would interleave their metrics and
break each other's orbax saves. So the first one holds the directory and the second refuses
with one line naming the holder (host, pid, start time).

- Local or shared filesystem: ``flock`` on ``OUTPUT_DIR/run.lock``. The kernel drops the lock
  when the holding process dies, however it dies, so a crash (even ``kill -9``) never leaves
  a stale lock that blocks the rerun; the file itself only says who holds it.
- Object stores (``gs://``) have no locks: ``OUTPUT_DIR/run.lease`` is a small JSON object
  {host, pid, started, expires} that the holder rewrites every ``ttl / 3`` seconds from a
  daemon thread. A newcomer respects a lease that has not expired; one whose holder died
  expires after ``ttl`` and is taken over. Two newcomers racing for a free lease both write
  and read back after a short pause; the last writer wins and the other refuses (object
  stores make the last write visible to every reader, so exactly one reads itself back).

Only process 0 takes the lock: every process of one multi-host job shares the directory.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from sft_jax.runtime.paths import LOCK_NAME, as_path, is_remote
from sft_jax.config import ConfigError

LEASE_NAME = "run.lease"
LEASE_TTL_S = 120.0


class RunLockedError(ConfigError):
    """Another live process holds the run directory (a user error: exit 2, one line)."""


def _holder() -> dict:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": now,
            "started_utc": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")}


def _describe(holder: dict) -> str:
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"started {holder.get('started_utc', '?')}")


def _refusal(directory, holder: dict) -> RunLockedError:
    return RunLockedError(f"run directory {directory} is in use by another run ({_describe(holder)}); "
                          f"wait for it to finish, stop it, or choose another run.output_dir")


class DirectoryLock:
    """``flock`` on ``directory/run.lock``; see the module docstring."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None
        self._created_dir = False

    def acquire(self) -> None:
        import fcntl

        self._created_dir = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except ValueError:  # the holder is between truncate and write
                holder = {}
            os.close(fd)
            raise _refusal(self.directory, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode() + b"\n", 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock; a directory this lock created and that holds nothing else goes too
        (a run refused by a config mistake leaves no trace)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if self._created_dir and [p.name for p in self.directory.iterdir()] == [LOCK_NAME]:
            self.path.unlink()
            self.directory.rmdir()
        os.close(fd)  # closing the last descriptor releases the flock


class Lease:
    """A renewed lease object ``directory/run.lease`` (any ``etils.epath`` or ``pathlib`` path)."""

    def __init__(self, directory, ttl_s: float = LEASE_TTL_S, settle_s: float = 1.0, clock=time.time):
        self.directory = directory
        self.path = directory / LEASE_NAME
        self.ttl_s, self.settle_s, self.clock = ttl_s, settle_s, clock
        self.me = {**_holder(), "token": os.urandom(8).hex()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> dict | None:
        """The current lease, or None if there is none (or it is unreadable: a torn write)."""
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _write(self) -> None:
        self.path.write_text(json.dumps({**self.me, "expires": self.clock() + self.ttl_s}))

    def acquire(self) -> None:
        current = self.read()
        if current is not None and current.get("token") != self.me["token"] and current.get("expires", 0) > self.clock():
            raise _refusal(self.directory, current)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write()
        time.sleep(self.settle_s)  # a racing newcomer's write lands in this window; the last write wins
        current = self.read()
        if current is None or current.get("token") != self.me["token"]:
            raise _refusal(self.directory, current or {})
        self._thread = threading.Thread(target=self._renew, daemon=True, name="sft_jax-lease")
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self._write()
            except OSError as e:  # a transient store error: say so, and try again at the next renewal
                print(f"sft_jax: could not renew the lease {self.path}: {e}", file=sys.stderr, flush=True)

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        current = self.read()
        if current is not None and current.get("token") == self.me["token"]:
            self.path.unlink()


@contextlib.contextmanager
def hold(output_dir: str, local_dir, *, enabled: bool = True):
    """Hold ``output_dir`` for the duration of the block (raises ``RunLockedError`` at once if
    another live run holds it). ``local_dir`` is where the run writes its logs: the output
    directory itself, or the staging directory of a ``gs://`` one (locked as well)."""
    if not enabled:
        yield
        return
    locks = [DirectoryLock(local_dir)]
    if is_remote(output_dir):
        locks.append(Lease(as_path(output_dir)))
    held = []
    try:
        for lock in locks:
            lock.acquire()
            held.append(lock)
        yield
    finally:
        for lock in reversed(held):
            lock.release()
