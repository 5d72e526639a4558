"""Append-only, hash-chained audit logs for a multi-site deployment.

The server and every site keep their own log: one JSON object per line, written by :meth:`AuditLog.append` and
checked by :func:`verify_log` (``facefl audit verify FILE``). Each line holds::

    {"seq": 0, "time": "2025-01-01T00:00:00.000000+00:00", "actor": "site:hospital-a",
     "event": "run-started", "data": {...}, "prev": "<hash of the previous line>", "hash": "<hash of this line>"}

``hash`` is the SHA-256 of the canonical JSON (:func:`canonical_json`) of the six other fields, and ``prev`` is the
``hash`` of the line before (:data:`GENESIS` for the first line), so every line commits to everything before it.

What the chain detects
    A value edited in place (the line's hash no longer recomputes, or, if the editor recomputed it, the next
    line's ``prev`` no longer matches); a line deleted, inserted or moved in the middle (``seq`` and ``prev``
    break at that line); a line that is not in canonical form (the file was rewritten by something other than
    this module); a partial last line (a crash during a write, or a cut in the middle of a line).

What it does not detect
    * **Truncation of the tail.** Deleting the last entries leaves a shorter chain that is still valid. It is
      only detectable against a head hash kept somewhere else: the server records each site's head hash (from
      :meth:`AuditLog.tail`) in its own log every round, and :func:`verify_log` with ``expected_head`` checks
      that this hash is still in the chain.
    * **A rewrite of the whole file.** The hashes are not keyed: anyone who can write the file can recompute
      the whole chain from any point on. The chain makes tampering evident only relative to a head anchored
      elsewhere (another actor's log, a printed report, a write-once store); anchor heads often.
    * **Forged entries appended by someone with write access.** A correctly chained line appended by hand is
      indistinguishable from one appended by this module. File permissions (new logs are created 0600) are the
      protection here, not the chain.

Concurrency: :meth:`AuditLog.append` takes an exclusive ``flock`` on the file, so several threads and processes
can append to one log. ``flock`` is advisory and unreliable on some network file systems; keep logs on a local
disk. Entries hold metadata only (counts, parameters, hashes); each line is capped at :data:`MAX_ENTRY_BYTES`
so that images or model weights cannot end up in a log.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
MAX_ENTRY_BYTES = 64 * 1024  # one line, newline included
MAX_PROBLEMS = 50  # problems listed in a VerifyReport; further ones are counted

_FIELDS = ("seq", "time", "actor", "event", "data", "prev")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_DEPTH = 32
_READ_CHUNK = 8192
_VERIFY_HINT = "run `facefl audit verify` on it and keep the file unchanged for investigation"


class AuditError(ValueError):
    """An audit log is unreadable or invalid, an entry cannot be written, or a verification failed."""


class _AlteredEntry(AuditError):
    """A well-formed line whose hash does not recompute or that is not canonical; ``entry`` is what it claims."""

    def __init__(self, message: str, entry: AuditEntry) -> None:
        super().__init__(message)
        self.entry = entry


@dataclass(frozen=True)
class AuditEntry:
    """One line of an audit log.

    Attributes
    ----------
    seq : int
        Position in the log, from 0, without gaps.
    time : str
        UTC time of the append, ISO-8601 with microseconds (``2025-01-01T12:00:00.000000+00:00``).
    actor : str
        Who wrote it: ``"server"`` or ``"site:<name>"``.
    event : str
        What happened (``"run-started"``, ``"round-results"``, ...).
    data : dict
        The event's details, JSON values only.
    prev : str
        ``hash`` of the previous entry, :data:`GENESIS` for the first.
    hash : str
        SHA-256 (hex) of the canonical JSON of the six fields above.
    """

    seq: int
    time: str
    actor: str
    event: str
    data: dict
    prev: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "time": self.time, "actor": self.actor, "event": self.event,
                "data": self.data, "prev": self.prev, "hash": self.hash}


def canonical_json(obj: Any) -> str:
    """The one serialisation used for hashing and for the lines of the log (sorted keys, no spaces, no NaN)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def entry_hash(entry_without_hash: dict) -> str:
    """SHA-256 (hex) of the canonical JSON of an entry's fields; a ``"hash"`` key, if present, is left out."""
    body = {key: value for key, value in entry_without_hash.items() if key != "hash"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


class AuditLog:
    """An append-only audit log file written by one actor.

    Parameters
    ----------
    path : str or Path
        The JSON-lines file. It and its folder are created on the first append; a new file gets mode 0600.
        Several :class:`AuditLog` objects, threads and processes may append to the same file.
    actor : str
        Written into every entry: ``"server"`` or ``"site:<name>"``.
    """

    def __init__(self, path: str | Path, *, actor: str) -> None:
        if not isinstance(actor, str) or not actor.strip() or "\n" in actor:
            raise ValueError(f"The actor should be a non-empty single-line string such as 'server', got {actor!r}.")
        self.path = Path(path)
        self.actor = actor

    def __repr__(self) -> str:
        return f"AuditLog({str(self.path)!r}, actor={self.actor!r})"

    def append(self, event: str, /, **data: Any) -> AuditEntry:
        """Append one entry and return it, once it is on disk (written with one ``write`` and fsynced).

        ``data`` is converted to JSON values first: NaN and infinities become null, numpy scalars and
        one-element tensors become Python numbers, paths become strings, tuples become lists.

        Raises
        ------
        TypeError
            A value of ``data`` is not JSON-serialisable (the message names its key).
        AuditError
            The entry is larger than :data:`MAX_ENTRY_BYTES`, or the last line of the existing file is damaged
            (partial, unparsable or altered). Nothing is written then, and existing bytes are never changed.
        """
        if not isinstance(event, str) or not event.strip() or "\n" in event:
            raise ValueError(f"The event should be a non-empty single-line string, got {event!r}.")
        clean = {key: _jsonable(value, f"data[{key!r}]", 0) for key, value in data.items()}
        # Check the size before touching the file (exact for seq 0; checked again once seq is known).
        draft = {"seq": 0, "time": _now(), "actor": self.actor, "event": event, "data": clean,
                 "prev": GENESIS, "hash": GENESIS}
        _check_size((canonical_json(draft) + "\n").encode("utf-8"), event)

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, created = _open_for_append(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                size = os.fstat(fd).st_size
                last = _read_last_entry(fd, size, self.path)
                body = {"seq": 0 if last is None else last.seq + 1, "time": _now(), "actor": self.actor,
                        "event": event, "data": clean, "prev": GENESIS if last is None else last.hash}
                entry = AuditEntry(**body, hash=entry_hash(body))
                line = (canonical_json(entry.to_dict()) + "\n").encode("utf-8")
                _check_size(line, event)
                _write_line(fd, line, size, self.path)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.path.parent)
        return entry

    def tail(self) -> AuditEntry | None:
        """The last entry (its ``hash`` is the head to anchor elsewhere), or None for a missing or empty log.

        Raises :class:`AuditError` when the last line is damaged."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                return _read_last_entry(fd, os.fstat(fd).st_size, self.path)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


@dataclass
class VerifyReport:
    """What :func:`verify_log` found.

    Attributes
    ----------
    path : Path
    entries : int
        Lines that parsed as entries (altered ones included; unparsable and partial lines not).
    ok : bool
        True when no integrity problem was found (warnings, such as a clock going backwards, keep it True).
    problems : list of str
        ``"line N: ..."`` for each problem, warnings prefixed ``"warning:"``; at most :data:`MAX_PROBLEMS`, then
        one line counting the rest.
    last_hash : str
        Hash of the last entry (the head), :data:`GENESIS` for an empty log.
    first_time, last_time : str or None
        Times of the first and last entries.
    events : dict
        Number of entries of each event.
    """

    path: Path
    entries: int = 0
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    last_hash: str = GENESIS
    first_time: str | None = None
    last_time: str | None = None
    events: dict[str, int] = field(default_factory=dict)


def verify_log(path: str | Path, *, expected_head: str | None = None) -> VerifyReport:
    """Check a whole audit log: every line parses and is canonical, fields are present and typed, ``seq`` runs
    from 0 without gaps, each ``prev`` is the previous ``hash``, each ``hash`` recomputes, and times do not go
    backwards (a warning only). A last line without a newline is reported as partial.

    Parameters
    ----------
    path : str or Path
        The log file.
    expected_head : str, optional
        A head hash recorded elsewhere earlier (for instance by the server in its own log). It must be the hash
        of an entry of this log; entries appended after it are fine. A missing head means entries were cut
        from the end (or this is not the log the head was taken from): the only way tail truncation shows.

    Returns
    -------
    VerifyReport
        Integrity problems make ``ok`` False; nothing is raised for them.

    Raises
    ------
    AuditError
        The file does not exist or cannot be read.
    """
    path = Path(path)
    if expected_head is not None:
        expected_head = expected_head.strip().lower()
        if not _HEX64.fullmatch(expected_head):
            raise ValueError(f"expected_head should be a SHA-256 hash (64 hex digits), got {expected_head!r}.")
    report = VerifyReport(path=path)
    problems = _Problems()
    events: Counter[str] = Counter()
    expected_seq: int | None = 0
    prev_hash: str | None = GENESIS
    prev_time: datetime | None = None
    seen_head = expected_head is None
    try:
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.endswith(b"\n"):
                    problems.add(f"line {lineno}: partial last line ({len(raw)} bytes, no newline): a write was "
                                 f"interrupted or the file was cut; it is not part of the chain")
                    break
                try:
                    entry = _parse_line(raw)
                except _AlteredEntry as err:
                    problems.add(f"line {lineno}: {err}")
                    entry = err.entry  # what it claims still links the chain: later lines are checked against it
                except AuditError as err:
                    problems.add(f"line {lineno}: {err}")
                    expected_seq, prev_hash = None, None  # unknown: the next line's links cannot be checked
                    continue
                if expected_seq is not None and entry.seq != expected_seq:
                    problems.add(f"line {lineno}: seq is {entry.seq}, expected {expected_seq} "
                                 f"(an entry was deleted, inserted or moved)")
                if prev_hash is not None and entry.prev != prev_hash:
                    problems.add(f"line {lineno}: prev does not match the hash of the previous entry "
                                 f"(the chain is broken here: an entry before it was changed, removed or moved)")
                when = datetime.fromisoformat(entry.time)
                if prev_time is not None and when < prev_time:
                    problems.add(f"line {lineno}: time {entry.time} is earlier than the previous entry's",
                                 warning=True)
                if expected_head is not None and entry.hash == expected_head:
                    seen_head = True
                expected_seq, prev_hash, prev_time = entry.seq + 1, entry.hash, when
                report.entries += 1
                report.first_time = report.first_time or entry.time
                report.last_time = entry.time
                report.last_hash = entry.hash
                events[entry.event] += 1
    except OSError as err:
        raise AuditError(f"Cannot read the audit log {path}: {err.strerror or err}.") from err
    if not seen_head:
        problems.add(f"end: the expected head {expected_head} is not the hash of any entry (the log ends at "
                     f"{report.last_hash}): entries were removed from the end, or this is not the log the head "
                     f"was recorded from")
    report.ok = problems.errors == 0
    report.problems = problems.listed()
    report.events = dict(sorted(events.items()))
    return report


def summarize(report: VerifyReport) -> str:
    """A few human-readable lines about a :class:`VerifyReport`, for the command line."""
    status = "OK" if report.ok else "FAILED"
    lines = [f"{report.path}: {status}", f"  entries: {report.entries}"]
    if report.first_time is not None:
        lines.append(f"  time:    {report.first_time} .. {report.last_time}")
    if report.events:
        lines.append("  events:  " + ", ".join(f"{name} {count}" for name, count in report.events.items()))
    lines.append(f"  head:    {report.last_hash}")
    if report.problems:
        lines.append("  problems:")
        lines.extend(f"    {problem}" for problem in report.problems)
    return "\n".join(lines)


# --- helpers -------------------------------------------------------------------------------------------------


class _Problems:
    def __init__(self) -> None:
        self.shown: list[str] = []
        self.hidden = 0
        self.errors = 0

    def add(self, message: str, *, warning: bool = False) -> None:
        if warning:
            head, _, rest = message.partition(": ")
            message = f"{head}: warning: {rest}"
        else:
            self.errors += 1
        if len(self.shown) < MAX_PROBLEMS:
            self.shown.append(message)
        else:
            self.hidden += 1

    def listed(self) -> list[str]:
        return self.shown + ([f"... and {self.hidden} more problems not listed"] if self.hidden else [])


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _jsonable(value: Any, where: str, depth: int) -> Any:
    """``value`` as plain JSON values (NaN/inf -> None), or TypeError naming ``where``."""
    if depth > _MAX_DEPTH:
        raise TypeError(f"Audit value {where} is nested more than {_MAX_DEPTH} levels deep (a cycle?).")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        return str.__str__(value)  # the text itself, also for str-valued enums
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"Audit value {where} has the key {key!r} of type {type(key).__name__}; "
                                f"JSON object keys must be strings.")
            out[key] = _jsonable(item, f"{where}[{key!r}]", depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
    scalar = _array_scalar(value, where)
    if scalar is not None:
        return _jsonable(scalar, where, depth + 1)
    raise TypeError(f"Audit value {where} is a {type(value).__module__}.{type(value).__qualname__}, which is not "
                    f"JSON-serialisable; pass a string, number, bool, None, list or dict.")


def _array_scalar(value: Any, where: str) -> Any:
    """A numpy scalar / one-element array or tensor as a Python number; None when ``value`` is neither kind.

    numpy and torch are only looked up if already imported: a value of their types cannot exist otherwise."""
    numpy = sys.modules.get("numpy")
    torch = sys.modules.get("torch")
    is_array = ((numpy is not None and isinstance(value, (numpy.generic, numpy.ndarray)))
                or (torch is not None and isinstance(value, torch.Tensor)))
    if not is_array:
        return None
    size = value.numel() if torch is not None and isinstance(value, torch.Tensor) else value.size
    if size != 1:
        raise TypeError(f"Audit value {where} is an array of shape {tuple(value.shape)}: audit entries hold "
                        f"metadata, never images or model weights. Pass a list (``.tolist()``) for a few numbers.")
    return value.item()


def _open_for_append(path: Path) -> tuple[int, bool]:
    """An O_APPEND descriptor on ``path`` and whether the file was created (then with mode 0600)."""
    flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return os.open(path, flags), False
    os.fchmod(fd, 0o600)  # independent of the umask
    return fd, True


def _read_last_entry(fd: int, size: int, path: Path) -> AuditEntry | None:
    """The last entry of the file, reading backwards from the end; None for an empty file."""
    if size == 0:
        return None
    if os.pread(fd, 1, size - 1) != b"\n":
        raise AuditError(f"The audit log {path} ends with a partial line (no newline): a write was interrupted "
                         f"or the file was cut. Nothing was appended; {_VERIFY_HINT}.")
    start = size - 1  # the final newline; search backwards for the one before it
    while start > 0:
        step = min(_READ_CHUNK, start)
        chunk = os.pread(fd, step, start - step)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            start = start - step + cut + 1
            break
        start -= step
    raw = os.pread(fd, size - start, start)
    try:
        return _parse_line(raw)
    except AuditError as err:
        raise AuditError(f"The last line of the audit log {path} is damaged ({err}). Nothing was appended; "
                         f"{_VERIFY_HINT}.") from None


def _write_line(fd: int, line: bytes, size: int, path: Path) -> None:
    """One write of one line, fsynced; a short or failed write is undone (only our own bytes are cut)."""
    try:
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"short write ({written} of {len(line)} bytes)")
        os.fsync(fd)
    except OSError as err:
        try:
            if os.fstat(fd).st_size > size:
                os.ftruncate(fd, size)
        except OSError:
            pass
        raise AuditError(f"Could not append to the audit log {path}: {err}. {_VERIFY_HINT.capitalize()}.") from err


def _check_size(line: bytes, event: str) -> None:
    if len(line) > MAX_ENTRY_BYTES:
        raise AuditError(
            f"The audit entry for event {event!r} is {len(line)} bytes, over the limit of {MAX_ENTRY_BYTES}. "
            f"Audit entries hold metadata (counts, parameters, hashes), never images or model weights: record "
            f"a hash or a summary of large content instead.")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _parse_line(raw: bytes) -> AuditEntry:
    """One complete line (with its newline) as an entry, or AuditError saying what is wrong with it."""
    text_bytes = raw[:-1] if raw.endswith(b"\n") else raw
    if not text_bytes.strip():
        raise AuditError("empty line")
    try:
        text = text_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise AuditError("not valid UTF-8") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as err:
        raise AuditError(f"not valid JSON ({err})") from None
    if not isinstance(obj, dict):
        raise AuditError(f"not a JSON object but {type(obj).__name__}")
    expected = set(_FIELDS) | {"hash"}
    if set(obj) != expected:
        missing, extra = sorted(expected - set(obj)), sorted(set(obj) - expected)
        raise AuditError("fields " + "; ".join(
            part for part in (f"missing {missing}" if missing else "", f"unexpected {extra}" if extra else "")
            if part))
    seq = obj["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise AuditError(f"seq should be a non-negative integer, got {seq!r}")
    for key in ("time", "actor", "event", "prev", "hash"):
        if not isinstance(obj[key], str):
            raise AuditError(f"{key} should be a string, got {type(obj[key]).__name__}")
    if not isinstance(obj["data"], dict):
        raise AuditError(f"data should be an object, got {type(obj['data']).__name__}")
    for key in ("prev", "hash"):
        if not _HEX64.fullmatch(obj[key]):
            raise AuditError(f"{key} should be 64 lowercase hex digits, got {obj[key][:80]!r}")
    try:
        when = datetime.fromisoformat(obj["time"])
    except ValueError:
        raise AuditError(f"time is not an ISO-8601 time: {obj['time'][:80]!r}") from None
    if when.utcoffset() is None or when.utcoffset().total_seconds() != 0:
        raise AuditError(f"time should be in UTC, got {obj['time']!r}")
    entry = AuditEntry(**obj)
    if entry_hash(obj) != entry.hash:
        raise _AlteredEntry(f"hash does not match the content of entry seq {seq} (the entry was altered)", entry)
    if canonical_json(obj) != text:
        raise _AlteredEntry(f"entry seq {seq} is not in canonical form (the line was rewritten)", entry)
    return entry


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def source_hash(root: str | Path, folders: tuple[str, ...] = ("server", "client", "common"),
                extra: tuple[str, ...] = ("pyproject.toml",)) -> str:
    """SHA-256 over the app's source files (relative path and bytes of every ``*.py`` under ``folders``, and the
    ``extra`` files), in sorted order: which code a run or a site ran, for the audit log."""
    root = Path(root)
    files = sorted({p for folder in folders for p in (root / folder).rglob("*.py")} |
                   {root / name for name in extra if (root / name).is_file()})
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def app_hash() -> str:
    """:func:`source_hash` of the facefl app this process runs."""
    return source_hash(Path(__file__).resolve().parents[1])
