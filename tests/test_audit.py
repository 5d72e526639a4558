"""The audit log: hash chain round trip, tampering of every kind detected at its line, crash-safe appends from
several processes, and what may go into an entry. Real files in tmp_path, no mocks."""

from __future__ import annotations

import enum
import json
import multiprocessing
import os
import stat
import threading
from pathlib import Path

import pytest

from common.audit import (GENESIS, MAX_ENTRY_BYTES, AuditEntry, AuditError, AuditLog, canonical_json, entry_hash,
                          summarize, verify_log)


def _write_log(path: Path, count: int = 5) -> list[AuditEntry]:
    log = AuditLog(path, actor="server")
    entries = [log.append("run-started", app_hash="ab" * 32, dp={"epsilon": 8.0, "delta": 1e-5})]
    entries += [log.append("round-results", round=i, loss=1.0 / i) for i in range(1, count)]
    return entries


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _problem_lines(report) -> set[int]:
    """Line numbers named by the problems of a report ("line N: ...")."""
    return {int(p.split(":")[0].split()[1]) for p in report.problems if p.startswith("line ")}


def test_round_trip(tmp_path):
    path = tmp_path / "audit.jsonl"
    entries = _write_log(path, 5)

    assert [e.seq for e in entries] == [0, 1, 2, 3, 4]
    assert entries[0].prev == GENESIS
    assert all(b.prev == a.hash for a, b in zip(entries, entries[1:]))
    lines = _lines(path)
    assert len(lines) == 5 and all(line.endswith(b"\n") for line in lines)
    first = json.loads(lines[0])
    assert first["hash"] == entry_hash({k: v for k, v in first.items() if k != "hash"}) == entries[0].hash
    assert lines[0].decode() == canonical_json(first) + "\n"
    assert first["time"].endswith("+00:00") and len(first["time"].split(".")[1]) == len("123456+00:00")

    report = verify_log(path)
    assert report.ok, report.problems
    assert report.problems == []
    assert report.entries == 5
    assert report.last_hash == entries[-1].hash == AuditLog(path, actor="x").tail().hash
    assert report.events == {"round-results": 4, "run-started": 1}
    assert report.first_time == entries[0].time and report.last_time == entries[-1].time
    text = summarize(report)
    assert "OK" in text and "FAILED" not in text and entries[-1].hash in text and "round-results 4" in text


def test_empty_and_missing_logs(tmp_path):
    assert AuditLog(tmp_path / "none.jsonl", actor="server").tail() is None
    with pytest.raises(AuditError, match="Cannot read"):
        verify_log(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    report = verify_log(tmp_path / "empty.jsonl")
    assert report.ok and report.entries == 0 and report.last_hash == GENESIS


def _edit_third_entry(path, edit) -> None:
    """Rewrite the third of five logged entries through ``edit(entry)``, leaving the other lines as written."""
    _write_log(path, 5)
    lines = _lines(path)
    obj = json.loads(lines[2])
    edit(obj)
    lines[2] = (canonical_json(obj) + "\n").encode()
    path.write_bytes(b"".join(lines))


def test_edited_value_is_detected_at_its_line(tmp_path):
    path = tmp_path / "audit.jsonl"
    _edit_third_entry(path, lambda obj: obj["data"].update(loss=0.001))  # a better loss than recorded, hash kept

    report = verify_log(path)
    assert not report.ok
    assert _problem_lines(report) == {3}
    assert "hash does not match" in report.problems[0]
    assert "FAILED" in summarize(report)


def test_edit_with_recomputed_hash_breaks_the_next_link(tmp_path):
    path = tmp_path / "audit.jsonl"

    def edit(obj: dict) -> None:
        obj["data"]["loss"] = 0.001
        obj["hash"] = entry_hash(obj)

    _edit_third_entry(path, edit)

    report = verify_log(path)
    assert not report.ok
    assert _problem_lines(report) == {4}
    assert "prev does not match" in report.problems[0]


def test_non_canonical_rewrite_is_detected(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write_log(path, 3)
    lines = _lines(path)
    lines[1] = (json.dumps(json.loads(lines[1]), indent=None) + "\n").encode()  # same content, spaces added
    path.write_bytes(b"".join(lines))

    report = verify_log(path)
    assert not report.ok and _problem_lines(report) == {2}
    assert "canonical" in report.problems[0]


def test_deleted_middle_line_is_detected(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write_log(path, 5)
    lines = _lines(path)
    del lines[2]
    path.write_bytes(b"".join(lines))

    report = verify_log(path)
    assert not report.ok
    assert _problem_lines(report) == {3}
    assert any("seq is 3, expected 2" in p for p in report.problems)
    assert any("prev does not match" in p for p in report.problems)


def test_swapped_lines_are_detected(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write_log(path, 5)
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_bytes(b"".join(lines))

    report = verify_log(path)
    assert not report.ok
    assert min(_problem_lines(report)) == 2
    assert any(p.startswith("line 2: seq is 2, expected 1") for p in report.problems)


def test_forged_line_with_wrong_prev_is_detected(tmp_path):
    path = tmp_path / "audit.jsonl"
    entries = _write_log(path, 3)
    body = {"seq": 3, "time": entries[-1].time, "actor": "server", "event": "budget-exhausted",
            "data": {"site": "hospital-a"}, "prev": entries[0].hash}  # links to the wrong entry
    forged = {**body, "hash": entry_hash(body)}  # internally consistent: only the link is wrong
    with open(path, "ab") as fh:
        fh.write((canonical_json(forged) + "\n").encode())

    report = verify_log(path)
    assert not report.ok
    assert _problem_lines(report) == {4}
    assert "prev does not match" in report.problems[0]

    body["prev"] = entries[-1].hash  # the same line correctly linked passes: the chain is not a signature
    path.write_bytes(b"".join(_lines(path)[:3]) + (canonical_json({**body, "hash": entry_hash(body)}) + "\n").encode())
    assert verify_log(path).ok


def test_tail_truncation_is_only_caught_by_expected_head(tmp_path):
    path = tmp_path / "audit.jsonl"
    entries = _write_log(path, 5)
    head = entries[-1].hash
    assert verify_log(path, expected_head=head).ok
    assert verify_log(path, expected_head=entries[2].hash).ok  # an older anchor: later appends are fine

    path.write_bytes(b"".join(_lines(path)[:3]))
    report = verify_log(path)
    assert report.ok and report.entries == 3  # still a valid chain
    report = verify_log(path, expected_head=head)
    assert not report.ok
    assert any(head in p and "removed from the end" in p for p in report.problems)
    assert verify_log(path, expected_head=entries[2].hash.upper()).ok
    with pytest.raises(ValueError, match="64 hex digits"):
        verify_log(path, expected_head="not-a-hash")


def test_partial_last_line_is_reported_and_append_refuses(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write_log(path, 3)
    with open(path, "ab") as fh:
        fh.write(b'{"actor":"server","data":{"ro')  # a crash in the middle of a write
    before = path.read_bytes()

    report = verify_log(path)
    assert not report.ok
    assert report.entries == 3
    assert _problem_lines(report) == {4}
    assert "partial last line" in report.problems[0]

    log = AuditLog(path, actor="server")
    with pytest.raises(AuditError, match="partial line.*facefl audit verify"):
        log.append("round-results", round=4)
    with pytest.raises(AuditError, match="partial line"):
        log.tail()
    assert path.read_bytes() == before


def test_append_refuses_after_an_altered_last_entry(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write_log(path, 3)
    lines = _lines(path)
    lines[-1] = lines[-1].replace(b'"round":2', b'"round":9')
    path.write_bytes(b"".join(lines))
    before = path.read_bytes()

    with pytest.raises(AuditError, match="last line .* is damaged.*altered"):
        AuditLog(path, actor="server").append("round-results", round=3)
    assert path.read_bytes() == before


def test_time_going_backwards_is_a_warning_only(tmp_path):
    path = tmp_path / "audit.jsonl"
    entries = _write_log(path, 2)
    body = {"seq": 2, "time": "2000-01-01T00:00:00.000000+00:00", "actor": "server", "event": "site-left",
            "data": {}, "prev": entries[-1].hash}
    with open(path, "ab") as fh:
        fh.write((canonical_json({**body, "hash": entry_hash(body)}) + "\n").encode())

    report = verify_log(path)
    assert report.ok
    assert len(report.problems) == 1 and report.problems[0].startswith("line 3: warning:")


def test_problems_are_capped(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"garbage\n" * 80)
    report = verify_log(path)
    assert not report.ok and report.entries == 0
    assert len(report.problems) == 51
    assert report.problems[-1] == "... and 30 more problems not listed"


def _append_many(path: str, worker: int, count: int, start) -> None:  # runs in a spawned process
    start.wait(30)
    log = AuditLog(path, actor=f"site:worker-{worker}")
    for i in range(count):
        log.append("round-results", worker=worker, i=i)


def test_concurrent_appends_from_processes(tmp_path):
    path = tmp_path / "audit.jsonl"
    # spawn, not fork: the test process has torch threads. Spawned children import this module, which is why
    # numpy and torch are imported inside the tests that use them.
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    workers = [ctx.Process(target=_append_many, args=(str(path), w, 50, start)) for w in range(4)]
    for proc in workers:
        proc.start()
    start.set()
    for proc in workers:
        proc.join(120)
    assert [proc.exitcode for proc in workers] == [0, 0, 0, 0]

    report = verify_log(path)
    assert report.ok, report.problems
    assert report.entries == 200
    records = [json.loads(line) for line in _lines(path)]
    assert [r["seq"] for r in records] == list(range(200))
    assert sorted((r["data"]["worker"], r["data"]["i"]) for r in records) == [(w, i) for w in range(4)
                                                                           for i in range(50)]
    assert len({r["actor"] for r in records}) == 4


def test_concurrent_appends_from_threads(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, actor="server")
    threads = [threading.Thread(target=lambda w=w: [log.append("x", w=w, i=i) for i in range(25)])
               for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report = verify_log(path)
    assert report.ok and report.entries == 100


class _Accountant(str, enum.Enum):
    RDP = "rdp"


def test_values_are_converted_to_json(tmp_path):
    import numpy as np
    import torch

    path = tmp_path / "audit.jsonl"
    entry = AuditLog(path, actor="server").append(
        "round-results", loss=float("nan"), norms=[1.5, float("inf"), float("-inf")], eps=np.float32(2.5),
        steps=np.int64(7), clipped=np.bool_(True), acc=torch.tensor(0.25), folder=Path("/runs/a"),
        dp={"sigma": (1.1, float("nan"))}, accountant=_Accountant.RDP)

    expected = {"loss": None, "norms": [1.5, None, None], "eps": 2.5, "steps": 7, "clipped": True, "acc": 0.25,
                "folder": "/runs/a", "dp": {"sigma": [1.1, None]}, "accountant": "rdp"}
    assert entry.data == expected
    stored = json.loads(_lines(path)[0])
    assert stored["data"] == expected
    assert type(stored["data"]["steps"]) is int and type(stored["data"]["clipped"]) is bool
    assert b"NaN" not in path.read_bytes() and b'"loss":null' in path.read_bytes()
    assert verify_log(path).ok


@pytest.mark.parametrize("make, key", [
    (lambda: {"thing": object()}, "thing"),
    (lambda: {"cfg": {"inner": {1, 2}}}, "inner"),
    (lambda: {"raw": b"\x00\x01"}, "raw"),
    (lambda: {"ids": {3: "a"}}, "ids"),
    (lambda: {"image": __import__("numpy").zeros((8, 8, 3), dtype="uint8")}, "image"),
    (lambda: {"weights": __import__("torch").zeros(4, 4)}, "weights"),
], ids=["object", "set", "bytes", "int-key", "image", "weights"])
def test_non_serialisable_values_are_refused(tmp_path, make, key):
    data = make()
    path = tmp_path / "audit.jsonl"
    with pytest.raises(TypeError, match=key):
        AuditLog(path, actor="server").append("run-started", **data)
    assert not path.exists()


def test_oversize_entry_is_refused(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, actor="server")
    log.append("run-started", config={"rounds": 3})
    before = path.read_bytes()
    with pytest.raises(AuditError, match="over the limit"):
        log.append("egress", pixels=list(range(MAX_ENTRY_BYTES // 4)))
    assert path.read_bytes() == before
    log.append("egress", images=3, sha256=["ab" * 32] * 3)  # metadata about images is fine
    assert verify_log(path).entries == 2


def test_new_file_is_private(tmp_path):
    path = tmp_path / "logs" / "audit.jsonl"
    old_umask = os.umask(0o022)
    try:
        AuditLog(path, actor="server").append("run-started")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_reopened_log_continues_the_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    first = _write_log(path, 2)
    again = AuditLog(path, actor="site:hospital-a")
    assert again.tail() == first[-1]
    entry = again.append("site-joined", site="hospital-a")
    assert entry.seq == 2 and entry.prev == first[-1].hash and entry.actor == "site:hospital-a"
    assert again.tail() == entry
    report = verify_log(path)
    assert report.ok and report.entries == 3 and report.last_hash == entry.hash


def test_tail_reads_a_long_last_line(tmp_path):
    """The last line is found across several backward reads (lines longer than the read chunk)."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, actor="server")
    log.append("run-started", config={"k": "v" * 20000})
    last = log.append("run-started", config={"k": "w" * 30000})
    assert log.tail() == last
    assert log.append("site-joined").prev == last.hash


def test_invalid_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="actor"):
        AuditLog(tmp_path / "a.jsonl", actor="")
    with pytest.raises(ValueError, match="event"):
        AuditLog(tmp_path / "a.jsonl", actor="server").append("two\nlines")
