"""A run directory on a disk that fills up: real writes on a small tmpfs (root only; skipped elsewhere). The
end-to-end case, a deployment whose server disk fills during a round, is in tests/test_network_faults.py."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
import torch

from common.audit import AuditLog, verify_log
from common.config import RunConfig
from server.federation import _record_failure, resume_hint
from server.rundir import DiskFullError, RunDirectory, is_disk_full


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder = tmp_path / "disk"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "facefl-test-disk", str(folder)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


def test_a_checkpoint_that_does_not_fit_leaves_the_last_one_intact_and_says_how_to_resume(small_disk):
    cfg = RunConfig.from_mapping({"task": "embedding", "model": "compact", "num-rounds": 3})
    run = RunDirectory.create(small_disk / "run", cfg)
    audit = AuditLog(run.path / "audit.jsonl", actor="server")
    audit.append("run-started")
    small = {"w": torch.zeros(1000)}
    run.save_checkpoint(1, small, {})
    with pytest.raises(OSError) as failure:
        run.save_checkpoint(2, {"w": torch.zeros(400_000)}, {})  # 1.6 MB on a 1 MB disk
    assert failure.value.errno == errno.ENOSPC and is_disk_full(failure.value)
    assert not is_disk_full(ValueError("no")) and not is_disk_full(DiskFullError("x"))
    wrapped = RuntimeError("audit")
    wrapped.__cause__ = failure.value
    assert is_disk_full(wrapped)  # an audit log's error wraps the OSError
    assert run.checkpoint_rounds() == [1] and not [p for p in run.path.rglob("*") if p.name.endswith(".tmp")]
    assert torch.load(run.path / "checkpoints" / "round-0001.pt", weights_only=True)["round"] == 1
    message = run.disk_full_message(2, resume_hint(run.path))
    assert f"The disk holding the run directory {run.path} is full" in message
    assert "round 2's results could not be written" in message and "checkpoint of round 1 is intact" in message
    assert f"facefl simulate --resume {run.path}" in message and f"resume-from='{run.path}'" in message
    # Filled to the last byte, recording the failure writes what it can and raises nothing.
    with open(small_disk / "filler", "wb", buffering=0) as fh:
        for size in (1 << 16, 1):
            try:
                while fh.write(b"\0" * size):
                    pass
            except OSError:
                pass
    _record_failure(run, audit, None, message)
    assert verify_log(run.path / "audit.jsonl").ok and run.latest_checkpoint()["round"] == 1


def test_facefl_prints_a_running_federations_failure_as_one_line(monkeypatch, capsys):
    """`facefl simulate` ends a run stopped by a full disk (or a lost quorum) with one `error:` line, status 1."""
    import simulations.cli as cli

    def stopped():
        raise DiskFullError("The disk holding the run directory runs/x is full (0.0 MB free): ...")

    monkeypatch.setattr(cli, "app", stopped)
    monkeypatch.setattr(sys, "argv", ["facefl", "simulate"])
    monkeypatch.delenv("FACEFL_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: The disk holding the run directory runs/x is full (0.0 MB free): ...\n"

    monkeypatch.setattr(cli, "app", lambda: (_ for _ in ()).throw(RuntimeError("not facefl's")))
    with pytest.raises(RuntimeError, match="not facefl's"):  # anything else keeps its traceback
        cli.main()
