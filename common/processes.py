"""Supervising a long-running child process (``flower-superlink`` or ``flower-supernode``) in the foreground.

The child runs in a session and process group of its own, with its output copied to a log file and to the
terminal; SIGINT and SIGTERM are forwarded to that group (a second one, or ``STOP_GRACE_S`` without exit, stops it
hard), and on exit every process started under it is stopped, including those started in sessions of their own
(found through ``/proc``: descendants, and the sessions and groups they lead). If this process is killed outright,
the kernel sends SIGTERM to the child (``PR_SET_PDEATHSIG``, Linux), which then stops its own children.

Used by both sides of a deployment (``server/deployment/superlink.py``, ``client/supernode.py``); imports only
``common.deployment`` (for its error type).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import fcntl
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

from common.deployment import DeploymentRunError

STOP_GRACE_S = 15.0
TAIL_LINES = 25
LOCK_FILE = ".lock"
_PR_SET_PDEATHSIG = 1


class ChildProcess:
    """One Flower process in a session and process group of its own, its output copied to a log file (and the
    terminal), stopped together with every process started under it."""

    def __init__(self, name: str, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, log_path: Path,
                 echo: bool, on_line: Callable[[str], None] | None = None) -> None:
        self.name = name
        self.stopped_by_signal = False  # set by run_in_foreground: stopped because this process got a signal
        self._lines: collections.deque[str] = collections.deque(maxlen=200)
        self.echo, self._on_line = echo, on_line
        self._known: dict[int, int] = {}  # pid -> start time of every process seen under the child
        self._log = open(log_path, "ab", buffering=0)  # noqa: SIM115 (closed in stop)
        self._log.write(f"\n===== {now()} {shlex.join(argv)}\n".encode())
        self.proc = subprocess.Popen(list(argv), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        self._pump = threading.Thread(target=self._copy_output, name=f"{name} output", daemon=True)
        self._pump.start()

    def __enter__(self) -> ChildProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _copy_output(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            with contextlib.suppress(OSError, ValueError):
                self._log.write(raw)
            text = raw.decode("utf-8", errors="replace")
            self._lines.append(text.rstrip("\n"))
            if self.echo:
                with contextlib.suppress(OSError, ValueError):
                    sys.stdout.write(text)
                    sys.stdout.flush()
            if self._on_line is not None:
                with contextlib.suppress(Exception):
                    self._on_line(text)

    def poll(self) -> int | None:
        return self.proc.poll()

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the child's process group."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)

    def tail(self, lines: int = TAIL_LINES) -> str:
        time.sleep(0.2)  # let the output thread copy the last lines
        return "\n".join(list(self._lines)[-lines:])

    def track(self) -> list[int]:
        """The live processes started under the child, remembered across calls.

        A process is the child's when it descends from it, or shares its session or process group or that of
        one seen before: Flower starts its SuperExec in a new session (so a signal to the group misses it), and
        such a process stays findable through its session after its parent exits and it is re-parented."""
        table = process_table()
        known = {pid for pid, start in self._known.items() if table.get(pid, (0, 0, 0, -1, ""))[3] == start}
        roots = {self.proc.pid} | known
        ours = set(known)
        changed = True
        while changed:
            changed = False
            for pid, (ppid, pgrp, sid, _start, _state) in table.items():
                if pid not in ours and pid != os.getpid() and (ppid in ours | roots or pgrp in roots or sid in roots):
                    ours.add(pid)
                    roots.add(pid)
                    changed = True
        self._known = {pid: table[pid][3] for pid in ours}
        return [pid for pid in ours if table[pid][4] != "Z"]

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM to the group, SIGKILL after ``grace`` seconds; then every process left under the child."""
        self.track()
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait()
        for signum, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            left = self.track()
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signum)
            deadline = time.monotonic() + wait
            while left and time.monotonic() < deadline:
                time.sleep(0.1)
                left = self.track()
            if not left:
                break
        self._pump.join(timeout=5)
        with contextlib.suppress(OSError):
            self._log.close()


def run_in_foreground(child: ChildProcess, on_hup: Callable[[], None] | None = None,
                      grace: float = STOP_GRACE_S, companions: Sequence[ChildProcess] = ()) -> int:
    """Wait for ``child`` to exit or for SIGINT/SIGTERM (forwarded to its group); a second signal or ``grace``
    seconds without exit hard-stop it. SIGHUP calls ``on_hup``. Returns 0 after a stop by signal.

    ``companions`` are processes the child cannot work without (a site's task launcher): signals reach them too,
    and when one exits on its own, the child is stopped and that companion's status is returned."""
    received: list[int] = []
    hup = threading.Event()

    def handler(signum, _frame) -> None:
        if signum == signal.SIGHUP:
            hup.set()
            return
        if not received:
            child.signal(signum)
            for companion in companions:
                companion.signal(signum)
        received.append(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        deadline, tracked = math.inf, 0.0
        while child.poll() is None:
            gone = next((c for c in companions if c.poll() is not None), None)
            if gone is not None and not received:
                say(f"{gone.name} exited with status {gone.proc.returncode}; stopping {child.name}" +
                    ("." if gone.echo else f"; its last lines:\n{gone.tail()}"))
                child.stop()
                code = gone.proc.returncode
                return (128 - code if code < 0 else code) or 1
            if time.monotonic() - tracked > 1.0:  # remember what runs under the child while its tree is intact
                child.track()
                tracked = time.monotonic()
            if received:
                deadline = min(deadline, time.monotonic() + grace)
                if len(received) > 1 or time.monotonic() > deadline:
                    break
            if hup.is_set():
                hup.clear()
                if on_hup is not None:
                    on_hup()
            time.sleep(0.2)
    finally:
        child.stop(grace=1.0 if received else STOP_GRACE_S)
        for signum, old in previous.items():
            signal.signal(signum, old)
    child.stopped_by_signal = bool(received)
    if received:
        say(f"stopped {child.name} ({signal.Signals(received[0]).name})")
        return 0
    code = child.proc.returncode
    code = 128 - code if code < 0 else code  # killed by a signal: the shell's convention
    if code:
        say(f"{child.name} exited with status {code}" +
             ("." if child.echo else f"; its last lines:\n{child.tail()}"))
    return code


def wait_until(ready: Callable[[], bool], child: ChildProcess, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if child.poll() is not None:
            raise DeploymentRunError(f"{child.name} exited with status {child.proc.returncode} while starting; its "
                                     f"last lines:\n{child.tail()}")
        if time.monotonic() > deadline:
            raise DeploymentRunError(f"{what}; its last lines:\n{child.tail()}")
        time.sleep(0.5)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def process_table() -> dict[int, tuple[int, int, int, int, str]]:
    """pid -> (parent pid, process group, session, start time, state) from /proc (empty where there is none)."""
    table = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            table[int(entry.name)] = (int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]),
                                      fields[0].decode())
    return table


@contextlib.contextmanager
def exclusive(state: Path, what: str):
    """One command per state folder (two SuperLinks on one database, or two SuperNodes on one ledger, would
    corrupt it)."""
    fd = os.open(state / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DeploymentRunError(f"Another {what} is already running with the state folder {state}; stop it "
                                     "first or pass another --state.") from None
        yield
    finally:
        os.close(fd)


def say(message: str) -> None:
    print(f"facefl: {message}", flush=True)


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
